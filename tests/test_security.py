"""Security by default: secrets never leak, the HTTP port needs a token beyond loopback, the state is private.

The secret-leak test plants a random secret in every secret key of every protocol
(from ``*_file`` files and from ``PLANTGATE__`` environment overrides), runs
``plantgate check``, ``plantgate check`` on broken configs, ``plantgate run`` as a
child process against real peers that refuse every one of those credentials
(mosquitto with a password file, an HTTPS receiver and an OAuth2 token endpoint
answering 401, an MES REST server answering 401, an OPC UA server with its own
users), ``/status``, ``/metrics``, ``/readyz`` and ``plantgate buffer stats`` on the
running agent, and greps every output (stdout, stderr, the log, HTTP bodies) for
each secret whole and in every 16-character piece.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import signal
import stat
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.settings import ConfigError, parse_settings
from agent.simulator import PressSimulator
from tests.peers.https_server import Certificates, HttpsReceiver, TokenIssuer
from tests.peers.mes_server import MesRestServer
from tests.peers.mosquitto import MosquittoBroker, free_port
from tests.peers.waiting import wait_for

PLANTGATE = Path(sys.executable).parent / "plantgate"
PIECE = 16

CONFIG = """
[agent]
site = "plant-sec"
id = "gw-sec"
data_dir = "{data_dir}"
log_level = "DEBUG"

[http]
listen = "127.0.0.1:{http_port}"
ingest_token_file = "{secret_dir}/ingest-token"

[[sources.opcua]]
name = "press"
endpoint = "{opcua}"
username = "operator"
password_file = "{secret_dir}/opcua-password"
reconnect_max_backoff = "500ms"

  [[sources.opcua.tags]]
  tag = "press.temperature"
  node = "ns=2;s=Press7.Temperature"

[[sources.opcua]]
name = "press2"
endpoint = "{opcua}"
username = "operator"
reconnect_max_backoff = "500ms"

  [[sources.opcua.tags]]
  tag = "press2.temperature"
  node = "ns=2;s=Press7.Temperature"

[[sources.mes]]
name = "webhook"
mode = "webhook"

[[sources.mes]]
name = "mes-bearer-file"
mode = "poll"
url = "{mes}"
ca_file = "{ca}"
interval = "1s"
max_backoff = "500ms"
bearer_token_file = "{secret_dir}/mes-bearer"

[[sources.mes]]
name = "mes-bearer-env"
mode = "poll"
url = "{mes}"
ca_file = "{ca}"
interval = "1s"
max_backoff = "500ms"

[[sources.mes]]
name = "mes-basic-file"
mode = "poll"
url = "{mes}"
ca_file = "{ca}"
interval = "1s"
max_backoff = "500ms"
username = "mes-user"
password_file = "{secret_dir}/mes-password"

[[sources.mes]]
name = "mes-basic-env"
mode = "poll"
url = "{mes}"
ca_file = "{ca}"
interval = "1s"
max_backoff = "500ms"
username = "mes-user"

[[sinks.mqtt]]
name = "cloud"
url = "{mqtt}"
username = "plantgate"
password_file = "{secret_dir}/mqtt-password"
lanes = ["operational"]
reconnect_max_backoff = "500ms"

[[sinks.mqtt]]
name = "cloud2"
url = "{mqtt}"
username = "plantgate"
lanes = ["operational"]
reconnect_max_backoff = "500ms"

[[sinks.https]]
name = "erp-token-file"
url = "{https}"
ca_file = "{ca}"
lanes = ["operational"]
bearer_token_file = "{secret_dir}/https-bearer"

[[sinks.https]]
name = "erp-token-env"
url = "{https}"
ca_file = "{ca}"
lanes = ["operational"]

[[sinks.https]]
name = "erp-oauth-file"
url = "{https}"
ca_file = "{ca}"
lanes = ["operational"]
oauth2 = {{ token_url = "{token_url}", client_id = "plantgate", client_secret_file = "{secret_dir}/oauth-secret" }}

