"""The ``plantgate`` command line, run as a real subprocess (the installed console script).

Each invocation costs an interpreter start (half a second of imports), so the module
starts the subprocesses all at once in one fixture and the tests read their results;
variations of the same paths run in-process through ``agent.cli.main``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent import __version__
from agent.cli import main
from agent.events import OPERATIONAL_TYPES, TELEMETRY_TYPES, TRANSACTION_TYPES

PLANTGATE = Path(sys.executable).parent / "plantgate"
SECRET = "s3cr3t-Pa55word-0042"

GOOD = """\
[agent]
site = "plant-01"
id = "line3-gw"
data_dir = "{data_dir}"

[[sources.opcua]]
name = "press7"
endpoint = "opc.tcp://127.0.0.1:4840"

  [[sources.opcua.tags]]
  tag = "press7.temperature"
  node = "ns=2;s=Press7.Temperature"
  deadband = 0.5

  [[sources.opcua.tags]]
  tag = "press7.cycle_done"
  node = "ns=2;s=Press7.CycleDone"
  kind = "value"

  [[sources.opcua.tags]]
  tag = "press7.work_order"
  node = "ns=2;s=Press7.WorkOrder"
  kind = "value"

[[transactions]]
name = "press7-completion"
when = "press7.cycle_done"
type = "production.completed"
fields = {{ work_order = "press7.work_order" }}

