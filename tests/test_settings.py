"""The site configuration: TOML parsing, validation errors with key and line, durations, env overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.config_types import format_duration, parse_duration
from agent.settings import (
    ConfigError,
    ItemMapping,
    Settings,
    apply_env_overrides,
    load_settings,
    parse_settings,
)

# The DESIGN.md example without [[sequencing]] (not built yet); its Modbus, barcode, MES and HTTPS
# parts are in DESIGN_PROTOCOLS below.
EXAMPLE = """\
[agent]
site = "plant-01"                 # goes into every event's source and `site` attribute
id = "line3-gw"
data_dir = "/var/lib/plantgate"

[buffer]
path = "buffer.db"
max_size_mb = 2048
telemetry_max_rows = 1000000

[http]
listen = "127.0.0.1:9480"
ingest_token_file = "/run/credentials/plantgate.service/ingest-token"

[[sources.opcua]]
name = "press7"
endpoint = "opc.tcp://10.1.3.7:4840"
security_policy = "None"
security_mode = "None"
publishing_interval = "100ms"

  [[sources.opcua.tags]]
  tag = "press7.temperature"
  node = "ns=2;s=Press7.Temperature"
  kind = "telemetry"
  deadband = 0.5
  aggregate = "10s"

  [[sources.opcua.tags]]
  tag = "press7.state"
  node = "ns=2;s=Press7.State"
  kind = "state"
  states = { 0 = "stopped", 1 = "running", 2 = "fault" }

  [[sources.opcua.tags]]
  tag = "press7.cycle_done"
  node = "ns=2;s=Press7.CycleDone"
  kind = "value"

  [[sources.opcua.tags]]
  tag = "press7.work_order"
  node = "ns=2;s=Press7.WorkOrder"
  kind = "value"

  [[sources.opcua.tags]]
  tag = "press7.item"
  node = "ns=2;s=Press7.Item"
  kind = "value"

  [[sources.opcua.tags]]
  tag = "press7.batch_qty"
  node = "ns=2;s=Press7.BatchQty"
  kind = "value"

  [[sources.opcua.tags]]
  tag = "press7.cycle_ack"
  node = "ns=2;s=Press7.CycleAck"
  kind = "value"

[[sources.opcua]]
name = "filler2"
endpoint = "opc.tcp://10.1.3.20:4840"

  [[sources.opcua.tags]]
  tag = "filler2.good_count"
  node = "ns=2;s=Filler2.GoodCount"
  kind = "counter"

  [[sources.opcua.tags]]
  tag = "filler2.speed"
  node = "ns=2;s=Filler2.Speed"

[[transactions]]
name = "press7-completion"
when = "press7.cycle_done"
type = "production.completed"
fields = { work_order = "press7.work_order", item = "press7.item", quantity = "press7.batch_qty" }
uom = "EA"
ack = "press7.cycle_ack"

[mappings.items]
"P-100-OLD" = { obsolete = true }
"FILL-500" = "40012345000017"

[mappings.uom]
"pcs" = "EA"
"kg" = "KGM"

[[sinks.mqtt]]
name = "cloud"
url = "mqtts://broker.example.com:8883"
client_id = "plantgate-line3-gw"
topic_prefix = "plantgate/plant-01"
qos = 1
lanes = ["transaction", "operational", "telemetry"]
max_rate = 2000

[[sinks.mqtt]]
name = "backup"
url = "mqtts://backup.example.com:8883"
lanes = ["transaction"]

[[sinks.jsonl]]
name = "archive"
path = "archive/events.jsonl"
lanes = ["transaction"]
"""

SMALL = """\
[agent]
site = "plant-01"
id = "gw"

[[sources.opcua]]
name = "press7"
endpoint = "opc.tcp://127.0.0.1:4840"

  [[sources.opcua.tags]]
  tag = "press7.temperature"
  node = "ns=2;s=Press7.Temperature"