[[sinks.https]]
name = "erp-oauth-env"
url = "{https}"
ca_file = "{ca}"
lanes = ["operational"]
oauth2 = {{ token_url = "{token_url}", client_id = "plantgate" }}
"""

SECRET_FILES = ["ingest-token", "opcua-password", "mes-bearer", "mes-password", "mqtt-password", "https-bearer",
                "oauth-secret"]  # fmt: skip
SECRET_ENV = [
    "PLANTGATE__SOURCES__OPCUA__PRESS2__PASSWORD",
    "PLANTGATE__SOURCES__MES__MES-BEARER-ENV__BEARER_TOKEN",
    "PLANTGATE__SOURCES__MES__MES-BASIC-ENV__PASSWORD",
    "PLANTGATE__SINKS__MQTT__CLOUD2__PASSWORD",
    "PLANTGATE__SINKS__HTTPS__ERP-TOKEN-ENV__BEARER_TOKEN",
    "PLANTGATE__SINKS__HTTPS__ERP-OAUTH-ENV__OAUTH2__CLIENT_SECRET",
]


def random_secret() -> str:
    """40 random URL-safe characters: never found by chance, and the same in JSON, URLs and logs."""
    return secrets.token_urlsafe(30)


def leaks(text: str, planted: Iterable[str]) -> list[str]:
    """Each planted secret found in ``text``, whole or as any 16-character piece of it."""
    found = []
    for secret in planted:
        pieces = {secret[i : i + PIECE] for i in range(len(secret) - PIECE + 1)}
        hit = next((piece for piece in sorted(pieces) if piece in text), None)
        if hit is not None:
            found.append(f"{secret[:4]}... (piece {hit!r})")
    return found


async def plantgate(*args: str, env: dict[str, str], timeout: float = 60) -> tuple[int, str]:  # noqa: ASYNC109
    """Run the CLI to the end (the peers keep serving meanwhile); its exit code and stdout + stderr."""
    process = await asyncio.create_subprocess_exec(
        str(PLANTGATE), *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, stdout.decode() + stderr.decode()


async def test_planted_secrets_appear_in_no_output(tmp_path: Path) -> None:
    secret_dir = tmp_path / "credentials"
    secret_dir.mkdir(mode=0o700)
    planted: dict[str, str] = {}
    for name in SECRET_FILES:
        planted[name] = random_secret()
        path = secret_dir / name
        path.write_text(planted[name] + "\n", encoding="utf-8")
        path.chmod(0o600)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PLANTGATE")}
    for name in SECRET_ENV:
        planted[name] = env[name] = random_secret()
    # Basic auth carries "user:password" in base64: a leaked header must be found too.
    for key in ("mes-password", "PLANTGATE__SOURCES__MES__MES-BASIC-ENV__PASSWORD"):
        planted[f"basic {key}"] = base64.b64encode(f"mes-user:{planted[key]}".encode()).decode()
    # Every peer knows other credentials than the agent's: each refuses the agent.
    refused = random_secret()

    certs = Certificates(tmp_path / "tls")
    issuer = TokenIssuer("plantgate", refused)
    receiver = HttpsReceiver(certs, token_issuer=issuer)
    receiver.bearer_token = refused
    broker = MosquittoBroker(tmp_path / "mosquitto", users={"plantgate": refused})
    press = PressSimulator(port=0, users={"operator": refused})
    mes = MesRestServer(token=refused, tls=(str(certs.server_cert), str(certs.server_key)))
    http_port = free_port()
    data_dir = tmp_path / "data"
    config = tmp_path / "plantgate.toml"
    receiver.start()
    broker.start()
    await press.start()
    await mes.start()
    outputs: dict[str, str] = {}
    try:
        peers = {"opcua": press.endpoint, "mes": mes.url, "ca": certs.ca_file, "mqtt": broker.url}
        peers |= {"https": receiver.url, "token_url": receiver.token_url}
        text = CONFIG.format(data_dir=data_dir, http_port=http_port, secret_dir=secret_dir, **peers)
        config.write_text(text, encoding="utf-8")
        code, outputs["check"] = await plantgate("check", "-c", str(config), env=env)
        assert code == 0, outputs["check"]
        assert "valid" in outputs["check"]
        for name, broken in config_errors(config, env, secret_dir, planted).items():
            code, outputs[f"check with {name}"] = await plantgate("check", "-c", str(broken[0]), env=broken[1])
            assert code == 2, (name, outputs[f"check with {name}"])
            assert outputs[f"check with {name}"].startswith("plantgate: "), outputs[f"check with {name}"]
        # run refuses the same way, before anything listens.
        path, broken_env = config_errors(config, env, secret_dir, planted)["no token beyond loopback"]
        code, outputs["run beyond loopback"] = await plantgate("run", "-c", str(path), env=broken_env)
        assert code == 2
        assert (
            "http.listen: 0.0.0.0:9480 is reachable from other hosts and needs http.ingest_token_file"
            in (outputs["run beyond loopback"])
        )

        # The pre-flight reads every secret and offers it to every peer, which refuses it.
        preflight = ("check", "--connect", "--timeout", "5", "-c", str(config))
        code, outputs["check --connect"] = await plantgate(*preflight, env=env)
        assert code == 1, outputs["check --connect"]

        log = tmp_path / "run.log"
        with log.open("wb") as log_file:
            child = await asyncio.create_subprocess_exec(
                str(PLANTGATE), "run", "-c", str(config), "--log-format", "json",
                env=env, stdout=log_file, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=5) as client:
                status = await wait_for(
                    lambda: all_refused(client), timeout=30, message=lambda: f"every peer refused; {log.read_text()}"
                )
                outputs["/status"] = status
                # A few seconds of retries: every repeated refusal is logged (or counted) too.
                await wait_for(
                    lambda: sum(r.status == 401 for r in mes.requests) >= 12 and issuer.refused >= 2,
                    timeout=20,
                    message="the MES and the token endpoint refused the agent again",
                )
                for endpoint in ("/metrics", "/readyz", "/healthz"):
                    outputs[endpoint] = (await client.get(endpoint)).text
                # Refused with the wrong token: the 401 answer does not echo what was sent.
                wrong = await client.post(
                    "/v1/events", headers={"Authorization": f"Bearer {planted['ingest-token'][::-1]}"}, json={}
                )
                assert wrong.status_code == 401
                outputs["ingest 401"] = wrong.text
            code, outputs["buffer stats"] = await plantgate("buffer", "stats", "-c", str(config), env=env)
            assert code == 0, outputs["buffer stats"]
            code, outputs["buffer stats --json"] = await plantgate(
                "buffer", "stats", "--json", "-c", str(config), env=env
            )
            assert code == 0, outputs["buffer stats --json"]
        finally:
            if child.returncode is None:
                child.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(child.wait(), 30) == 0
        outputs["run log"] = log.read_text(encoding="utf-8")
    finally:
        await mes.stop()
        await press.stop()
        broker.stop()
        receiver.stop()

    # The refusals were really provoked (so the error paths ran), and logged.
    assert issuer.refused > 0 and any(seen.status == 401 for seen in receiver.seen())
    assert any(request.status == 401 for request in mes.requests)
    assert "not authori" in broker.log().lower() or "not authorised" in outputs["run log"].lower()
    assert outputs["run log"].count("\n") > 20, "a DEBUG run has something to say"
    for where, text in outputs.items():
        assert leaks(text, planted.values()) == [], f"a secret leaked into {where}"
    assert leaks("".join(outputs.values()), [refused]) == [], "nor did the peers' own secret"

    # Everything the agent created under its data dir is its own.
    assert [str(p) for p in [data_dir, *data_dir.rglob("*")] if p.stat().st_mode & 0o077] == []
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700


async def all_refused(client: httpx.AsyncClient) -> str | None:
    """The /status body once every source and sink that uses a credential reports its refusal."""
    try:
        answer = await client.get("/status")
    except httpx.TransportError:
        return None
    if answer.status_code != 200:
        return None
    document: dict[str, Any] = answer.json()
    components = {**document["sources"], **document["sinks"]}
    components.pop("webhook", None)
    if len(components) != 12:
        return None
    if all(entry.get("last_error") for entry in components.values()):
        return answer.text
    return None


def config_errors(
    config: Path, env: dict[str, str], secret_dir: Path, planted: dict[str, str]
) -> dict[str, tuple[Path, dict[str, str]]]:
    """Broken variants of the config (file, environment): each makes check print an error."""
    text = config.read_text(encoding="utf-8")
    broken: dict[str, tuple[Path, dict[str, str]]] = {}

    def variant(name: str, new_text: str, new_env: dict[str, str]) -> None:
        path = config.with_name(f"broken-{len(broken)}.toml")
        path.write_text(new_text, encoding="utf-8")
        broken[name] = (path, new_env)

    # A secret key misspelt in the environment: "unknown key".
    variant("a misspelt secret key", text, {**env, "PLANTGATE__SINKS__MQTT__CLOUD2__PASSWD": planted["ingest-token"]})
    # A secret for a sink that does not exist.
    variant("an unknown sink", text, {**env, "PLANTGATE__SINKS__MQTT__NOPE__PASSWORD": planted["ingest-token"]})
    # A secret where a number belongs.
    variant("a secret as a number", text, {**env, "PLANTGATE__SINKS__MQTT__CLOUD2__QOS": planted["ingest-token"]})
    # A secret written (wrongly) into the file, on a line with a syntax error.
    variant(
        "a TOML error on a secret's line",
        text.replace('username = "plantgate"\n', f'username = "plantgate"\npassword = "{planted["ingest-token"]}\n', 1),
        env,
    )
    # A password file that cannot be read.
    variant("an unreadable secret file", text.replace(f"{secret_dir}/mqtt-password", f"{secret_dir}/missing"), env)
    # A password without a username.
    variant(
        "a password without a user",
        text.replace('username = "operator"\nreconnect_max_backoff', "reconnect_max_backoff", 1),
        env,
    )
    # The HTTP port opened beyond loopback without a token.
    variant(
        "no token beyond loopback",
        text.replace(f'ingest_token_file = "{secret_dir}/ingest-token"\n', "").replace(
            '[[sources.mes]]\nname = "webhook"\nmode = "webhook"\n', ""
        ),
        {**env, "PLANTGATE__HTTP__LISTEN": "0.0.0.0:9480"},
    )
    return broken


# --- the HTTP port beyond loopback --------------------------------------------------------------------


MINIMAL = """
[agent]
site = "plant-sec"
data_dir = "/var/lib/plantgate"

