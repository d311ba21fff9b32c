"""Counter increments (agent.counters): wrap-around is a continuation, a reset is no negative production."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.counters import WRAP_WINDOW_FRACTION, CounterSpec, CounterTracker, classify, raw_increment
from protocols.modbus import ModbusTagConfig

widths = st.sampled_from([16, 32])


@given(widths, st.data())
def test_an_increment_is_never_negative(bits: int, data: st.DataObject) -> None:
    previous = data.draw(st.integers(-(1 << bits), (1 << bits) - 1))
    current = data.draw(st.integers(-(1 << bits), (1 << bits) - 1))
    step = raw_increment(previous, current, bits)
    assert 0 <= step < (1 << bits)
    assert raw_increment(previous, current, None) >= 0


@given(widths, st.data())
def test_a_counter_moving_forward_adds_up_across_wrap_arounds(bits: int, data: st.DataObject) -> None:
    modulus = 1 << bits
    start = data.draw(st.integers(0, modulus - 1))
    steps = data.draw(st.lists(st.integers(0, modulus // WRAP_WINDOW_FRACTION), min_size=1, max_size=40))
    tracker = CounterTracker(CounterSpec(bits=bits))
    tracker.update(start)
    position = start
    counted = 0
    for step in steps:
        position += step
        observed = position % modulus
        if observed == 0 and step:
            # landing exactly on zero after a wrap reads as a reset: documented, skip this observation
            position += 1
            observed = 1
            step += 1
        tracker.update(observed)
        counted += step
    assert tracker.total == counted
    assert tracker.resets == 0


@given(widths, st.integers(1, 60000), st.integers(0, 5000))
def test_a_drop_to_zero_is_a_reset_and_counting_goes_on(bits: int, before: int, after: int) -> None:
    tracker = CounterTracker(CounterSpec(bits=bits))
    tracker.update(before)
    assert tracker.update(0) == 0
    assert tracker.resets == 1
    assert tracker.update(after) == after
    assert tracker.total == after


@given(st.integers(1, 2**31), st.integers(1, 2**31))
def test_without_a_width_every_drop_is_a_reset(previous: int, current: int) -> None:
    step, what = classify(previous, current, None)
    if current >= previous:
        assert (step, what) == (current - previous, "forward")
    else:
        assert (step, what) == (current, "reset")


def test_examples_of_the_rule() -> None:
    assert classify(65530, 3, 16) == (9, "wrap")
    assert classify(65530, 0, 16) == (0, "reset")
    assert classify(40000, 5, 16) == (5, "reset")  # 25541 forward is too far for a wrap
    assert classify(2**32 - 2, 1, 32) == (3, "wrap")
    assert classify(32767, -32768, 16) == (1, "forward")  # int16 as its bit pattern


def test_scaled_counters_count_in_their_units() -> None:
    tracker = CounterTracker(CounterSpec(bits=16, scale=0.1, offset=5.0))
    tracker.update(5.0 + 6553.0)  # raw 65530
    tracker.update(5.0 + 0.3)  # raw 3: wrapped, +9 counts
    assert tracker.total == 9
    assert tracker.value_of(tracker.total) == 0.9
    assert CounterTracker(CounterSpec(scale=2.0)).value_of(3) == 6


def test_a_modbus_counter_tag_knows_its_width() -> None:
    tag = ModbusTagConfig.model_validate(
        {"tag": "t", "register": "holding:1", "type": "uint32", "kind": "counter", "scale": 0.5}
    )
    assert tag.counter_spec() == CounterSpec(bits=32, scale=0.5, offset=0.0)
