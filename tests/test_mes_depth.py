"""The webhook's nesting check against Python's own JSON parser (a differential property test)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.mes.ingest import depth_within

tricky_text = st.text(alphabet=st.sampled_from('ab[]{}"\\\n\u00e9\u2028/'), max_size=12)
values = st.recursive(
    st.none() | st.booleans() | st.integers() | tricky_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(tricky_text, inner, max_size=3),
    max_leaves=40,
)


def depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((depth(item) for item in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(item) for item in value.values()), default=0)
    return 0


@settings(max_examples=400, deadline=None)
@given(values, st.booleans(), st.integers(min_value=1, max_value=8))
def test_depth_within_agrees_with_the_parsed_value(value: Any, ascii_only: bool, limit: int) -> None:
    body = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert depth_within(body, limit) == (depth(json.loads(body)) <= limit)


def test_deep_nesting_in_a_batch_is_found_and_strings_do_not_count() -> None:
    batch = [{"id": str(i), "data": {"note": "[[[[{{{{" * 10}} for i in range(500)]
    assert depth_within(json.dumps(batch).encode(), 32)
    nested: Any = 0
    for _ in range(33):
        nested = [nested]
    assert not depth_within(json.dumps([*batch, {"data": nested}]).encode(), 32)
