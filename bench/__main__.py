"""``python -m bench [--quick] [--profile] [--primed] [SCENARIO ...]``: run the benchmarks, print the table.

Scenarios (all by default, in this order): ``ingest`` (a), ``drain`` (b), ``e2e`` (c),
``idle`` (d), ``tags`` (e), ``modbus`` (f), ``barcode`` (g), ``mes`` (h), ``https`` (i),
``rules`` (j), ``sequencing`` (k), ``journal`` (l); the letters work as names too. Each writes
``bench/results/<name>.json`` (``<name>.quick.json`` with ``--quick``) with every raw figure and the machine.
Exit status: 0 when every scenario ran (targets missed or not), 1 when one failed to
run, 1 with ``--strict`` when a target was missed.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from bench.common import Row, ScenarioResult, SystemCpu, loadavg, machine_info

SCENARIOS = (
    "ingest", "drain", "e2e", "idle", "tags", "modbus", "barcode", "mes", "https", "rules", "sequencing", "journal"
)
ALIASES = {
    "a": "ingest",
    "b": "drain",
    "c": "e2e",
    "d": "idle",
    "e": "tags",
    "f": "modbus",
    "g": "barcode",
    "h": "mes",
    "i": "https",
    "j": "rules",
    "k": "sequencing",
    "l": "journal",
}


def _runner(name: str, args: argparse.Namespace) -> Callable[[], ScenarioResult]:
    if name == "journal":
        from bench import journal

        return lambda: journal.run(quick=args.quick)
    if name == "ingest":
        from bench import ingest

        return lambda: ingest.run(quick=args.quick)
    if name == "drain":
        from bench import drain

        return lambda: drain.run(quick=args.quick, profile=args.profile)
    if name == "tags":
        from bench import tags

        return lambda: tags.run(quick=args.quick, profile=args.profile)
    if name == "modbus":
        from bench import modbus

        return lambda: modbus.run(quick=args.quick)
    if name == "barcode":
        from bench import barcode

        return lambda: barcode.run(quick=args.quick)
    if name == "mes":
        from bench import mes

        return lambda: mes.run(quick=args.quick)
    if name == "https":
        from bench import https_drain

        return lambda: https_drain.run(quick=args.quick)
    if name == "rules":
        from bench import rules

        return lambda: rules.run(quick=args.quick)
    if name == "sequencing":
        from bench import sequencing

        return lambda: sequencing.run(quick=args.quick)
    from bench import e2e

    if name == "e2e":
        return lambda: e2e.run(quick=args.quick, profile=args.profile, primed=args.primed)
    return lambda: e2e.run_idle(quick=args.quick, primed=args.primed)


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 0.1 or value == 0:
        return f"{value:.2f}"
    return f"{value:.4f}"


def print_table(rows: list[Row], out: Any = sys.stdout) -> None:
    """One line per row: ours next to the target and the peer (ThingsBoard IoT Gateway 3.8.5)."""
    headers = ["scenario", "metric", "ours", "unit", "target", "", "peer (TB 3.8.5)", "CPU cores", "RSS MB", "notes"]
    table = [
        [
            r.scenario,
            r.metric,
            _fmt(r.value),
            r.unit,
            r.target,
            {True: "PASS", False: "MISS", None: ""}[r.ok],
            r.peer,
            _fmt(r.cpu_cores),
            _fmt(r.rss_mb),
            r.note,
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in table)) if table else len(h) for i, h in enumerate(headers)]
    widths[-1] = len(headers[-1])  # notes are not padded

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in (2, 7, 8) else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    print(line(headers), file=out)
    print(line(["-" * w for w in widths]), file=out)
    for cells in table:
        print(line(cells), file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "scenarios", nargs="*", help=f"which to run: {', '.join(SCENARIOS)} (or a b c d e); default all"
    )
    parser.add_argument("--quick", action="store_true", help="short versions of every scenario (a smoke test)")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the agent in drain, e2e and tags (adds overhead)"
    )
    parser.add_argument(
        "--primed",
        action="store_true",
        help="e2e/idle: run the agent once and restart it before measuring (sink cursors already exist)",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    names: list[str] = []
    for raw in args.scenarios or SCENARIOS:
        name = ALIASES.get(raw.lower(), raw.lower())
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {raw!r}; choose from {', '.join(SCENARIOS)} (or a b c d e)")
        if name not in names:
            names.append(name)

    machine = machine_info()
    print(
        f"plantgate bench{' (quick)' if args.quick else ''}: {machine['nproc']} x {machine['cpu_model']}, "
        f"Python {machine['python']}, {machine['date']}, load {loadavg()}",
        flush=True,
    )
    rows: list[Row] = []
    failed: list[str] = []
    started = time.monotonic()
    for name in names:
        print(f"\n== {name} ...", flush=True)
        t0 = time.monotonic()
        system = SystemCpu().start()
        load_before = loadavg()
        try:
            result = _runner(name, args)()
        except Exception as exc:
            traceback.print_exc()
            failed.append(name)
            result = ScenarioResult(name, f"{name} (failed)", quick=args.quick)
            result.figures = {"error": f"{type(exc).__name__}: {exc}"}
            result.rows.append(Row(name, "failed to run", None, "", "", False, note=str(exc)[:200]))
        system.stop()
        result.figures["harness"] = {
            "seconds": round(time.monotonic() - t0, 1),
            "machine_busy_cores": round(system.cores, 3),
            "machine_pressure": system.pressure,
            "loadavg_before": load_before,
            "loadavg_after": loadavg(),
            "primed": args.primed,
            "profiled": args.profile,
        }
        path = result.write(machine)
        print_table(result.rows)
        print(f"   ({time.monotonic() - t0:.0f} s; {path.relative_to(path.parent.parent.parent)})", flush=True)
        rows.extend(result.rows)

    print(f"\n== summary ({time.monotonic() - started:.0f} s)")
    print_table(rows)
    misses = [r for r in rows if r.ok is False]
    passes = [r for r in rows if r.ok is True]
    print(f"\n{len(passes)} PASS, {len(misses)} MISS" + (f"; failed to run: {', '.join(failed)}" if failed else ""))
    if failed or (args.strict and misses):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