"""


def parse(text: str, environ: dict[str, str] | None = None) -> Settings:
    return parse_settings(text, path=Path("site.toml"), environ=environ or {})


def config_error(text: str, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text, environ)
    return info.value


def line_number(text: str, needle: str, occurrence: int = 1) -> int:
    """The 1-based line of the ``occurrence``-th line containing ``needle``."""
    found = [n for n, line in enumerate(text.splitlines(), start=1) if needle in line]
    assert len(found) >= occurrence, f"{needle!r} not in the text {occurrence} times"
    return found[occurrence - 1]


def replace_line(text: str, needle: str, new: str, occurrence: int = 1) -> str:
    lines = text.splitlines()
    lines[line_number(text, needle, occurrence) - 1] = new
    return "\n".join(lines) + "\n"


def insert_after(text: str, needle: str, new: str, occurrence: int = 1) -> str:
    lines = text.splitlines()
    lines.insert(line_number(text, needle, occurrence), new)
    return "\n".join(lines) + "\n"


# --- the example --------------------------------------------------------------------------------


DESIGN_PROTOCOLS = """
[[sources.modbus]]
name = "filler3"
endpoint = "tcp://10.1.3.20:502"
unit = 1
poll_interval = "250ms"

  [[sources.modbus.tags]]
  tag = "filler3.good_count"
  register = "holding:100"
  type = "uint32"
  word_order = "big"
  scale = 1.0
  kind = "counter"

[[sources.modbus]]
name = "filler4"
endpoint = "rtu:///dev/ttyUSB0?baudrate=19200&parity=E"
unit = 2

  [[sources.modbus.tags]]
  tag = "filler4.speed"
  register = "input:3"

[[sources.barcode]]
name = "dock1"
mode = "tcp-server"
listen = "0.0.0.0:9101"
station = "receiving-dock-1"
event = "goods.received"

[[sources.mes]]
name = "mes"
mode = "webhook"

