"""The HTTPS sink against a real HTTPS receiver (hypercorn, trustme certificates) and a real OAuth2 token endpoint.

Everything runs on loopback: the receiver (``tests.peers.https_server``) answers as a
test scripts it (503 storms, 429 with ``Retry-After``, 422 for poison events, 401 for
stale tokens, a required client certificate), and the sink is driven through its
public seam (``run``/``deliver``/``status``) or inside a real ``Agent``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agent.config_types import BuildContext
from agent.events import CloudEvent, encode_event, make_event, stable_id
from agent.pipeline import AGENT_SOURCE, Agent
from agent.rules import RuleOutput
from agent.settings import ConfigError, parse_settings
from agent.sink import ACKED, BufferedEvent, Outcome, Rejected, RetryLater
from protocols.https import HttpsSinkConfig
from protocols.https.receiver import DemoReceiver
from protocols.https.sink import HttpsSink, retry_after
from tests.peers.https_server import Certificates, HttpsReceiver, TokenIssuer, free_port
from tests.peers.waiting import wait_for

SITE = "plant-01"
AGENT = "line3-gw"
_T0 = datetime(2024, 5, 1, 6, 0, tzinfo=UTC)


def events(n: int, *, start: int = 0, poison: frozenset[int] = frozenset()) -> list[BufferedEvent]:
    """``n`` canonical transaction events as the buffer hands them out; those in ``poison`` carry data.poison."""
    batch = []
    for i in range(start, start + n):
        data: dict[str, Any] = {"work_order": f"WO-{i}", "item": "40012345000017"}
        if i in poison:
            data["poison"] = True
        event = make_event(
            "production.completed",
            id=stable_id("https-test", i),
            source=f"plantgate/{SITE}/{AGENT}/press7",
            time=_T0 + timedelta(seconds=i),
            site=SITE,
            subject=f"WO-{i}",
            data=data,
        )
        batch.append(BufferedEvent(seq=i + 1, lane=event.lane, type=event.type, id=event.id, body=encode_event(event)))
    return batch


def ids(batch: list[BufferedEvent]) -> list[str]:
    return [e.id for e in batch]


def context(data_dir: Path) -> BuildContext:
    return BuildContext(agent_id=AGENT, site=SITE, version="9.9.9", data_dir=data_dir)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def receiver(certs: Certificates) -> Iterator[HttpsReceiver]:
    with HttpsReceiver(certs) as running:
        yield running


@contextlib.asynccontextmanager
async def running_sink(config: HttpsSinkConfig, data_dir: Path) -> AsyncIterator[HttpsSink]:
    sink = config.build(context(data_dir))
    task = asyncio.create_task(sink.run())
    try:
        yield sink
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert sink.status.state == "stopped"


def sink_config(receiver: HttpsReceiver, certs: Certificates, **overrides: Any) -> HttpsSinkConfig:
    values: dict[str, Any] = {"name": "erp", "url": receiver.url, "ca_file": certs.ca_file, "timeout": "5s"}
    values.update(overrides)
    return HttpsSinkConfig(**values)


def acked(outcomes: Any) -> bool:
    return all(o is ACKED for o in outcomes)


# --- happy path ---------------------------------------------------------------------------------------------


async def test_a_batch_is_one_post_of_a_cloudevents_array_over_http2_all_acked(
    receiver: HttpsReceiver, certs: Certificates, tmp_path: Path
) -> None:
    async with running_sink(sink_config(receiver, certs), tmp_path) as sink:
        await wait_for(lambda: sink.status.state == "connected", timeout=10)
        batch = events(50)
        outcomes = await sink.deliver(batch)

        assert acked(outcomes) and len(outcomes) == 50
        assert receiver.ids() == ids(batch)
        posts = receiver.seen()
        assert len(posts) == 1 and posts[0].count == 50
        assert posts[0].content_type == "application/cloudevents-batch+json"
        assert posts[0].http_version == "2"  # the server offers h2 over ALPN: it is used
        assert sink.status.info["http_version"] == "HTTP/2"
        assert sink.status.info["last_status"] == "200"
        # the events are the buffer's bytes, not re-encoded
        assert receiver.events[0] == json.loads(batch[0].body)


async def test_http11_when_the_server_offers_only_http11(certs: Certificates, tmp_path: Path) -> None:
    with HttpsReceiver(certs, http2=False) as receiver:
        async with running_sink(sink_config(receiver, certs), tmp_path) as sink:
            assert acked(await sink.deliver(events(3)))
            assert receiver.seen()[0].http_version == "1.1"
            assert sink.status.info["http_version"] == "HTTP/1.1"


async def test_409_means_already_there_and_is_acked(
    receiver: HttpsReceiver, certs: Certificates, tmp_path: Path
) -> None:
    receiver.accept_status = 409
    async with running_sink(sink_config(receiver, certs), tmp_path) as sink:
        outcomes = await sink.deliver(events(5))
        assert acked(outcomes)
        assert [s.status for s in receiver.seen()] == [409]


# --- retries ----------------------------------------------------------------------------------------------


async def test_a_503_storm_is_retried_then_everything_arrives_once_in_order(
    receiver: HttpsReceiver, certs: Certificates, tmp_path: Path
) -> None:
    receiver.script(503, times=6)
    batch = events(40)
    async with running_sink(sink_config(receiver, certs), tmp_path) as sink:
        attempts = 0
        outcomes: list[Outcome] = []
        while attempts < 20:  # bounded: the storm is 6 answers long
            attempts += 1
            outcomes = list(await sink.deliver(batch))
            if acked(outcomes):
                break
            assert all(isinstance(o, RetryLater) for o in outcomes)
            assert sink.status.state == "reconnecting" and "503" in (sink.status.last_error or "")
        assert attempts == 7 and acked(outcomes)
        assert sink.status.state == "connected"
    assert receiver.ids() == ids(batch)  # once, in order


async def test_other_5xx_and_unknown_statuses_are_retried_never_dead_letters(
    receiver: HttpsReceiver, certs: Certificates, tmp_path: Path
) -> None:
    async with running_sink(sink_config(receiver, certs), tmp_path) as sink:
        receiver.script(500)
        assert list(await sink.deliver(events(3))) == [RetryLater(None, reason="HTTP 500")] * 3
        assert sink.status.state == "reconnecting"
        receiver.script(404)
        assert list(await sink.deliver(events(3))) == [RetryLater(None, reason="HTTP 404")] * 3
        assert sink.status.state == "disconnected" and "404" in (sink.status.last_error or "")
        assert acked(await sink.deliver(events(3)))
        assert sink.status.state == "connected"


async def test_429_retry_after_in_seconds_and_as_an_http_date(
    receiver: HttpsReceiver, certs: Certificates, tmp_path: Path
) -> None:
    async with running_sink(sink_config(receiver, certs), tmp_path) as sink:
        receiver.script(429, headers={"retry-after": "7"})
        outcomes = await sink.deliver(events(4))
        assert list(outcomes) == [RetryLater(after=7.0, reason="HTTP 429")] * 4

        when = datetime.now(UTC) + timedelta(seconds=30)
        receiver.script(429, headers={"retry-after": format_datetime(when, usegmt=True)})
        outcomes = await sink.deliver(events(4))
        after = outcomes[0].after if isinstance(outcomes[0], RetryLater) else None
        assert after is not None and 25 <= after <= 31
        assert all(o == outcomes[0] for o in outcomes)

        receiver.script(503, headers={"retry-after": "2"})
        assert list(await sink.deliver(events(4))) == [RetryLater(after=2.0, reason="HTTP 503")] * 4
        assert sink.status.state == "reconnecting"

        receiver.script(429)  # no header: the agent's own backoff
        assert list(await sink.deliver(events(4))) == [RetryLater(None, reason="HTTP 429")] * 4
        assert acked(await sink.deliver(events(4)))
    assert receiver.ids() == ids(events(4))


def test_retry_after_parsing() -> None:
    now = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
    assert retry_after("120") == 120.0
    assert retry_after(" 0 ") == 0.0
    assert retry_after("Fri, 04 Dec 2026 12:00:30 GMT", now=now) == 30.0
    assert retry_after("Fri, 04 Dec 2026 11:00:00 GMT", now=now) == 0.0  # in the past: now
    assert retry_after("soon") is None
    assert retry_after("-5") is None
    assert retry_after(None) is None


async def test_connection_refused_and_timeouts_retry_and_report(certs: Certificates, tmp_path: Path) -> None:
    port = free_port()
    config = HttpsSinkConfig(name="down", url=f"https://127.0.0.1:{port}/events", ca_file=certs.ca_file, timeout="1s")
    async with running_sink(config, tmp_path) as sink:
        outcomes = await asyncio.wait_for(sink.deliver(events(5)), 5)
        assert list(outcomes) == [RetryLater(None, reason="connection refused")] * 5
        await wait_for(lambda: sink.status.state == "reconnecting", timeout=5)
        assert "cannot connect" in (sink.status.last_error or "")


# --- poison events ------------------------------------------------------------------------------------------


async def test_422_splits_the_batch_and_only_the_poison_events_become_dead_letters(
    receiver: HttpsReceiver, certs: Certificates, tmp_path: Path
) -> None:
    poison = frozenset({7, 31})
    batch = events(50, poison=poison)
    async with running_sink(sink_config(receiver, certs), tmp_path) as sink:
        outcomes = await sink.deliver(batch)

    for i, outcome in enumerate(outcomes):
        if i in poison:
            assert isinstance(outcome, Rejected), (i, outcome)
            assert outcome.reason.startswith("HTTP 422: ")
            assert batch[i].id in outcome.reason  # the receiver's body names it
            assert len(outcome.reason.encode()) <= 1024 + len("HTTP 422: ")
        else:
            assert outcome is ACKED, (i, outcome)
    good = [e.id for i, e in enumerate(batch) if i not in poison]
    assert receiver.ids() == good  # each good event once, in order
    posts = receiver.seen()
    # two poison events in 50: a few requests per level of the split, never one per event
    assert len(posts) <= 2 * 2 * 6 + 1, [(p.status, p.count) for p in posts]
    assert sink.refused_requests == sum(1 for p in posts if p.status == 422)


async def test_one_poison_event_in_500_is_isolated_in_logarithmic_requests(
    receiver: HttpsReceiver, certs: Certificates, tmp_path: Path
) -> None:
    batch = events(500, poison=frozenset({377}))
    async with running_sink(sink_config(receiver, certs), tmp_path) as sink:
        outcomes = await sink.deliver(batch)
        assert [i for i, o in enumerate(outcomes) if isinstance(o, Rejected)] == [377]
        assert sum(o is ACKED for o in outcomes) == 499
        assert sink.requests <= 20  # 1 + at most 2 per level (9 levels)
    assert receiver.ids() == [e.id for i, e in enumerate(batch) if i != 377]


async def test_a_retryable_answer_during_the_split_keeps_order(
    receiver: HttpsReceiver, certs: Certificates, tmp_path: Path
) -> None:
    batch = events(8, poison=frozenset({6}))
    async with running_sink(sink_config(receiver, certs), tmp_path) as sink:
        receiver.script(422)  # the whole batch refused ...
        receiver.script(200)  # ... the left half accepted ...
        receiver.script(503, headers={"retry-after": "3"})  # ... then the receiver goes away
        outcomes = list(await sink.deliver(batch))
        assert outcomes[:4] == [ACKED] * 4
        assert outcomes[4:] == [RetryLater(after=3.0, reason="HTTP 503")] * 4
        # the pipeline hands out the rest again: the poison is isolated, the others delivered once
        rest = await sink.deliver(batch[4:])
        assert [type(o).__name__ for o in rest] == ["_Acked", "_Acked", "Rejected", "_Acked"]
    assert receiver.ids() == [e.id for e in batch if e.seq != 7]  # each good one once, in order


# --- credentials --------------------------------------------------------------------------------------------


async def test_static_token_refused_is_unauthorized_and_retried_then_a_rotated_file_delivers(
    receiver: HttpsReceiver, certs: Certificates, tmp_path: Path
) -> None:
    receiver.bearer_token = "new-token"
    token_file = tmp_path / "token"
    token_file.write_text("old-token\n")
    config = sink_config(receiver, certs, bearer_token_file=Path("token"))
    async with running_sink(config, tmp_path) as sink:
        outcomes = await sink.deliver(events(3))
        assert list(outcomes) == [RetryLater(None, reason="HTTP 401")] * 3  # never a dead letter
        assert sink.status.state == "unauthorized" and "401" in (sink.status.last_error or "")
        assert receiver.seen()[0].authorization == "Bearer old-token"

        # rotation: a new file moved into place, as deployment tools do
        (tmp_path / "token.new").write_text("new-token\n")
        os.replace(tmp_path / "token.new", token_file)

        async def delivered() -> bool:
            return acked(await sink.deliver(events(3)))

        await wait_for(delivered, timeout=5, interval=0.2)
        assert sink.status.state == "connected"
        assert sink.status.info["token_file_rotations"] == "1"
    assert receiver.ids() == ids(events(3))
    assert "new-token" not in json.dumps(sink.status.info) and "new-token" not in str(sink.status.last_error)


async def test_oauth2_token_fetched_cached_refreshed_once_on_401_and_before_expiry(
    certs: Certificates, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    issuer = TokenIssuer("plantgate", "s3cret-client", expires_in=2.0)
    (tmp_path / "client-secret").write_text("s3cret-client\n")
    with HttpsReceiver(certs, token_issuer=issuer) as idp, HttpsReceiver(certs, issuer=issuer) as receiver:
        oauth2 = {
            "token_url": idp.token_url,
            "client_id": "plantgate",
            "client_secret_file": "client-secret",
            "scope": "events.write",
        }
        caplog.set_level(logging.DEBUG)
        async with running_sink(sink_config(receiver, certs, oauth2=oauth2), tmp_path) as sink:
            await wait_for(lambda: len(issuer.issued) == 1, timeout=5)  # fetched at start
            assert acked(await sink.deliver(events(2)))
            assert acked(await sink.deliver(events(2, start=2)))
            assert len(issuer.issued) == 1  # cached
            assert receiver.seen()[0].authorization == f"Bearer {issuer.issued[0]}"

            issuer.revoke_all()  # the receiver answers 401: one refresh, then delivered in the same call
            assert acked(await sink.deliver(events(2, start=4)))
            assert len(issuer.issued) == 2
            assert [s.status for s in receiver.seen()][-2:] == [401, 200]

            # refreshed at 90 % of expires_in, before the receiver would refuse it
            await wait_for(lambda: sink_token_due(issuer), timeout=5)
            before = len(receiver.seen())
            assert acked(await sink.deliver(events(2, start=6)))
            assert len(issuer.issued) == 3
            assert [s.status for s in receiver.seen()[before:]] == [200]  # no 401 was needed
            assert sink.status.info["oauth2_tokens_fetched"] == "3"
        assert receiver.ids() == ids(events(8))
    for token in issuer.issued:
        assert token not in caplog.text
    assert "s3cret-client" not in caplog.text


def sink_token_due(issuer: TokenIssuer) -> bool:
    """True once the newest token is past 90 % of its lifetime (while the receiver still takes it)."""
    return time.monotonic() - issuer.issued_at[-1] >= 0.92 * issuer.expires_in


async def test_oauth2_token_endpoint_down_is_unauthorized_and_retried_never_dead_letters(
    certs: Certificates, tmp_path: Path
) -> None:
    issuer = TokenIssuer("plantgate", "right-secret")
    (tmp_path / "client-secret").write_text("wrong-secret")
    with HttpsReceiver(certs, token_issuer=issuer) as idp, HttpsReceiver(certs, issuer=issuer) as receiver:
        oauth2 = {"token_url": idp.token_url, "client_id": "plantgate", "client_secret_file": "client-secret"}
        async with running_sink(sink_config(receiver, certs, oauth2=oauth2), tmp_path) as sink:
            outcomes = await sink.deliver(events(3))
            assert all(isinstance(o, RetryLater) and o.after is not None for o in outcomes)
            assert sink.status.state == "unauthorized"
            assert "invalid_client" in (sink.status.last_error or "")
            assert "wrong-secret" not in (sink.status.last_error or "")
            assert receiver.seen() == []  # nothing sent without a token

            (tmp_path / "client-secret").write_text("right-secret")  # fixed: the next attempt works

            async def delivered() -> bool:
                return acked(await sink.deliver(events(3)))

            await wait_for(delivered, timeout=10, interval=0.2)
            assert sink.status.state == "connected"


# --- TLS ------------------------------------------------------------------------------------------------------


async def test_mutual_tls_required_and_provided(certs: Certificates, tmp_path: Path) -> None:
    with HttpsReceiver(certs, require_client_cert=True) as receiver:
        config = sink_config(receiver, certs, cert_file=certs.client_cert, key_file=certs.client_key)
        async with running_sink(config, tmp_path) as sink:
            assert acked(await sink.deliver(events(5)))
        assert receiver.ids() == ids(events(5))

        without = sink_config(receiver, certs, name="no-cert")
        async with running_sink(without, tmp_path) as sink:
            outcomes = await sink.deliver(events(5))
            assert len(outcomes) == 5 and all(type(o) is RetryLater and o.reason for o in outcomes)
            assert sink.status.state == "reconnecting"
            # TLS 1.3: the server's certificate_required alert arrives as a reset of the connection
            assert any(word in (sink.status.last_error or "") for word in ("reset", "broken pipe", "TLS"))
        assert receiver.ids() == ids(events(5))


async def test_a_server_certificate_from_another_ca_is_refused(receiver: HttpsReceiver, tmp_path: Path) -> None:
    other = Certificates(tmp_path / "other-ca")
    config = sink_config(receiver, other)
    async with running_sink(config, tmp_path) as sink:
        outcomes = await sink.deliver(events(2))
        assert len(outcomes) == 2 and all(type(o) is RetryLater and o.after is None for o in outcomes)
        assert "TLS certificate verification failed" in (outcomes[0].reason or "")  # type: ignore[union-attr]
        assert "TLS certificate verification failed" in (sink.status.last_error or "")
    assert receiver.seen() == []


# --- config -----------------------------------------------------------------------------------------------------


def test_config_validation_masking_and_warnings(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="scheme"):
        HttpsSinkConfig(name="x", url="ftp://example.com/")
    with pytest.raises(ValidationError, match="either a static bearer token"):
        HttpsSinkConfig(
            name="x",
            url="https://e.example/",
            bearer_token_file=Path("t"),
            oauth2={"token_url": "https://idp.example/token", "client_id": "c", "client_secret_file": "s"},
        )
    with pytest.raises(ValidationError, match="go together"):
        HttpsSinkConfig(name="x", url="https://e.example/", cert_file=Path("c.pem"))
    with pytest.raises(ValidationError, match="batch_max"):
        HttpsSinkConfig(name="x", url="https://e.example/", batch_max=0)
    with pytest.raises(ValidationError, match="token endpoint must be https"):
        HttpsSinkConfig(
            name="x",
            url="https://e.example/",
            oauth2={"token_url": "http://idp.example/token", "client_id": "c", "client_secret_file": "s"},
        )
    assert HttpsSinkConfig(name="x", url="https://e.example/").batch_max == 500

    plain = HttpsSinkConfig(name="local", url="http://127.0.0.1:8080/events")
    assert plain.warnings() and "http://" in plain.warnings()[0]
    assert HttpsSinkConfig(name="x", url="https://e.example/").warnings() == []

    ctx = context(tmp_path)
    env = HttpsSinkConfig(name="x", url="https://e.example/", bearer_token="env-s3cret-token")
    assert "env-s3cret-token" not in "\n".join(env.describe(ctx)) and "bearer_token=" in env.describe(ctx)[0]
    oauth = HttpsSinkConfig(
        name="x",
        url="https://e.example/",
        oauth2={"token_url": "https://idp.example/token", "client_id": "c", "client_secret": "env-client-s3cret"},
    )
    assert "env-client-s3cret" not in "\n".join(oauth.describe(ctx)) and "client_secret=" in oauth.describe(ctx)[0]

    keyed = HttpsSinkConfig(name="x", url="https://fn.example.net/api/events?code=s3cret-function-key")
    assert "s3cret-function-key" not in "\n".join(keyed.describe(ctx)) and "?********" in keyed.describe(ctx)[0]

    with pytest.raises(ValueError, match="bearer_token_file: cannot read"):
        HttpsSinkConfig(name="x", url="https://e.example/", bearer_token_file=Path("missing")).build(ctx)
    with pytest.raises(ValueError, match=r"oauth2\.client_secret_file: cannot read"):
        HttpsSinkConfig(
            name="x",
            url="https://e.example/",
            oauth2={"token_url": "https://idp.example/token", "client_id": "c", "client_secret_file": "missing"},
        ).build(ctx)
    with pytest.raises(ValueError, match="ca_file: cannot read"):
        HttpsSinkConfig(name="x", url="https://e.example/", ca_file=Path("missing.pem")).build(ctx)


def test_an_unreadable_token_file_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    from agent.registry import build_sinks

    settings = parse_settings(
        f"""
