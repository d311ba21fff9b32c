"""Config ergonomics: ``plantgate check --connect`` against real peers, ``plantgate browse``, did-you-mean,
the risky-setting warnings, and every config file under ``config/`` passing ``plantgate check``.

The pre-flight runs as the installed console script in a child process (asyncio
subprocess), while the peers (an asyncua server, a pymodbus server, mosquitto) run
in the test's event loop or as their own processes on loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from asyncua import ua

from agent.cli import main
from agent.settings import ConfigError, parse_settings
from agent.simulator import PressSimulator
from tests.peers.modbus_server import ModbusPeer
from tests.peers.mosquitto import MosquittoBroker
from tests.peers.opcua_server import make_certificate

PLANTGATE = str(Path(sys.executable).parent / "plantgate")
ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^(ok|warning|error)\s+(sources|sinks)\.[a-z]+\.[\w.-]+( .*)?: .+$")

CONFIG = """\
[agent]
site = "plant-01"
id = "line3-gw"
data_dir = "{data_dir}"

[[sources.opcua]]
name = "press7"
endpoint = "{opcua}"
timeout = "2s"

  [[sources.opcua.tags]]
  tag = "press7.temperature"
  node = "ns=2;s=Press7.Temperature"
  deadband = 0.5

  [[sources.opcua.tags]]
  tag = "press7.state"
  node = "ns=2;s=Press7.State"
  kind = "state"

  [[sources.opcua.tags]]
  tag = "press7.cycle_done"
  node = "ns=2;s=Press7.CycleDone"
  kind = "value"

  [[sources.opcua.tags]]
  tag = "press7.cycle_ack"
  node = "ns=2;s=Press7.CycleAck"
  kind = "value"
{opcua_extra}
[[sources.modbus]]
name = "filler2"
endpoint = "{modbus}"
timeout = "500ms"

  [[sources.modbus.tags]]
  tag = "filler2.good_count"
  register = "holding:10"
  type = "uint32"
  kind = "counter"
{modbus_extra}
[[transactions]]
name = "press7-completion"
when = "press7.cycle_done"
type = "production.completed"
ack = "press7.cycle_ack"
{rules_extra}
[[sinks.mqtt]]
name = "cloud"
url = "{mqtt}"
username = "plantgate"
password_file = "{password_file}"
"""

BAD_OPCUA = """
  [[sources.opcua.tags]]
  tag = "press7.locked_ack"
  node = "ns=2;s=Press7.LockedAck"
  kind = "value"

  [[sources.opcua.tags]]
  tag = "press7.missing"
  node = "ns=2;s=Press7.NoSuchVariable"

  [[sources.opcua.tags]]
  tag = "press7.batch_count"
  node = "ns=2;s=Press7.BatchQty"
  kind = "counter"
"""

BAD_MODBUS = """
  [[sources.modbus.tags]]
  tag = "filler2.beyond"
  register = "holding:600"
