"""``plantgate`` command line: run, check, demo, buffer, schema.

Errors are one line on stderr (``plantgate: <file>[:<line>]: <key>: <what>``),
never a traceback, and exit code 2 for bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec

from agent import __version__

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``plantgate`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plantgate",
        description="Edge gateway agent: shop-floor sources -> store-and-forward buffer -> cloud sinks.",
    )
    parser.add_argument("--version", action="version", version=f"plantgate {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def config_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "-c",
            "--config",
            type=Path,
            default=None,
            help="config file (default: $PLANTGATE_CONFIG, else /etc/plantgate/plantgate.toml)",
        )

    run = commands.add_parser("run", help="run the daemon")
    config_option(run)
    run.set_defaults(handler=_cmd_run)

    check = commands.add_parser("check", help="validate the config and print a summary (secrets masked)")
    config_option(check)
    check.set_defaults(handler=_cmd_check)

    demo = commands.add_parser("demo", help="run the whole pipeline against built-in simulators")
    demo.add_argument("--seconds", type=float, default=None, help="stop after N seconds (default: until Ctrl-C)")
    demo.add_argument("--data-dir", type=Path, default=None, help="where the demo keeps its buffer and files")
    demo.set_defaults(handler=_cmd_demo)

    buffer = commands.add_parser("buffer", help="inspect the buffer (works on a running agent's file too)")
    buffer_commands = buffer.add_subparsers(dest="buffer_command", metavar="ACTION", required=True)
    stats = buffer_commands.add_parser("stats", help="depth, oldest age and size per sink and lane")
    config_option(stats)
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.set_defaults(handler=_cmd_buffer_stats)
    dead = buffer_commands.add_parser("dead-letters", help="list dead letters")
    config_option(dead)
    dead.add_argument("--json", action="store_true", help="machine-readable output")
    dead.add_argument("--sink", default=None, help="only this sink's dead letters ('-': before any sink)")
    dead.set_defaults(handler=_cmd_buffer_dead_letters)

    schema = commands.add_parser("schema", help="print a JSON Schema")
    schema.add_argument("what", choices=["events", "config"], help="canonical events, or the config file")
    schema.set_defaults(handler=_cmd_schema)
    return parser


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"plantgate: {message}", file=sys.stderr)
    return code


def _load(args: argparse.Namespace) -> Any:
    """The validated settings, or None after printing the one-line error."""
    from agent.settings import ConfigError, default_config_path, load_settings

    path = args.config or default_config_path()
    try:
        return load_settings(path)
    except ConfigError as exc:
        _fail(str(exc))
        return None


def _run_loop(coro_factory: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run on uvloop when it is installed (faster sockets and timers), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro_factory())
    return uvloop.run(coro_factory())


# --- run -----------------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    settings = _load(args)
    if settings is None:
        return EXIT_BAD_INPUT
    from agent.logs import setup_logging

    setup_logging(settings.agent.log_level)
    return _run_loop(lambda: _run_agent(settings))


async def _run_agent(settings: Any) -> int:
    import prometheus_client

    from agent.http_server import HttpListenError
    from agent.pipeline import Agent
    from buffer import BufferError

    prometheus_client.disable_created_metrics()
    stop = asyncio.Event()
    _on_signals(stop)
    try:
        agent = Agent(settings)
        await agent.run(stop)
    except HttpListenError as exc:
        return _fail(str(exc))
    except BufferError as exc:
        return _fail(f"buffer: {exc}", EXIT_FAILURE)
    except ValueError as exc:  # a source or sink refused its config (e.g. an unreadable secret file)
        return _fail(str(exc))
    return EXIT_OK


def _on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)


# --- check ---------------------------------------------------------------------------------------


def _cmd_check(args: argparse.Namespace) -> int:
    settings = _load(args)
    if settings is None:
        return EXIT_BAD_INPUT
    from agent.settings import default_config_path

    path = args.config or default_config_path()
    print(f"{path}: valid")
    print(_summary(settings))
    for warning in _warnings(settings):
        print(f"plantgate: warning: {warning}", file=sys.stderr)
    return EXIT_OK


def _summary(settings: Any) -> str:
    from agent.registry import SINKS, SOURCES, build_context

    agent = settings.agent
    lines = [
        f"agent    site={agent.site} id={agent.id} data_dir={agent.data_dir}",
        f"buffer   {settings.data_path(settings.buffer.path)} max_size_mb={settings.buffer.max_size_mb:g} "
        f"telemetry_max_rows={settings.buffer.telemetry_max_rows} synchronous={settings.buffer.synchronous}",
        f"http     {settings.http.listen}"
        + (f" ingest_token_file={settings.http.ingest_token_file}" if settings.http.ingest_token_file else ""),
    ]
    context = build_context(settings)
    for key in SOURCES:
        for source in getattr(settings.sources, key):
            first, *rest = source.describe(context)
            lines.append(f"source   {key} {first}")
            lines.extend(rest)
    for rule in settings.transactions:
        fields = ", ".join(f"{k}={v}" for k, v in rule.fields.items())
        ack = f" ack={rule.ack}" if rule.ack else ""
        uom = f" uom={rule.uom}" if rule.uom else ""
        lines.append(f"rule     {rule.name}: on {rule.when} -> io.plantgate.{rule.type} {{{fields}}}{uom}{ack}")
    mappings = settings.mappings
    if mappings.items or mappings.uom:
        lines.append(
            f"mappings items={len(mappings.items)} uom={len(mappings.uom)} unknown_items={mappings.unknown_items}"
        )
    for key in SINKS:
        for sink in getattr(settings.sinks, key):
            first, *rest = sink.describe(context)
            lines.append(f"sink     {key} {first}")
            lines.extend(rest)
    if not settings.sink_configs():
        lines.append("sink     (none: events are counted, not stored)")
    return "\n".join(lines)


def _warnings(settings: Any) -> list[str]:
    warnings = []
    for component in [*settings.source_configs(), *settings.sink_configs()]:
        warnings.extend(component.warnings())
    sinks = settings.sink_configs()
    if not sinks:
        warnings.append("no sinks configured: nothing is forwarded")
    else:
        taken = {lane for sink in sinks for lane in sink.lanes}
        for lane in ("transaction", "operational", "telemetry"):
            if lane not in taken:
                warnings.append(f"no sink takes the {lane} lane: its events are counted (/status unrouted), not stored")
    return warnings


# --- demo ----------------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from agent.demo import run_demo
    from agent.logs import setup_logging

    setup_logging("WARNING")
    return _run_loop(lambda: run_demo(seconds=args.seconds, data_dir=args.data_dir))


# --- buffer --------------------------------------------------------------------------------------


def _cmd_buffer_stats(args: argparse.Namespace) -> int:
    settings = _load(args)
    if settings is None:
        return EXIT_BAD_INPUT
    from buffer import inspect_stats

    configured = [s.name for s in settings.sink_configs()]
    path = settings.data_path(settings.buffer.path)
    try:
        stats = asyncio.run(inspect_stats(path, configured))
    except FileNotFoundError:
        return _fail(f"{path}: no buffer file (has the agent run with this config?)")
    if args.json:
        print(msgspec.json.encode(stats).decode())
        return EXIT_OK
    print(f"buffer {path}: {stats.size_bytes / 1e6:.1f} MB, {stats.dead_letters} dead letters")
    for name, sink in stats.sinks.items():
        print(f"  sink {name}: depth {sink.depth}")
        for lane, entry in sink.lanes.items():
            age = "-" if entry.oldest_age_seconds is None else f"{entry.oldest_age_seconds:.1f}s"
            print(f"    {lane:<12} depth {entry.depth:>10}  oldest {age}")
    for name, depth in stats.orphaned.items():
        print(f"  orphaned {name}: {depth} events (sink no longer configured; purge with `buffer purge --sink {name}`)")
    return EXIT_OK


def _cmd_buffer_dead_letters(args: argparse.Namespace) -> int:
    settings = _load(args)
    if settings is None:
        return EXIT_BAD_INPUT
    from buffer import inspect_dead_letters

    path = settings.data_path(settings.buffer.path)
    try:
        letters = asyncio.run(inspect_dead_letters(path, args.sink))
    except FileNotFoundError:
        return _fail(f"{path}: no buffer file (has the agent run with this config?)")
    if args.json:
        rows = [
            {"id": d.id, "type": d.type, "subject": d.subject, "sink": d.sink, "reason": d.reason, "time": d.time}
            for d in letters
        ]
        print(json.dumps(rows))
        return EXIT_OK
    for d in letters:
        print(f"{d.id}  {d.type}  subject={d.subject}  sink={d.sink}  reason={d.reason}")
    print(f"{len(letters)} dead letter(s)")
    return EXIT_OK


# --- schema --------------------------------------------------------------------------------------


def _cmd_schema(args: argparse.Namespace) -> int:
    if args.what == "config":
        from agent.settings import Settings

        print(json.dumps(Settings.model_json_schema(), indent=2))
        return EXIT_OK
    from agent.events import events_json_schema

    print(json.dumps(events_json_schema(), indent=2))
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    logging.basicConfig()
    sys.exit(main())
