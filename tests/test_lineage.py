"""Unit tests of reconciliation's pure parts: the digest, the ERP file parser, times, outcome bodies."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.lineage import (
    Comparison,
    OutcomeError,
    canonical_type,
    compare,
    digest,
    iso,
    parse_outcomes,
    parse_time,
    read_ids,
)

# --- digest ------------------------------------------------------------------------------------------


def test_digest_is_sha256_of_the_sorted_ids_joined_by_newlines() -> None:
    ids = ["b-2", "a-1", "c-3"]
    assert digest(ids) == hashlib.sha256(b"a-1\nb-2\nc-3").hexdigest()
    assert digest(["only"]) == hashlib.sha256(b"only").hexdigest()
    assert digest([]) == hashlib.sha256(b"").hexdigest()


def test_digest_sorts_by_utf8_bytes_not_by_locale() -> None:
    # "Z" (0x5a) sorts before "a" (0x61) and "é" (0xc3 0xa9) after both, as any byte-wise sort does.
    assert digest(["é", "a", "Z"]) == hashlib.sha256("Z\na\né".encode()).hexdigest()


IDS = st.lists(
    st.text(alphabet=st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), min_size=1), unique=True
)


@given(IDS, st.randoms())
def test_digest_does_not_depend_on_delivery_order(ids: list[str], rng: object) -> None:
    shuffled = list(ids)
    rng.shuffle(shuffled)  # type: ignore[attr-defined]
    assert digest(shuffled) == digest(ids)


@given(IDS)
def test_digest_is_the_formula_the_docs_give_the_cloud_side(ids: list[str]) -> None:
    # docs/lineage.md: hashlib.sha256("\n".join(sorted(ids, key=str.encode)).encode()).hexdigest()
    assert digest(ids) == hashlib.sha256("\n".join(sorted(ids, key=str.encode)).encode()).hexdigest()


def test_digest_differs_when_one_id_is_missing() -> None:
    ids = [f"id-{n}" for n in range(100)]
    assert digest(ids) != digest(ids[:50] + ids[51:])


# --- times -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1764900000", 1764900000.0),
        ("1764900000.25", 1764900000.25),
        ("2026-12-05T10:00:00Z", 1796464800.0),
        ("2026-12-05T10:00:00+00:00", 1796464800.0),
        ("2026-12-05T11:00:00+01:00", 1796464800.0),
        ("2026-12-05T10:00:00", 1796464800.0),  # no offset: UTC
        ("2026-12-05", 1796428800.0),
    ],
)
def test_parse_time_takes_unix_seconds_and_iso_8601(text: str, expected: float) -> None:
    assert parse_time(text) == expected


@pytest.mark.parametrize("text", ["yesterday", "", "nan", "2026-13-01T00:00:00Z"])
def test_parse_time_refuses_what_is_not_a_time(text: str) -> None:
    with pytest.raises(ValueError, match="time"):
        parse_time(text)


def test_iso_is_rfc3339_utc() -> None:
    assert iso(1796464800.0) == "2026-12-05T10:00:00Z"
    assert iso(1796464800.5) == "2026-12-05T10:00:00.500000Z"
    assert parse_time(iso(1796464800.5)) == 1796464800.5


def test_canonical_type_takes_short_and_full_names() -> None:
    assert canonical_type("production.completed") == "io.plantgate.production.completed"
    assert canonical_type("io.plantgate.production.completed") == "io.plantgate.production.completed"
    assert canonical_type(None) is None
    assert canonical_type("  ") is None


# --- the ERP's file ----------------------------------------------------------------------------------


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_with_an_id_column_anywhere(tmp_path: Path) -> None:
    path = write(tmp_path, "erp.csv", "posting,ID,amount\nP1,e-1,3\nP2, e-2 ,4\n\nP3,e-1,5\n")
    assert read_ids(path) == ["e-1", "e-2"]  # header skipped, blanks and repeats dropped, spaces stripped


def test_csv_without_an_id_column_takes_the_first_column(tmp_path: Path) -> None:
    path = write(tmp_path, "erp.csv", "e-1,posted\ne-2,posted\n")
    assert read_ids(path) == ["e-1", "e-2"]


def test_csv_with_a_byte_order_mark_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "erp.csv"
    path.write_bytes(b"\xef\xbb\xbfid\r\ne-1\r\ne-2\r\n")
    assert read_ids(path) == ["e-1", "e-2"]


def test_csv_row_without_an_id_names_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, "erp.csv", "id,amount\ne-1,1\n,2\n")
    with pytest.raises(ValueError, match=r"erp\.csv:3: no id in column 1"):
        read_ids(path)


def test_json_lines_of_objects_and_strings(tmp_path: Path) -> None:
    lines = [json.dumps({"id": "e-1", "doc": "4900001"}), '"e-2"', "", json.dumps({"id": "e-1"})]
    path = write(tmp_path, "erp.jsonl", "\n".join(lines) + "\n")
    assert read_ids(path) == ["e-1", "e-2"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"id": "e-1"}\n{"doc": 1}\n', r"erp\.jsonl:2: expected an object with a string \"id\""),
        ('{"id": "e-1"}\n{"id": 17}\n', r"erp\.jsonl:2: expected"),
        ('{"id": "e-1"}\n{oops\n', r"erp\.jsonl:2: not JSON"),
    ],
)
def test_json_lines_errors_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_ids(write(tmp_path, "erp.jsonl", text))


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"missing\.csv: cannot read"):
        read_ids(tmp_path / "missing.csv")
    binary = tmp_path / "erp.bin"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_ids(binary)


def test_empty_file_holds_no_ids(tmp_path: Path) -> None:
    assert read_ids(write(tmp_path, "erp.csv", "")) == []
    assert read_ids(write(tmp_path, "erp2.csv", "id\n")) == []


# --- outcome bodies ----------------------------------------------------------------------------------


def test_one_outcome_or_a_list() -> None:
    one = parse_outcomes(b'{"id": "e-1", "outcome": "posted", "reference": "4900001"}')
    assert [(o.id, o.outcome, o.reference) for o in one] == [("e-1", "posted", "4900001")]
    many = parse_outcomes(
        json.dumps(
            [{"id": "e-1", "outcome": "posted"}, {"id": "e-2", "outcome": "rejected", "reason": "period closed"}]
        ).encode()
    )
    assert [(o.id, o.outcome, o.reason) for o in many] == [
        ("e-1", "posted", None),
        ("e-2", "rejected", "period closed"),
    ]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not JSON"),
        (b"[]", "empty"),
        (b"17", "the outcome: expected an object"),
        (b'[{"id": "e-1", "outcome": "posted"}, 5]', "item 1: expected an object"),
        (b'[{"id": "e-1", "outcome": "posted"}, {"id": "e-2", "outcome": "lost"}]', r"item 1: .*\$\.outcome"),
        (b'[{"outcome": "posted"}]', r"item 0: .*id"),
        (b'[{"id": "", "outcome": "posted"}]', r"item 0: .*\$\.id"),
        (b'[{"id": 4711, "outcome": "posted"}]', r"item 0: .*\$\.id"),
        (b'[{"id": "e-1", "outcome": "posted", "colour": "red"}]', r"item 0: .*colour"),
        (b'[{"id": "e-1", "outcome": "rejected"}]', r"item 0: a rejection needs a reason"),
        (b'{"id": "e-1", "outcome": "rejected", "reason": "  "}', r"the outcome: a rejection needs a reason"),
    ],
)
def test_invalid_outcomes_name_the_item_and_field(body: bytes, message: str) -> None:
    with pytest.raises(OutcomeError, match=message):
        parse_outcomes(body)


def test_too_many_outcomes_in_one_request() -> None:
    body = json.dumps([{"id": f"e-{n}", "outcome": "posted"} for n in range(10_001)]).encode()
    with pytest.raises(OutcomeError, match="at most 10000"):
        parse_outcomes(body)


# --- the comparison ----------------------------------------------------------------------------------


class ListedJournal:
    """A journal reader over a fixed list (what the agent's API or file would answer)."""

    def __init__(self, delivered: list[dict[str, object]], known: dict[str, dict[str, object]]):
        self.delivered = delivered
        self.known = known
        self.lookups: list[list[str]] = []

    async def window(self, start: float, end: float, type_: str | None) -> list[dict[str, object]]:
        return [e for e in self.delivered if type_ is None or e["type"] == type_]

    async def lookup(self, ids: list[str]) -> dict[str, dict[str, object]]:
        self.lookups.append(list(ids))
        return {i: self.known[i] for i in ids if i in self.known}


async def test_compare_finds_both_sides_and_sets_rejections_apart() -> None:
    t = "io.plantgate.production.completed"
    delivered = [
        {"id": "e-1", "type": t, "delivered": 10.0, "outcome": "posted"},
        {"id": "e-2", "type": t, "delivered": 11.0, "outcome": None},  # lost by the middleware
        {"id": "e-3", "type": t, "delivered": 12.0, "outcome": "rejected"},
    ]
    # e-9: delivered long ago (outside the window) and in the ERP: not unknown; e-x never sent.
    known = {"e-9": {"delivered": 1.0}, "e-p": {"delivered": None}}
    reader = ListedJournal(delivered, known)
    result = await compare(reader, ["e-1", "e-9", "e-x", "e-p"], 0.0, 100.0, None)
    assert isinstance(result, Comparison)
    assert [e["id"] for e in result.missing_in_erp] == ["e-2"]
    assert [e["id"] for e in result.rejected] == ["e-3"]
    assert result.unknown_to_plant == ["e-x", "e-p"]  # e-p: committed, never delivered
    assert reader.lookups == [["e-9", "e-x", "e-p"]]  # only what the window did not explain
    answer = result.as_json()
    assert answer["missing_in_erp"] == ["e-2"] and answer["unknown_to_plant"] == ["e-x", "e-p"]
    assert answer["delivered"] == 3 and answer["erp"] == 4


async def test_compare_agrees_when_the_erp_holds_everything() -> None:
    t = "io.plantgate.material.consumed"
    delivered = [{"id": f"e-{n}", "type": t, "delivered": 1.0, "outcome": None} for n in range(5)]
    # The agent's own operational events are not the ERP's business.
    delivered.append({"id": "started", "type": "io.plantgate.agent.started", "delivered": 1.0, "outcome": None})
    result = await compare(ListedJournal(delivered, {}), [f"e-{n}" for n in range(5)], 0.0, 10.0, None)
    assert not result.missing_in_erp and not result.unknown_to_plant and not result.rejected
    assert result.delivered == 5


# --- the timeline people read ------------------------------------------------------------------------


def test_a_rules_event_shows_its_trigger_steps_and_outcome(capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import _print_entry

    entry = {
        "id": "8d0c-4f1e", "type": "io.plantgate.production.completed", "lane": "transaction", "seq": 1842,
        "committed": 1796464805.131, "source": "plantgate/plant-01/line3-gw/press7", "subject": "4711",
        "work_order": "4711", "source_time": "2026-12-05T10:00:05.120Z",
        "trigger": {"source": "press7", "rule": "press7-completion",
                    "values": {"press7.cycle_done": {"value": True, "time": "2026-12-05T10:00:05.120Z",
                                                     "quality": "good"},
                               "press7.batch_qty": {"value": 120, "time": "2026-12-05T10:00:04.900Z",
                                                    "quality": "uncertain"},
                               "press7.item": None}},
        "delivered": 1796464806.402, "outcome": "posted", "outcome_at": 1796464809.918, "reference": "4900012345",
        "steps": [
            {"at": 1796464805.131, "step": "committed"},
            {"at": 1796464805.140, "step": "attempt", "sink": "erp-middleware", "status": "HTTP 503"},
            {"at": 1796464806.402, "step": "acked", "sink": "erp-middleware", "status": "ok", "reference": "MW-88121"},
            {"at": 1796464809.918, "step": "posted", "reference": "4900012345"},
        ],
    }  # fmt: skip
    _print_entry(entry)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "8d0c-4f1e  production.completed  subject=4711  work_order=4711  lane=transaction sequence=1842"
    assert "rule press7-completion; from press7" in lines[2]
    assert "press7.cycle_done=True at 2026-12-05T10:00:05.120Z" in lines[2]
    assert "press7.batch_qty=120 (uncertain)" in lines[2] and "press7.item=(no reading)" in lines[2]
    attempt = next(line for line in lines if " attempt " in line)
    assert "2026-12-05T10:00:05.140Z" in attempt and "erp-middleware" in attempt and "HTTP 503" in attempt
    assert "MW-88121" in next(line for line in lines if " acked " in line)
    assert lines[-1] == "  ERP: posted, reference 4900012345 (2026-12-05T10:00:09.918Z)"


def test_a_rejected_and_an_undelivered_event(capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import _print_entry

    base = {"id": "e-1", "type": "io.plantgate.material.consumed", "lane": "transaction", "seq": None,
            "committed": 1796464805.0, "source": "plantgate/p/g/mes", "steps": []}  # fmt: skip
    _print_entry({**base, "delivered": 1796464806.0, "outcome": "rejected", "reason": "period closed",
                  "outcome_at": 1796464807.0})  # fmt: skip
    _print_entry(base)
    out = capsys.readouterr().out
    assert "ERP: rejected: period closed" in out and "dead letter of sink erp" in out
    assert "sequence=-" in out and out.rstrip().endswith("not delivered yet")