[[sinks.https]]
name = "erp-middleware"
url = "https://middleware.example.com/v1/events"
lanes = ["transaction"]
batch_max = 500
"""


def test_the_design_examples_of_every_protocol_parse() -> None:
    settings = parse(EXAMPLE + DESIGN_PROTOCOLS)
    filler3, filler4 = settings.sources.modbus
    assert (filler3.unit, filler3.poll_interval) == (1, 0.25)
    assert filler3.tag_configs()[0].kind == "counter"
    assert filler3.tag_configs()[0].counter_spec().bits == 32
    assert filler4.unit == 2 and not filler4.tag_configs()[0].writable
    [dock] = settings.sources.barcode
    assert (dock.mode, dock.station, dock.event) == ("tcp-server", "receiving-dock-1", "goods.received")
    [mes] = settings.sources.mes
    assert mes.mode == "webhook"
    [erp] = settings.sinks.https
    assert (erp.batch_max, erp.lanes) == (500, ["transaction"])


def test_the_example_config_parses() -> None:
    settings = parse(EXAMPLE)
    assert settings.agent.site == "plant-01"
    assert settings.agent.id == "line3-gw"
    assert settings.data_path(settings.buffer.path) == Path("/var/lib/plantgate/buffer.db")
    assert settings.data_path(Path("/abs/file")) == Path("/abs/file")
    assert settings.buffer.telemetry_max_rows == 1_000_000
    assert settings.http.ingest_token_file == Path("/run/credentials/plantgate.service/ingest-token")
    press7, filler2 = settings.sources.opcua
    assert press7.publishing_interval == pytest.approx(0.1)
    temperature, state = press7.tags[0], press7.tags[1]
    assert (temperature.kind, temperature.deadband, temperature.aggregate) == ("telemetry", 0.5, 10.0)
    assert state.states == {"0": "stopped", "1": "running", "2": "fault"}
    assert filler2.tags[0].kind == "counter"
    assert filler2.tags[1].kind == "telemetry"  # the default kind
    [rule] = settings.transactions
    assert rule.type == "production.completed"
    assert rule.fields == {"work_order": "press7.work_order", "item": "press7.item", "quantity": "press7.batch_qty"}
    assert (rule.uom, rule.ack) == ("EA", "press7.cycle_ack")
    assert settings.mappings.items["FILL-500"] == "40012345000017"
    assert settings.mappings.items["P-100-OLD"] == ItemMapping(obsolete=True)
    assert settings.mappings.uom == {"pcs": "EA", "kg": "KGM"}
    assert settings.mappings.unknown_items == "pass"
    cloud, backup = settings.sinks.mqtt
    assert (cloud.name, cloud.qos, cloud.max_rate, cloud.lanes) == (
        "cloud",
        1,
        2000,
        ["transaction", "operational", "telemetry"],
    )
    assert backup.lanes == ["transaction"]
    assert settings.sinks.jsonl[0].path == Path("archive/events.jsonl")
    assert settings.tag_owner()["filler2.speed"] == "filler2"


REPO = Path(__file__).resolve().parent.parent


def test_the_shipped_example_config_parses() -> None:
    settings = load_settings(REPO / "config" / "plantgate.example.toml", environ={})
    assert settings.agent.site == "plant-01"
    assert settings.sources.opcua, "the example shows at least one source"
    assert settings.sinks.mqtt or settings.sinks.jsonl
    overridden = load_settings(
        REPO / "config" / "plantgate.example.toml", environ={"PLANTGATE__AGENT__SITE": "plant-02"}
    )
    assert overridden.agent.site == "plant-02"


def test_the_shipped_config_schema_is_up_to_date() -> None:
    """config/plantgate.schema.json is what `plantgate schema config` prints (regenerate it when settings change)."""
    shipped = json.loads((REPO / "config" / "plantgate.schema.json").read_text(encoding="utf-8"))
    assert shipped == Settings.model_json_schema()


def test_a_transaction_type_may_carry_the_prefix() -> None:
    text = EXAMPLE.replace('type = "production.completed"', 'type = "io.plantgate.production.completed"')
    assert parse(text).transactions[0].type == "production.completed"


def test_load_settings_reads_the_file_and_names_it_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "plantgate.toml"
    path.write_text(EXAMPLE, encoding="utf-8")
    assert load_settings(path, environ={}).agent.site == "plant-01"
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "missing.toml", environ={})
    assert str(info.value).startswith(f"{tmp_path / 'missing.toml'}: ")
    assert "cannot read" in str(info.value)


# --- errors name the key and the line ------------------------------------------------------------


@pytest.mark.parametrize(
    ("needle", "occurrence", "new_line", "key"),
    [
        ('id = "line3-gw"', 1, 'colour = "blue"', "agent.colour"),
        ("telemetry_max_rows", 1, "max_rows = 5", "buffer.max_rows"),
        ('node = "ns=2;s=Press7.State"', 1, 'unit = "bar"', "sources.opcua.0.tags.1.unit"),
        ('node = "ns=2;s=Filler2.Speed"', 1, "dead_band = 1", "sources.opcua.1.tags.1.dead_band"),
        ('url = "mqtts://backup.example.com:8883"', 1, "retain = true", "sinks.mqtt.1.retain"),
        ('uom = "EA"', 1, 'owner = "me"', "transactions.0.owner"),
    ],
)
def test_an_unknown_key_names_its_path_and_line(needle: str, occurrence: int, new_line: str, key: str) -> None:
    text = insert_after(EXAMPLE, needle, new_line, occurrence)
    error = config_error(text)
    assert error.key == key
    assert error.line == line_number(text, new_line)
    assert str(error).startswith(f"site.toml:{error.line}: {key}: unknown key")  # maybe with "did you mean"


def test_an_unknown_section_names_its_line() -> None:
    text = EXAMPLE + "\n[telemetry]\nrate = 5\n"
    error = config_error(text)
    assert error.key == "telemetry"
    assert error.line == line_number(text, "[telemetry]")


@pytest.mark.parametrize(
    ("needle", "new_line", "key", "words"),
    [
        ("telemetry_max_rows", 'telemetry_max_rows = "many"', "buffer.telemetry_max_rows", "integer"),
        ("qos = 1", "qos = 2", "sinks.mqtt.0.qos", "1"),
        ('kind = "counter"', 'kind = "gauge"', "sources.opcua.1.tags.0.kind", "telemetry"),
        ("deadband = 0.5", "deadband = -1", "sources.opcua.0.tags.0.deadband", "greater than or equal"),
        ('lanes = ["transaction"]', 'lanes = ["transactions"]', "sinks.mqtt.1.lanes.0", "transaction"),
        ('endpoint = "opc.tcp://10.1.3.20:4840"', 'endpoint = "http://10.1.3.20"', "sources.opcua.1.endpoint", ""),
    ],
)
def test_a_wrong_value_names_its_key_and_line(needle: str, new_line: str, key: str, words: str) -> None:
    text = replace_line(EXAMPLE, needle, new_line)
    error = config_error(text)
    assert error.key == key
    assert error.line == line_number(text, new_line)
    assert words in error.message
    assert str(error).startswith(f"site.toml:{error.line}: {key}: ")
    assert "\n" not in str(error)


def test_a_missing_required_key() -> None:
    error = config_error(EXAMPLE.replace('site = "plant-01"', ""))
    assert error.key == "agent.site"
    assert error.message == "required key is missing"


@pytest.mark.parametrize(
    "broken",
    ['site = "unterminated', "site = plant-01", "[limits", "site = = 1", 'id = "a"\nid = "b"'],
)
def test_a_toml_syntax_error_names_its_line(broken: str) -> None:
    text = replace_line(EXAMPLE, 'site = "plant-01"', broken)
    error = config_error(text)
    expected_line = line_number(text, broken.splitlines()[-1])  # TOML reports the line where it gave up
    assert error.line == expected_line
    assert "TOML syntax error" in error.message
    assert str(error).startswith(f"site.toml:{error.line}: TOML syntax error")
    assert "(at line" not in str(error)


# --- durations ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("10s", 10.0), ("5m", 300.0), ("1h", 3600.0), ("1.5s", 1.5), (" 250ms ", 0.25)],
)
def test_durations_parse(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_a_duration_without_a_unit_names_both_readings() -> None:
    # Someone meaning 200 ms who writes 200 must not get 200 s.
    with pytest.raises(ValueError, match=r'200 has no unit; write the duration as "200s" or "200ms"'):
        parse_duration(200)


@pytest.mark.parametrize(
    "text", ["10 sec", "5x", "-1s", "", "ms", "1d", "1,5s", "five minutes", True, None, -3, 2, 0.2, "200"]
)
def test_bad_durations_are_errors(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(("seconds", "text"), [(0.5, "500ms"), (10.0, "10s"), (300.0, "5m"), (90.0, "90s")])
def test_durations_format_back(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


def test_durations_in_the_config() -> None:
    text = SMALL.replace(
        'endpoint = "opc.tcp://127.0.0.1:4840"',
        'endpoint = "opc.tcp://127.0.0.1:4840"\n'
        'publishing_interval = "500ms"\ntimeout = "10s"\nreconnect_max_backoff = "5m"',
    )
    source = parse(text).sources.opcua[0]
    assert (source.publishing_interval, source.timeout, source.reconnect_max_backoff) == (0.5, 10.0, 300.0)
    broken = text.replace('"500ms"', '"half a second"')
    error = config_error(broken)
    assert error.key == "sources.opcua.0.publishing_interval"
    assert error.line == line_number(broken, "half a second")
    assert "duration" in error.message


# --- environment overrides ------------------------------------------------------------------------


def test_env_overrides_a_section_key() -> None:
    settings = parse(EXAMPLE, {"PLANTGATE__AGENT__SITE": "plant-02", "PLANTGATE__BUFFER__TELEMETRY_MAX_ROWS": "500"})
    assert settings.agent.site == "plant-02"
    assert settings.buffer.telemetry_max_rows == 500


def test_env_reaches_list_items_by_name_and_by_index() -> None:
    settings = parse(
        EXAMPLE,
        {
            "PLANTGATE__SINKS__MQTT__CLOUD__QOS": "0",
            "PLANTGATE__SINKS__MQTT__1__MAX_RATE": "50",
            "PLANTGATE__SINKS__MQTT__0__TOPIC_PREFIX": "plantgate/elsewhere",
            "PLANTGATE__SOURCES__OPCUA__FILLER2__TAGS__1__DEADBAND": "0.25",
            "PLANTGATE__SINKS__MQTT__BACKUP__LANES": '["transaction", "operational"]',
        },
    )
    cloud, backup = settings.sinks.mqtt
    assert cloud.qos == 0
    assert cloud.topic_prefix == "plantgate/elsewhere"
    assert backup.max_rate == 50
    assert backup.lanes == ["transaction", "operational"]
    assert settings.sources.opcua[1].tags[1].deadband == 0.25
    # nothing else moved
    assert cloud.max_rate == 2000
    assert settings.sources.opcua[0].tags[0].deadband == 0.5


def test_env_secrets_stay_strings() -> None:
    text = EXAMPLE.replace('client_id = "plantgate-line3-gw"', 'client_id = "plantgate-line3-gw"\nusername = "gw"')
    settings = parse(text, {"PLANTGATE__SINKS__MQTT__CLOUD__PASSWORD": "12345"})
    password = settings.sinks.mqtt[0].password
    assert password is not None
    assert password.get_secret_value() == "12345"
    assert "12345" not in repr(settings.sinks.mqtt[0])
    settings = parse(text, {"PLANTGATE__SINKS__MQTT__CLOUD__PASSWORD": "true"})
    assert settings.sinks.mqtt[0].password is not None
    assert settings.sinks.mqtt[0].password.get_secret_value() == "true"


def test_env_from_the_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "plantgate.toml"
    path.write_text(EXAMPLE, encoding="utf-8")
    monkeypatch.setenv("PLANTGATE__AGENT__ID", "line4-gw")
    monkeypatch.setenv("PLANTGATE_CONFIG", str(path))  # one underscore: not an override
    assert load_settings(path).agent.id == "line4-gw"


def test_env_naming_a_missing_list_item_is_an_error() -> None:
    error = config_error(EXAMPLE, {"PLANTGATE__SINKS__MQTT__NOWHERE__QOS": "0"})
    assert error.key == "environment"
    assert "PLANTGATE__SINKS__MQTT__NOWHERE__QOS" in error.message
    error = config_error(EXAMPLE, {"PLANTGATE__SINKS__MQTT__7__QOS": "0"})
    assert "PLANTGATE__SINKS__MQTT__7__QOS" in error.message


def test_env_with_an_unknown_key_or_a_bad_value_is_an_error() -> None:
    error = config_error(EXAMPLE, {"PLANTGATE__AGENT__COLOUR": "blue"})
    assert (error.key, error.message) == ("agent.colour", "unknown key (set by PLANTGATE__AGENT__COLOUR)")
    assert error.line is None, "the value came from the environment, not from a line of the file"
    error = config_error(EXAMPLE, {"PLANTGATE__SINKS__MQTT__CLOUD__QOS": "7"})
    assert error.key == "sinks.mqtt.0.qos"
    assert "PLANTGATE__SINKS__MQTT__CLOUD__QOS" in error.message


def test_env_overrides_do_not_touch_other_variables() -> None:
    data: dict[str, object] = {"agent": {"site": "a"}}
    apply_env_overrides(data, {"PATH": "/bin", "PLANTGATE_CONFIG": "/x.toml", "PLANTGATE__": "ignored"})
    assert data == {"agent": {"site": "a"}}


@pytest.mark.parametrize(("name", "value"), [("PLANTGATE__AGENT__SITE", "1001"), ("PLANTGATE__AGENT__ID", "42")])
def test_env_numeric_looking_values_of_string_keys(name: str, value: str) -> None:
    settings = parse(EXAMPLE, {name: value})
    assert value in (settings.agent.site, settings.agent.id)


# --- cross references -----------------------------------------------------------------------------


def test_a_rule_trigger_must_be_a_defined_tag() -> None:
    text = EXAMPLE.replace('when = "press7.cycle_done"', 'when = "press7.cycle_donee"')
    error = config_error(text)
    assert error.key == "transactions.0.when"
    assert "press7.cycle_donee" in error.message
    assert error.line == line_number(text, "press7.cycle_donee")


def test_rule_fields_and_ack_must_be_defined_tags() -> None:
    error = config_error(EXAMPLE.replace('item = "press7.item"', 'item = "press7.itme"'))
    assert error.key == "transactions.0.fields.item"
    assert "press7.itme" in error.message
    error = config_error(EXAMPLE.replace('ack = "press7.cycle_ack"', 'ack = "press7.ack"'))
    assert error.key == "transactions.0.ack"


def test_a_tag_defined_by_two_sources_is_an_error() -> None:
    text = EXAMPLE.replace('tag = "filler2.speed"', 'tag = "press7.temperature"')
    error = config_error(text)
    assert "press7.temperature" in error.message
    assert "press7" in error.message and "filler2" in error.message


def test_a_tag_twice_in_one_source_is_an_error() -> None:
    text = EXAMPLE.replace('tag = "press7.item"', 'tag = "press7.work_order"')
    error = config_error(text)
    assert error.key == "sources.opcua.0.tags"
    assert "press7.work_order" in error.message


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('name = "backup"', 'name = "cloud"'),
        ('name = "archive"', 'name = "backup"'),  # across protocols too
    ],
)
def test_sink_names_are_unique(old: str, new: str) -> None:
    error = config_error(EXAMPLE.replace(old, new))
    assert error.key == "sinks"
    assert "used twice" in error.message


def test_source_names_are_unique() -> None:
    error = config_error(EXAMPLE.replace('name = "filler2"', 'name = "press7"'))
    assert error.key == "sources"


@pytest.mark.parametrize("field", ["quantity", "scrap_quantity"])
def test_a_quantity_field_needs_a_uom(field: str) -> None:
    text = EXAMPLE.replace('uom = "EA"\n', "").replace("quantity = ", f"{field} = ")
    error = config_error(text)
    assert error.key == "transactions.0.uom"
    assert "uom" in error.message
    assert error.line == line_number(text, "[[transactions]]")


def test_a_rule_type_must_be_a_transaction_type() -> None:
    text = EXAMPLE.replace('type = "production.completed"', 'type = "machine.state.changed"')
    error = config_error(text)
    assert error.key == "transactions.0.type"
    assert "production.completed" in error.message  # the valid choices are listed


def test_tag_options_must_fit_the_kind() -> None:
    text = EXAMPLE.replace('kind = "counter"', 'kind = "counter"\n  deadband = 1.0')
    error = config_error(text)
    assert error.key == "sources.opcua.1.tags.0"
    assert "deadband" in error.message


def test_a_scanner_work_order_tag_must_be_defined_by_a_source() -> None:
    error = config_error(
        """
[agent]
site = "s"
id = "a"

[[sources.barcode]]
name = "dock1"
mode = "tcp-server"
listen = "127.0.0.1:9101"
station = "dock-1"
event = "goods.received"
work_order_tag = "press7.work_orderr"
"""
    )
    assert "sources.barcode.0.work_order_tag" in str(error) and "press7.work_orderr" in str(error)


def test_a_plc_ack_on_a_read_only_modbus_table_is_a_config_error() -> None:
    error = config_error(
        """
[agent]
site = "s"
id = "a"

[[sources.modbus]]
name = "filler2"
endpoint = "tcp://127.0.0.1:5020"

  [[sources.modbus.tags]]
  tag = "filler2.cycle_done"
  register = "coil:0"
  kind = "value"

  [[sources.modbus.tags]]
  tag = "filler2.cycle_ack"
  register = "discrete:1"
  kind = "value"

[[transactions]]
name = "filler2-output"
when = "filler2.cycle_done"
type = "production.completed"
fields = { work_order = "filler2.cycle_done" }
ack = "filler2.cycle_ack"
"""
    )
    assert "transactions.0.ack" in str(error) and "cannot be written" in str(error)