[agent]
site = "{SITE}"
id = "{AGENT}"
data_dir = "{tmp_path}"

[[sinks.https]]
name = "erp"
url = "https://middleware.example.com/v1/events"
bearer_token_file = "nowhere/token"
"""
    )
    with pytest.raises(ConfigError, match=r"sinks\.https\.0\.bearer_token_file"):
        build_sinks(settings)


# --- in the agent ---------------------------------------------------------------------------------------------


async def test_agent_with_one_receiver_down_delivers_everything_to_the_other_poison_as_dead_letters(
    certs: Certificates, tmp_path: Path
) -> None:
    down = f"https://127.0.0.1:{free_port()}/events"
    with HttpsReceiver(certs) as receiver:
        settings = parse_settings(
            f"""
[agent]
site = "{SITE}"
id = "{AGENT}"
data_dir = "{tmp_path}"

[http]
listen = "127.0.0.1:{free_port()}"

[[sinks.https]]
name = "down"
url = "{down}"
ca_file = "{certs.ca_file}"
lanes = ["transaction", "operational"]
timeout = "1s"

[[sinks.https]]
name = "up"
url = "{receiver.url}"
ca_file = "{certs.ca_file}"
lanes = ["transaction", "operational"]
batch_max = 100
"""
        )
        agent = Agent(settings)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            await wait_for(lambda: agent.state == "running", timeout=10)
            made = cloud_events(250, poison={17, 201})
            for start in range(0, 250, 50):
                committed = agent.accept(AGENT_SOURCE, RuleOutput(events=made[start : start + 50]))
                assert committed is not None
                await committed
            wanted = [e.id for e in made if e.subject not in ("WO-17", "WO-201")]
            await wait_for(
                lambda: set(wanted) <= set(receiver.ids()),
                timeout=20,
                message=lambda: f"{len(set(wanted) - set(receiver.ids()))} events not at the receiver",
            )
            got = [i for i in receiver.ids() if i in set(wanted)]
            assert got == wanted  # each once, in order
            sinks = {sink.name: sink for sink in agent.sinks}
            assert sinks["down"].status.state == "reconnecting"
            assert "cannot connect" in (sinks["down"].status.last_error or "")
            assert sinks["up"].status.state == "connected"
            assert agent.buffer.depth("down", "transaction") == 250  # kept for the receiver that is down
            await wait_for(lambda: agent.buffer.depth("up", "transaction") == 0, timeout=5)
            await agent.buffer.commit_now()  # the settled batches' dead letters are durable (and readable) now
            dead = await agent.buffer.dead_letters("up")
            assert sorted(d.subject or "" for d in dead) == ["WO-17", "WO-201"]
            assert all(d.reason.startswith("HTTP 422: ") and d.id in d.reason for d in dead)
            assert await agent.buffer.dead_letters("down") == []
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)


def cloud_events(n: int, poison: set[int]) -> list[CloudEvent]:
    return [
        make_event(
            "production.completed",
            id=stable_id("https-e2e", i),
            source=f"plantgate/{SITE}/{AGENT}/press7",
            time=_T0 + timedelta(seconds=i),
            site=SITE,
            subject=f"WO-{i}",
            data={"work_order": f"WO-{i}", **({"poison": True} if i in poison else {})},
        )
        for i in range(n)
    ]


# --- the demo receiver -----------------------------------------------------------------------------------------


async def test_the_demo_receiver_counts_what_the_sink_delivers(tmp_path: Path) -> None:
    receiver = DemoReceiver()
    await receiver.start()
    try:
        config = HttpsSinkConfig(name="demo", url=receiver.url)
        assert config.warnings()  # plain http is warned about
        async with running_sink(config, tmp_path) as sink:
            assert acked(await sink.deliver(events(20)))
            assert acked(await sink.deliver(events(5, start=20)))
        assert receiver.events == 25 and receiver.batches == 2
        assert receiver.by_type == {"io.plantgate.production.completed": 25}
        import httpx

        async with httpx.AsyncClient() as client:
            wrong_type = await client.post(receiver.url, content=b"[]", headers={"content-type": "application/json"})
            garbage = await client.post(
                receiver.url, content=b'{"id": 1}', headers={"content-type": "application/cloudevents-batch+json"}
            )
        assert (wrong_type.status_code, garbage.status_code) == (415, 400)
        assert receiver.events == 25
    finally:
        await receiver.stop()
