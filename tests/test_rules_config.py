"""``[[transactions]]`` config: triggers, conditions, field forms, unit conversion, partition keys.

What a site engineer gets wrong must be a one-line config error naming the key;
what is right must parse into the model the rules use.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.settings import ConfigError, FieldLiteral, FieldTemplate, parse_settings, template_tags
from agent.units import UNITS, conversion

BASE = """
[agent]
site = "plant-01"
id = "gw"

[[sources.opcua]]
name = "press7"
endpoint = "opc.tcp://127.0.0.1:4840"
  [[sources.opcua.tags]]
  tag = "press7.cycle_done"
  node = "ns=2;s=CycleDone"
  kind = "value"
  [[sources.opcua.tags]]
  tag = "press7.work_order"
  node = "ns=2;s=WorkOrder"
  kind = "value"
  [[sources.opcua.tags]]
  tag = "press7.qty"
  node = "ns=2;s=Qty"
  kind = "value"
  [[sources.opcua.tags]]
  tag = "press7.state"
  node = "ns=2;s=State"
  kind = "state"
  states = { 0 = "stopped", 1 = "running" }

[mappings.uom]
"g" = "GRM"
"""


def rule(body: str) -> str:
    return BASE + '\n[[transactions]]\nname = "r"\nwhen = "press7.cycle_done"\ntype = "production.completed"\n' + body


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_settings(text)
    return info.value


def test_every_form_parses() -> None:
    settings = parse_settings(
        rule(
            'on = "falling"\n'
            'condition = { tag = "press7.state", in = ["running", 0] }\n'
            'uom = "g"\nuom_to = "KGM"\n'
            'partitionkey = { template = "{press7.work_order}-x" }\n'
            'fields = { work_order = "press7.work_order", quantity = "press7.qty", line = { literal = "L3" }, '
            'batch = { template = "{press7.work_order}/{{n}}" } }\n'
        )
    )
    [parsed] = settings.transactions
    assert parsed.on == "falling"
    assert parsed.condition is not None and parsed.condition.accepted == ["running", 0]
    assert parsed.fields["line"] == FieldLiteral(literal="L3")
    assert parsed.fields["batch"] == FieldTemplate(template="{press7.work_order}/{{n}}")
    assert parsed.read_tags() == {
        "press7.work_order": "fields.work_order",
        "press7.qty": "fields.quantity",
        "press7.state": "condition.tag",
    }
    assert str(parsed.fields["line"]) == "{literal='L3'}"  # what `plantgate check` prints


@pytest.mark.parametrize(
    ("body", "key", "words"),
    [
        ('on = "sideways"\n', "transactions.0.on", "rising"),
        ('fields = { lot = { template = "{press7.nope}" } }\n', "transactions.0.fields.lot", "press7.nope"),
        ('fields = { lot = { template = "{press7.work_order" } }\n', "transactions.0.fields.lot", "lone"),
        ('fields = { lot = { template = "a {} b" } }\n', "transactions.0.fields.lot", "empty placeholder"),
        ('fields = { lot = { literl = "x" } }\n', "transactions.0.fields.lot", "{ literal = ... }"),
        ("fields = { lot = 5 }\n", "transactions.0.fields.lot", "write a tag name"),
        ('partitionkey = "press7.nope"\n', "transactions.0.partitionkey", "not defined"),
        ('condition = { tag = "press7.nope", equals = 1 }\n', "transactions.0.condition.tag", "not defined"),
        ('condition = { tag = "press7.state" }\n', "transactions.0.condition", "exactly one of"),
        ('condition = { tag = "press7.state", equals = 1, in = [2] }\n', "transactions.0.condition", "exactly one"),
        ('condition = { tag = "press7.state", in = [] }\n', "transactions.0.condition.in", "at least 1"),
        ('fields = { quantity = "press7.qty" }\nuom_to = "KGM"\n', "transactions.0.uom", "needs a unit"),
        ('fields = { work_order = "press7.work_order" }\nuom_to = "KGM"\n', "transactions.0.uom_to", "needs"),
        (
            'fields = { quantity = "press7.qty" }\nuom = "g"\nuom_to = "MTR"\n',
            "transactions.0.uom_to",
            "cannot convert GRM (mass) to MTR (length)",
        ),
        (
            'fields = { quantity = "press7.qty" }\nuom = "XYZ"\nuom_to = "KGM"\n',
            "transactions.0.uom_to",
            "unit 'XYZ' has no conversion",
        ),
    ],
)
def test_a_wrong_rule_is_one_error_naming_its_key(body: str, key: str, words: str) -> None:
    error = error_of(rule(body))
    assert error.key == key, str(error)
    assert words in error.message, str(error)


def test_templates_name_their_tags_and_escape_braces() -> None:
    assert template_tags("{a.b}-{ c }{{x}}") == ["a.b", "c"]
    assert template_tags("no placeholders") == []
    with pytest.raises(ValueError, match="lone '}'"):
        template_tags("a}b")


@pytest.mark.parametrize(
    ("source", "target", "value", "expected"),
    [
        ("GRM", "KGM", "1250", "1.25"),
        ("KGM", "GRM", "0.001", "1.000"),
        ("TNE", "KGM", "2.5", "2500.0"),
        ("LBR", "KGM", "1", "0.45359237"),
        ("MMT", "MTR", "5", "0.005"),
        ("CMT", "MMT", "3.2", "32.0"),
        ("MTQ", "LTR", "0.5", "500.0"),
        ("MIN", "HUR", "90", "1.5"),
        ("SEC", "HUR", "1", "0.000277777778"),
        ("PCE", "EA", "7", "7"),
    ],
)
def test_conversions_are_exact_decimals(source: str, target: str, value: str, expected: str) -> None:
    assert conversion(source, target).apply(Decimal(value)) == Decimal(expected)


@given(
    st.sampled_from(sorted(UNITS)),
    st.sampled_from(sorted(UNITS)),
    st.decimals(min_value=0, max_value=10**9, places=6, allow_nan=False, allow_infinity=False),
)
def test_a_conversion_there_and_back_is_within_its_rounding(source: str, target: str, value: Decimal) -> None:
    if UNITS[source].dimension != UNITS[target].dimension:
        with pytest.raises(ValueError, match="cannot convert"):
            conversion(source, target)
        return
    there = conversion(source, target).apply(value)
    back = conversion(target, source).apply(there)
    # Only a quotient with no finite decimal form is rounded (to 12 places), and only once each way.
    assert abs(back - value) <= Decimal("1e-12") * (1 + UNITS[target].factor / UNITS[source].factor)
    assert there >= 0