"""

BAD_RULES = """
[[transactions]]
name = "press7-locked"
when = "press7.temperature"
type = "scrap.declared"
ack = "press7.locked_ack"
"""


async def _plantgate(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        PLANTGATE, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    try:
        async with asyncio.timeout(60):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def _findings(stdout: str) -> list[str]:
    """The pre-flight lines (after the summary's blank line), without the closing count."""
    _, _, tail = stdout.partition("\n\n")
    return [line for line in tail.splitlines() if line and not line.startswith("pre-flight:")]


def _one(lines: list[str], *needles: str) -> str:
    found = [line for line in lines if all(needle in line for needle in needles)]
    assert len(found) == 1, (needles, lines)
    return found[0]


async def test_check_connect_reports_one_line_per_finding_and_exits_by_severity(
    tmp_path: Path, press_server: PressSimulator, mosquitto_factory: Callable[..., MosquittoBroker]
) -> None:
    await press_server.add_variable("LockedAck", False, ua.VariantType.Boolean)  # read-only by default
    broker = mosquitto_factory(users={"plantgate": "right-password"})
    modbus = ModbusPeer(size=512)
    modbus.set("holding", 10, [0, 1234])
    async with modbus.tcp():
        common = {
            "data_dir": tmp_path,
            "opcua": press_server.endpoint,
            "modbus": modbus.endpoint,
            "mqtt": broker.url,
        }
        good_secret = tmp_path / "good-password"
        good_secret.write_text("right-password\n", encoding="utf-8")
        bad_secret = tmp_path / "bad-password"
        bad_secret.write_text("wrong-password\n", encoding="utf-8")
        for secret in (good_secret, bad_secret):
            secret.chmod(0o600)
        good = tmp_path / "good.toml"
        good.write_text(
            CONFIG.format(**common, opcua_extra="", modbus_extra="", rules_extra="", password_file=good_secret),
            encoding="utf-8",
        )
        bad = tmp_path / "bad.toml"
        bad.write_text(
            CONFIG.format(
                **common,
                opcua_extra=BAD_OPCUA,
                modbus_extra=BAD_MODBUS,
                rules_extra=BAD_RULES,
                password_file=bad_secret,
            ),
            encoding="utf-8",
        )
        (good_code, good_out, good_err), (bad_code, bad_out, bad_err) = await asyncio.gather(
            _plantgate("check", "-c", str(good), "--connect", "--timeout", "20"),
            _plantgate("check", "-c", str(bad), "--connect", "--timeout", "20"),
        )

    assert good_code == 0, good_out + good_err
    lines = _findings(good_out)
    assert lines and all(LINE.match(line) for line in lines), lines
    assert all(line.startswith("ok ") for line in lines), lines
    _one(lines, "sources.opcua.press7:", "session open on", press_server.endpoint)
    _one(lines, "tag press7.temperature (ns=2;s=Press7.Temperature)", "Double, read")
    _one(lines, "tag press7.cycle_ack (ns=2;s=Press7.CycleAck)", "Boolean, read/write")
    _one(lines, "sources.modbus.filler2:", "connected to")
    _one(lines, "tag filler2.good_count (holding:10 unit 1)", "uint32 = 1234")
    _one(lines, "sinks.mqtt.cloud:", "CONNACK accepted")
    assert good_out.rstrip().endswith("pre-flight: 8 ok, 0 warnings, 0 errors"), good_out

    assert bad_code == 1, bad_out + bad_err
    lines = _findings(bad_out)
    assert all(LINE.match(line) for line in lines), lines
    assert _one(lines, "tag press7.locked_ack").startswith("error ")
    assert "read-only" in _one(lines, "tag press7.locked_ack")
    assert "BadNodeIdUnknown" in _one(lines, "tag press7.missing (ns=2;s=Press7.NoSuchVariable)")
    assert _one(lines, "tag press7.missing").startswith("error ")
    wrong_type = _one(lines, "tag press7.batch_count (ns=2;s=Press7.BatchQty)")
    assert wrong_type.startswith("error ") and "counter needs an integer data type, not Double" in wrong_type
    beyond = _one(lines, "tag filler2.beyond (holding:600 unit 1)")
    assert beyond.startswith("error ") and "exception 2 (illegal data address)" in beyond
    refused = _one(lines, "sinks.mqtt.cloud:")
    assert refused.startswith("error ") and "refused" in refused and "Not authorized" in refused
    assert "wrong-password" not in bad_out + bad_err
    assert _one(lines, "tag press7.temperature").startswith("ok ")  # the good ones still pass
    assert "pre-flight:" in bad_out and "5 errors" in bad_out


async def test_check_connect_names_an_unreachable_server_and_the_summary_still_prints(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("x", encoding="utf-8")
    secret.chmod(0o600)
    closed = "127.0.0.1:1"  # nothing listens on port 1 of loopback
    path = tmp_path / "site.toml"
    path.write_text(
        CONFIG.format(
            data_dir=tmp_path,
            opcua=f"opc.tcp://{closed}",
            modbus=f"tcp://{closed}",
            mqtt=f"mqtt://{closed}",
            opcua_extra="",
            modbus_extra="",
            rules_extra="",
            password_file=secret,
        ),
        encoding="utf-8",
    )
    code, out, err = await _plantgate("check", "-c", str(path), "--connect", "--timeout", "10")
    assert code == 1, out + err
    assert f"{path}: valid" in out  # the ordinary summary comes first
    lines = _findings(out)
    assert len(lines) == 3, lines  # one line per unreachable component, no per-tag noise
    assert all(line.startswith("error ") for line in lines), lines
    _one(lines, "sources.opcua.press7:", "cannot open a session")
    _one(lines, "sources.modbus.filler2:", "cannot connect")
    _one(lines, "sinks.mqtt.cloud:", "connection refused")
    assert "Traceback" not in out + err


EDGE = """\
[agent]
site = "plant-01"
id = "edge-gw"
data_dir = "{data_dir}"

[[sources.mes]]
name = "mes-right"
mode = "poll"
url = "{mes_url}"
bearer_token_file = "mes-token"
cursor_field = "$.id"

[[sources.mes]]
name = "mes-wrong"
mode = "poll"
url = "{mes_url}"
bearer_token_file = "wrong-token"
cursor_field = "$.id"

[[sources.barcode]]
name = "scanner-away"
mode = "tcp-client"
connect = "127.0.0.1:1"
station = "dock-1"

[[sources.barcode]]
name = "dock-free"
mode = "tcp-server"
listen = "127.0.0.1:{free_port}"
station = "dock-2"

[[sources.barcode]]
name = "dock-taken"
mode = "tcp-server"
listen = "127.0.0.1:{taken_port}"
station = "dock-3"

[[sources.barcode]]
name = "usb-scanner"
mode = "serial"
device = "{tmp}/no-such-tty"
station = "dock-4"

[[sinks.https]]
name = "erp"
url = "{https_url}"
ca_file = "{ca_file}"
lanes = ["transaction"]
oauth2 = {{ token_url = "{token_url}", client_id = "gw", client_secret_file = "client-secret" }}

[[sinks.https]]
name = "erp-bad-secret"
url = "{https_url}"
ca_file = "{ca_file}"
lanes = ["transaction"]
oauth2 = {{ token_url = "{token_url}", client_id = "gw", client_secret_file = "wrong-secret" }}

[[sinks.https]]
name = "erp-other-ca"
url = "{https_url}"
ca_file = "{other_ca}"
lanes = ["operational"]

[[sinks.jsonl]]
name = "file"
path = "events.jsonl"
lanes = ["telemetry"]
"""


async def test_check_connect_reaches_https_receivers_mes_and_scanners(tmp_path: Path) -> None:
    from tests.peers.https_server import Certificates, HttpsReceiver, TokenIssuer
    from tests.peers.mes_server import MesRestServer

    secrets = {
        "mes-token": "mes-t0ken",
        "wrong-token": "nope",
        "client-secret": "right-secret",
        "wrong-secret": "not-it",
    }
    for name, value in secrets.items():
        (tmp_path / name).write_text(value + "\n", encoding="utf-8")
        (tmp_path / name).chmod(0o600)
    certs = Certificates(tmp_path / "certs")
    other = trustme.CA()
    other_ca = tmp_path / "other-ca.pem"
    other.cert_pem.write_to_path(str(other_ca))
    issuer = TokenIssuer("gw", "right-secret")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    free_port = free.getsockname()[1]
    free.close()
    with taken, HttpsReceiver(certs, token_issuer=issuer) as receiver:
        async with MesRestServer(records=3, token="mes-t0ken") as mes:
            path = tmp_path / "edge.toml"
            path.write_text(
                EDGE.format(
                    data_dir=tmp_path,
                    tmp=tmp_path,
                    mes_url=mes.url,
                    free_port=free_port,
                    taken_port=taken.getsockname()[1],
                    https_url=receiver.url,
                    token_url=receiver.token_url,
                    ca_file=certs.ca_file,
                    other_ca=other_ca,
                ),
                encoding="utf-8",
            )
            code, out, err = await _plantgate("check", "-c", str(path), "--connect", "--timeout", "20")
    assert code == 1, out + err
    lines = _findings(out)
    assert all(LINE.match(line) for line in lines), lines
    assert _one(lines, "sources.mes.mes-right:").startswith("ok ")
    assert "HTTP 200, JSON" in _one(lines, "sources.mes.mes-right:")
    wrong = _one(lines, "sources.mes.mes-wrong:")
    assert wrong.startswith("error ") and "HTTP 401" in wrong and "refuses the credentials" in wrong
    assert _one(lines, "sources.barcode.scanner-away:").startswith("error ")
    assert "connection refused" in _one(lines, "sources.barcode.scanner-away:")
    assert _one(lines, "sources.barcode.dock-free:", "can be bound").startswith("ok ")
    assert _one(lines, "sources.barcode.dock-taken:", "in use").startswith("warning ")
    assert _one(lines, "sources.barcode.usb-scanner:", "cannot open").startswith("error ")
    assert _one(lines, "sinks.https.erp:", "OAuth2 token obtained").startswith("ok ")
    receiver_line = _one(lines, "sinks.https.erp:", "OPTIONS")
    assert receiver_line.startswith("ok ") and "TLS verified" in receiver_line and "with 204" in receiver_line
    no_token = _one(lines, "sinks.https.erp-bad-secret:", "no OAuth2 token")
    assert no_token.startswith("error ") and "401" in no_token
    other_line = _one(lines, "sinks.https.erp-other-ca:")
    assert other_line.startswith("error ") and "certificate" in other_line.lower()
    assert _one(lines, "sinks.jsonl.file:").startswith("ok ")
    for value in secrets.values():
        assert value not in out + err


async def test_check_connect_names_a_refused_opcua_identity(tmp_path: Path) -> None:
    secret = tmp_path / "opcua-password"
    secret.write_text("wrong-password\n", encoding="utf-8")
    secret.chmod(0o600)
    text = CONFIG.format(
        data_dir=tmp_path,
        opcua="{opcua}",
        modbus="tcp://127.0.0.1:1",
        mqtt="mqtt://127.0.0.1:1",
        opcua_extra="",
        modbus_extra="",
        rules_extra="",
        password_file=secret,
    )
    # Only the OPC UA source: with a user whose password the server does not take.
    text = text[: text.index("[[sources.modbus]]")]
    text = text.replace('timeout = "2s"', f'timeout = "2s"\nusername = "plantgate"\npassword_file = "{secret}"')
    async with PressSimulator(port=0, users={"plantgate": "right-password"}) as press:
        path = tmp_path / "site.toml"
        path.write_text(text.replace("{opcua}", press.endpoint), encoding="utf-8")
        code, out, err = await _plantgate("check", "-c", str(path), "--connect", "--timeout", "15")
    assert code == 1, out + err
    lines = _findings(out)
    assert len(lines) == 1, lines
    assert lines[0].startswith("error   sources.opcua.press7: cannot open a session on"), lines
    assert "Bad" in lines[0]  # the server's status code, by name
    assert "wrong-password" not in out + err
    assert "password sent with security_mode None" in err  # the check's own warning still shows


async def test_browse_shows_node_ids_data_types_and_access(press_server: PressSimulator) -> None:
    await press_server.add_variable("Recipe", 7, ua.VariantType.UInt16)
    (code, out, err), (json_code, json_out, json_err) = await asyncio.gather(
        _plantgate("browse", press_server.endpoint),
        _plantgate("browse", press_server.endpoint, "--json"),
    )
    assert code == 0, out + err
    temperature = _one(out.splitlines(), "ns=2;s=Press7.Temperature")
    assert temperature.split() == ["Temperature", "ns=2;s=Press7.Temperature", "Double", "read"]
    assert _one(out.splitlines(), "ns=2;s=Press7.CycleAck").split()[-2:] == ["Boolean", "read/write"]
    assert _one(out.splitlines(), "ns=2;s=Press7.Recipe").split()[-2:] == ["UInt16", "read"]
    assert "i=2253" not in out, "the standard Server object is left out"

    assert json_code == 0, json_out + json_err
    tree = json.loads(json_out)
    assert tree["namespaces"][2] == "urn:plantgate:simulator:press7"
    press = next(node for node in tree["root"]["children"] if node["node_id"] == "ns=2;s=Press7")
    variables = {node["node_id"]: node for node in press["children"]}
    assert variables["ns=2;s=Press7.Temperature"]["data_type"] == "Double"
    assert variables["ns=2;s=Press7.Temperature"]["access"] == "read"
    assert variables["ns=2;s=Press7.CycleAck"]["access"] == "read/write"
    assert variables["ns=2;s=Press7.Temperature"]["node_class"] == "Variable"


async def test_browse_of_a_configured_source_uses_its_security_and_identity(tmp_path: Path) -> None:
    from agent.simulator import APPLICATION_URI

    server_cert, server_key = make_certificate(tmp_path, "server", APPLICATION_URI, server=True)
    client_cert, client_key = make_certificate(tmp_path, "agent", "urn:plantgate:line3-gw", server=False)
    secret = tmp_path / "opcua-password"
    secret.write_text("right-password\n", encoding="utf-8")
    secret.chmod(0o600)
    press = PressSimulator(
        port=0,
        certificate=server_cert,
        private_key=server_key,
        security_policies=["Basic256Sha256_SignAndEncrypt"],
        users={"plantgate": "right-password"},
    )
    async with press:
        path = tmp_path / "site.toml"
        path.write_text(
            f"""[agent]
site = "plant-01"
id = "line3-gw"
data_dir = "{tmp_path}"

[[sources.opcua]]
name = "press7"
endpoint = "{press.endpoint}"
security_policy = "Basic256Sha256"
security_mode = "SignAndEncrypt"
certificate = "{client_cert}"
private_key = "{client_key}"
server_certificate = "{server_cert}"
username = "plantgate"
password_file = "{secret}"

  [[sources.opcua.tags]]
  tag = "press7.temperature"
  node = "ns=2;s=Press7.Temperature"
""",
            encoding="utf-8",
        )
        (code, out, err), (plain_code, _, plain_err) = await asyncio.gather(
            _plantgate("browse", "--source", "press7", "-c", str(path), "--node", "ns=2;s=Press7"),
            _plantgate("browse", press.endpoint, "--timeout", "5"),
        )
    assert code == 0, out + err
    assert _one(out.splitlines(), "ns=2;s=Press7.CycleAck").split()[-2:] == ["Boolean", "read/write"]
    assert not [line for line in out.splitlines() if "i=85" in line], "started at --node"
    # Without the source's security the same server cannot be browsed: one line saying why.
    assert plain_code == 1
    assert plain_err.startswith(f"plantgate: browse: cannot connect to {press.endpoint}: ")
    assert len(plain_err.strip().splitlines()) == 1


async def test_browse_of_an_unreachable_server_is_one_line_exit_1() -> None:
    code, out, err = await _plantgate("browse", "opc.tcp://127.0.0.1:1", "--timeout", "3")
    assert code == 1
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plantgate: browse: cannot connect to opc.tcp://127.0.0.1:1")


# --- did-you-mean ---------------------------------------------------------------------------------

MINIMAL = """\
[agent]
site = "plant-01"

[[sources.opcua]]
name = "press7"
endpoint = "opc.tcp://127.0.0.1:4840"

  [[sources.opcua.tags]]
  tag = "press7.temperature"
  node = "ns=2;s=Press7.Temperature"
  {tag_line}

[[sources.modbus]]
name = "filler2"
endpoint = "tcp://127.0.0.1:502"
{modbus_line}

  [[sources.modbus.tags]]
  tag = "filler2.count"
  register = "holding:10"

[[sinks.https]]
name = "erp"
url = "https://middleware.example.com/v1/events"
oauth2 = {{ token_url = "https://login.example.com/token", client_id = "gw", {oauth_key} = "secret" }}
"""


@pytest.mark.parametrize(
    ("tag_line", "modbus_line", "oauth_key", "key", "suggestion"),
    [
        ("deadbnd = 0.5", "", "client_secret_file", "sources.opcua.0.tags.0.deadbnd", "deadband"),
        ("", 'pol_interval = "1s"', "client_secret_file", "sources.modbus.0.pol_interval", "poll_interval"),
        ("", "", "client_secret_fil", "sinks.https.0.oauth2.client_secret_fil", "client_secret_file"),
    ],
)
def test_an_unknown_key_names_the_closest_valid_one(
    tag_line: str, modbus_line: str, oauth_key: str, key: str, suggestion: str
) -> None:
    text = MINIMAL.format(tag_line=tag_line, modbus_line=modbus_line, oauth_key=oauth_key)
    with pytest.raises(ConfigError) as caught:
        parse_settings(text, path=Path("site.toml"))
    error = caught.value
    assert error.key == key
    assert error.message.startswith(f"unknown key; did you mean `{suggestion}`?")
    assert "\n" not in str(error)


def test_an_unknown_key_without_a_close_one_gets_no_guess() -> None:
    text = MINIMAL.format(tag_line="colour = 1", modbus_line="", oauth_key="client_secret_file")
    with pytest.raises(ConfigError) as caught:
        parse_settings(text)
    assert caught.value.message == "unknown key"


def test_check_prints_the_suggestion_in_its_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "site.toml"
    path.write_text(
        MINIMAL.format(tag_line="deadbnd = 0.5", modbus_line="", oauth_key="client_secret_file"), encoding="utf-8"
    )
    assert main(["check", "-c", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"plantgate: {path}:11: sources.opcua.0.tags.0.deadbnd: unknown key; did you mean `deadband`?"]


def test_a_bare_number_duration_shows_the_fix() -> None:
    text = MINIMAL.format(tag_line="", modbus_line="poll_interval = 200", oauth_key="client_secret_file")
    with pytest.raises(ConfigError) as caught:
        parse_settings(text)
    assert caught.value.key == "sources.modbus.0.poll_interval"
    assert 'write the duration as "200s" or "200ms"' in caught.value.message


# --- risky settings -------------------------------------------------------------------------------

RISKY = """\
[agent]
site = "plant-01"
data_dir = "{data_dir}"

[http]
ingest_token_file = "ingest-token"

[[sources.mes]]
name = "mes"
mode = "poll"
url = "https://mes.example.com/api/confirmations"
bearer_token_file = "mes-token"

[[sinks.mqtt]]
name = "cloud"
url = "mqtt://broker.example.com:1883"
username = "gw"
password_file = "mqtt-password"

[[sinks.https]]
name = "erp"
url = "https://middleware.example.com/v1/events"
oauth2 = {{ token_url = "https://login.example.com/token", client_id = "gw", client_secret_file = "client-secret" }}
"""


def test_check_warns_about_secret_files_others_can_read_and_credentials_in_clear(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = {"ingest-token": 0o644, "mes-token": 0o600, "mqtt-password": 0o604, "client-secret": 0o666}
    for name, mode in files.items():
        (tmp_path / name).write_text("s3cret-value\n", encoding="utf-8")
        (tmp_path / name).chmod(mode)
    path = tmp_path / "site.toml"
    path.write_text(RISKY.format(data_dir=tmp_path), encoding="utf-8")
    assert main(["check", "-c", str(path)]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("plantgate: warning: ")]
    assert "s3cret-value" not in captured.out + captured.err

    def warned(*needles: str) -> str:
        return _one(warnings, *needles)

    assert "mode 0644" in warned("http.ingest_token_file:", str(tmp_path / "ingest-token"), "every user")
    assert f"chmod 600 {tmp_path / 'mqtt-password'}" in warned("sinks.mqtt.cloud.password_file:")
    assert "read and written" in warned("sinks.https.erp.oauth2.client_secret_file:")
    assert not [w for w in warnings if "mes-token" in w], "a 0600 file is private enough"
    warned("sinks.mqtt.cloud:", "unencrypted over mqtt://")


def test_a_private_secret_file_gives_no_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("ingest-token", "mes-token", "mqtt-password", "client-secret"):
        (tmp_path / name).write_text("s3cret-value\n", encoding="utf-8")
        (tmp_path / name).chmod(0o600)
    path = tmp_path / "site.toml"
    path.write_text(
        RISKY.format(data_dir=tmp_path).replace("mqtt://broker.example.com:1883", "mqtts://broker.example.com:8883"),
        encoding="utf-8",
    )
    assert main(["check", "-c", str(path)]) == 0
    err = capsys.readouterr().err
    assert "every user" not in err and "unencrypted" not in err, err


# --- the config files shipped ---------------------------------------------------------------------


# Whole configurations; config/rules/ holds rule fragments, checked appended to a config by the rule tests.
CONFIG_FILES = sorted(
    path for path in (ROOT / "config").rglob("*.toml") if path.relative_to(ROOT / "config").parts[0] != "rules"
)


def test_the_plc_examples_are_there() -> None:
    names = {path.name for path in CONFIG_FILES}
    assert {
        "plantgate.example.toml",
        "siemens-s7-1500.toml",
        "beckhoff-twincat.toml",
        "kepware-rockwell.toml",
        "modbus-filler.toml",
    } <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda path: str(path.relative_to(ROOT / "config")))
def test_every_config_file_passes_check(path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = path.read_text(encoding="utf-8")
    expected = os.path.relpath(ROOT / "config" / "plantgate.schema.json", path.parent)
    expected = expected if "/" in expected else f"./{expected}"
    assert text.splitlines()[0] == f"#:schema {expected}", "the first line points editors (Taplo) at the schema"
    # The files it names, made under a data dir and a credentials folder of our own.
    data_dir = tmp_path / "data"
    text = re.sub(r'(?m)^data_dir = "[^"]*"', f'data_dir = "{data_dir}"', text)
    text = text.replace("/run/credentials/plantgate.service/", f"{tmp_path}/credentials/")
    certificate, key = make_certificate(tmp_path, "agent", "urn:plantgate:line3-gw", server=False)
    ca = trustme.CA()
    for name, named in _named_files(text):
        target = data_dir / named  # an absolute path stays itself
        target.parent.mkdir(parents=True, exist_ok=True)
        if name in ("certificate", "server_certificate"):
            target.write_bytes(certificate.read_bytes())
        elif name == "private_key":
            target.write_bytes(key.read_bytes())
        elif name == "ca_file":
            ca.cert_pem.write_to_path(str(target))
        else:
            target.write_text("example-secret\n", encoding="utf-8")
        target.chmod(0o600)
    site = tmp_path / path.name
    site.write_text(text, encoding="utf-8")
    assert main(["check", "-c", str(site)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.startswith(f"{site}: valid")
    assert "source   " in out


def _named_files(text: str) -> list[tuple[str, str]]:
    """``(key, path)`` of every file a config text names (secrets, certificates, CAs), comments left out."""
    pattern = re.compile(r"^\s*(\w+_file|certificate|private_key|server_certificate)\s*=\s*\"([^\"]+)\"", re.M)
    inline = re.compile(r"\b(\w+_file)\s*=\s*\"([^\"]+)\"")
    found = [(m.group(1), m.group(2)) for m in pattern.finditer(text)]
    for line in text.splitlines():
        if "{" in line and not line.lstrip().startswith("#"):
            found.extend((m.group(1), m.group(2)) for m in inline.finditer(line))
    return found