[[sinks.mqtt]]
name = "cloud"
url = "{url}"
username = "gw"
"""


@dataclass
class Run:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def _line_of(path: Path, needle: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), start=1) if needle in line)


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    directory = tmp_path_factory.mktemp("cli")
    data_dir = directory / "data"
    good = _write(directory, "good.toml", GOOD.format(data_dir=data_dir, url="mqtts://broker.example.com:8883"))
    unknown = _write(directory, "unknown.toml", good.read_text().replace('id = "line3-gw"', 'id = "g"\ncolour = 1'))
    wrong = _write(directory, "wrong.toml", good.read_text().replace("deadband = 0.5", 'deadband = "wide"'))
    syntax = _write(directory, "syntax.toml", good.read_text().replace('kind = "value"', 'kind = "value', 1))
    base_env = {key: value for key, value in os.environ.items() if not key.startswith("PLANTGATE")}
    secret_env = {"PLANTGATE__SINKS__MQTT__CLOUD__PASSWORD": SECRET}
    invocations: dict[str, tuple[list[str], dict[str, str]]] = {
        "check": (["check", "-c", str(good)], secret_env),
        "unknown_key": (["check", "-c", str(unknown)], secret_env),
        "wrong_type": (["check", "-c", str(wrong)], secret_env),
        "syntax": (["check", "-c", str(syntax)], secret_env),
        "schema_events": (["schema", "events"], {}),
        "schema_config": (["schema", "config"], {}),
        "version": (["--version"], {}),
    }
    started = {
        name: (
            args,
            subprocess.Popen(
                [str(PLANTGATE), *args],
                env={**base_env, **extra},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=directory,
            ),
        )
        for name, (args, extra) in invocations.items()
    }
    runs = {}
    for name, (args, process) in started.items():
        stdout, stderr = process.communicate(timeout=60)
        runs[name] = Run(args, process.returncode, stdout, stderr)
    runs["_files"] = Run([str(good), str(unknown), str(wrong), str(syntax)], 0, "", "")
    return runs


def test_the_console_script_is_installed() -> None:
    assert PLANTGATE.exists(), PLANTGATE


def test_check_a_valid_config(cli: dict[str, Run]) -> None:
    run = cli["check"]
    assert run.returncode == 0, run.stderr
    good = cli["_files"].args[0]
    assert run.stdout.startswith(f"{good}: valid\n")
    for expected in (
        "site=plant-01",
        "id=line3-gw",
        "press7",
        "opc.tcp://127.0.0.1:4840",
        "press7.temperature",
        "press7-completion",
        "production.completed",
        "cloud",
        "mqtts://broker.example.com:8883",
    ):
        assert expected in run.stdout, expected
    assert "Traceback" not in run.stderr


def test_check_masks_secrets(cli: dict[str, Run]) -> None:
    run = cli["check"]
    assert run.returncode == 0, run.stderr
    assert SECRET not in run.stdout + run.stderr
    assert "********" in run.stdout  # the password is there, masked
    assert "warning" not in run.stderr  # mqtts: no warning about clear-text credentials


@pytest.mark.parametrize(
    ("name", "index", "needle", "key", "what"),
    [
        ("unknown_key", 1, "colour = 1", "agent.colour", "unknown key"),
        ("wrong_type", 2, 'deadband = "wide"', "sources.opcua.0.tags.0.deadband", "number"),
    ],
)
def test_check_reports_a_bad_key_in_one_line(
    cli: dict[str, Run], name: str, index: int, needle: str, key: str, what: str
) -> None:
    run = cli[name]
    path = Path(cli["_files"].args[index])
    assert run.returncode == 2
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    prefix = f"plantgate: {path}:{_line_of(path, needle)}: {key}: "
    assert lines[0].startswith(prefix), lines[0]
    assert what in lines[0]
    assert "Traceback" not in run.stderr


def test_check_reports_a_toml_syntax_error_with_its_line(cli: dict[str, Run]) -> None:
    run = cli["syntax"]
    path = Path(cli["_files"].args[3])
    assert run.returncode == 2
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(f"plantgate: {path}:{_line_of(path, 'kind = ' + chr(34) + 'value')}: TOML syntax error")
    assert "Traceback" not in run.stderr


# --- in-process: the same code paths, without an interpreter start each --------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.startswith("PLANTGATE"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_check_takes_the_config_from_plantgate_config(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _write(tmp_path, "site.toml", GOOD.format(data_dir=tmp_path, url="mqtts://broker.example.com:8883"))
    clean_env.setenv("PLANTGATE_CONFIG", str(good))
    clean_env.setenv("PLANTGATE__SINKS__MQTT__CLOUD__PASSWORD", SECRET)
    assert main(["check"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{good}: valid\n")
    assert SECRET not in out + err


def test_check_warns_about_credentials_over_plain_mqtt(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = _write(tmp_path, "site.toml", GOOD.format(data_dir=tmp_path, url="mqtt://broker.example.com:1883"))
    clean_env.setenv("PLANTGATE__SINKS__MQTT__CLOUD__PASSWORD", SECRET)
    assert main(["check", "-c", str(plain)]) == 0
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("plantgate: warning:")]
    assert any("cloud" in line and "mqtt://" in line for line in warnings), err
    assert SECRET not in out + err


def test_check_warns_about_a_lane_no_sink_takes(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    text = GOOD.format(data_dir=tmp_path, url="mqtts://broker.example.com:8883")
    url = 'url = "mqtts://broker.example.com:8883"'
    text = text.replace(url, url + '\nlanes = ["transaction"]')
    path = _write(tmp_path, "site.toml", text)
    clean_env.setenv("PLANTGATE__SINKS__MQTT__CLOUD__PASSWORD", SECRET)
    assert main(["check", "-c", str(path)]) == 0
    _, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("plantgate: warning:")]
    assert any("telemetry lane" in line for line in warnings), err
    assert any("operational lane" in line for line in warnings), err
    assert not any("transaction lane" in line for line in warnings), err


def test_check_reports_a_cross_reference_error_in_one_line(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    text = GOOD.format(data_dir=tmp_path, url="mqtts://broker.example.com:8883")
    path = _write(tmp_path, "site.toml", text.replace('when = "press7.cycle_done"', 'when = "nope"'))
    clean_env.setenv("PLANTGATE__SINKS__MQTT__CLOUD__PASSWORD", SECRET)
    assert main(["check", "-c", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"plantgate: {path}:{_line_of(path, 'when = ')}: transactions.0.when: tag 'nope' is not defined by any source"
    ]


@pytest.mark.parametrize("command", ["check", "run"])
def test_an_unreadable_secret_file_is_a_config_error_naming_its_key_and_line(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    # Validation cannot see files: building the sink does, before anything starts.
    missing = tmp_path / "credentials" / "mqtt-password"
    text = GOOD.format(data_dir=tmp_path / "data", url="mqtts://broker.example.com:8883")
    path = _write(tmp_path, "site.toml", text + f'password_file = "{missing}"\n')
    assert main([command, "-c", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"plantgate: {path}:{_line_of(path, 'password_file')}: sinks.mqtt.0.password_file: "
        f"cannot read {missing}: No such file or directory"
    ]
    assert not (tmp_path / "data").exists()  # nothing was started


def test_check_of_a_missing_file(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", "-c", str(tmp_path / "missing.toml")]) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"plantgate: {tmp_path / 'missing.toml'}: ")
    assert out == ""


def test_schema_events_lists_every_canonical_type(cli: dict[str, Run]) -> None:
    run = cli["schema_events"]
    assert run.returncode == 0, run.stderr
    schema = json.loads(run.stdout)
    names = (*TRANSACTION_TYPES, *OPERATIONAL_TYPES, *TELEMETRY_TYPES)
    assert len(names) == 24
    for name in names:
        assert f"io.plantgate.{name}" in schema["types"], name
    assert schema["envelope"]  # the CloudEvents envelope is described too
    assert "specversion" in json.dumps(schema["envelope"]) + json.dumps(schema["$defs"])


def test_schema_config_is_a_json_schema_of_the_settings(cli: dict[str, Run]) -> None:
    run = cli["schema_config"]
    assert run.returncode == 0, run.stderr
    schema = json.loads(run.stdout)
    assert schema["type"] == "object"
    assert {"agent", "sinks", "sources", "buffer", "transactions", "mappings"} <= set(schema["properties"])
    assert "agent" in schema["required"]


def test_version(cli: dict[str, Run]) -> None:
    run = cli["version"]
    assert run.returncode == 0
    assert run.stdout.strip() == f"plantgate {__version__}"


def test_an_unreadable_nested_secret_file_names_its_dotted_key(
    tmp_path: Path, clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "credentials" / "oauth-secret"
    text = GOOD.format(data_dir=tmp_path / "data", url="mqtts://broker.example.com:8883") + (
        '\n[[sinks.https]]\nname = "erp"\nurl = "https://erp.example.com/v1/events"\n'
        f'oauth2 = {{ token_url = "https://login.example.com/token", client_id = "gw", '
        f'client_secret_file = "{missing}" }}\n'
    )
    path = _write(tmp_path, "site.toml", text)
    assert main(["check", "-c", str(path)]) == 2
    _, err = capsys.readouterr()
    assert len(err.splitlines()) == 1, err
    assert "sinks.https.0.oauth2.client_secret_file: cannot read" in err and str(missing) in err