[http]
listen = "{listen}"
"""


@pytest.mark.parametrize("listen", ["0.0.0.0:9480", ":9480", "[::]:9480", "10.1.3.5:9480", "gateway.plant:9480"])
def test_a_listen_address_beyond_loopback_needs_the_ingest_token(listen: str) -> None:
    text = MINIMAL.format(listen=listen)
    with pytest.raises(ConfigError) as caught:
        parse_settings(text, path=Path("site.toml"))
    assert caught.value.key == "http.listen"
    assert caught.value.line == 7
    assert str(caught.value).startswith(f"site.toml:7: http.listen: {listen} is reachable from other hosts")
    assert "needs http.ingest_token_file" in str(caught.value)
    # With the token it is fine; so is the environment naming one (the Dockerfile's way).
    parse_settings(text + 'ingest_token_file = "/run/credentials/plantgate.service/ingest-token"\n')
    parse_settings(text, environ={"PLANTGATE__HTTP__INGEST_TOKEN_FILE": "/run/secrets/ingest-token"})


@pytest.mark.parametrize("listen", ["127.0.0.1:9480", "localhost:9480", "[::1]:9480", "127.0.0.2:0"])
def test_a_loopback_listen_address_needs_no_token(listen: str) -> None:
    settings = parse_settings(MINIMAL.format(listen=listen))
    assert settings.http.ingest_token_file is None
