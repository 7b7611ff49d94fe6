"""asyncwatch's benchmark: what it costs next to plain asyncio, and next to the alternatives.

    python benchmarks/run.py                      # the full protocol: 5 rounds, every workload and mode
    python benchmarks/run.py --smoke --rounds 1   # tiny sizes, to check that it runs (CI)
    python benchmarks/run.py --workloads tcp_echo --modes plain asyncwatch --rounds 9
    # the watchdog's wall-time cost on a loop that never idles (issue 15): 15+ shuffled rounds
    python benchmarks/run.py --workloads producer_consumer call_soon --modes plain asyncwatch-watchdog --rounds 15

Every measurement is one fresh process (`_child.py`), which times the workload
itself (no interpreter start-up or imports), after a warm-up run with tiny
sizes in the same mode (`_child.py` says why).  Within a round every workload
runs once in every mode, the modes in a new random order each time, so that
drift (thermal, other load) spreads over all modes instead of biasing one.
For each round the ratio of a mode's time to its baseline's time *in that
round* is taken; the table shows the median of those ratios and their spread
(min-max over the rounds).  The baseline is plain asyncio, and plain uvloop
for asyncwatch on uvloop.

Exit status: 0 when every measurement ran (targets are reported, not
enforced); 1 when a measurement failed; 3 when asyncwatch reported a finding
in a workload (a false positive).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import workloads
from _child import BASELINE, EXIT_FINDINGS, EXIT_UNAVAILABLE, MODES

# Run as a script, this directory is first on sys.path: the imports above find its modules.
HERE = Path(__file__).resolve().parent
CHILD = HERE / "_child.py"
DEFAULT_TIMEOUT_S = 300.0

#: The issue's targets: (mode, workload or None for every workload, the highest ratio).
TARGETS: tuple[tuple[str, str | None, float], ...] = (
    ("asyncwatch", "task_churn", 1.05),
    ("asyncwatch", "call_soon", 1.05),
    ("asyncwatch", "tcp_echo", 1.03),
    ("asyncwatch", "producer_consumer", 1.05),
    # Issue 15: the watchdog alone on a loop that never idles, in wall time.
    ("asyncwatch-watchdog", "producer_consumer", 1.02),
    ("asyncwatch-watchdog", "call_soon", 1.02),
    ("asyncwatch-uvloop", None, 1.05),
    ("asyncwatch-spans", "task_churn", 3.0),
    ("asyncwatch-spans", "tcp_echo", 1.10),
)


@dataclass
class Measurement:
    """One child process's result (or its failure)."""

    round: int
    workload: str
    mode: str
    elapsed_s: float | None = None
    cpu_s: float | None = None
    peak_rss_bytes: int | None = None
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    findings: list[dict[str, Any]] = field(default_factory=list)


#: Where children import asyncwatch from, ahead of the installed one (``--asyncwatch-src``).
_asyncwatch_src: str | None = None


def set_asyncwatch_src(path: str | None) -> None:
    """Make children import asyncwatch from *path* (a directory holding ``asyncwatch/``)."""
    global _asyncwatch_src
    if path is not None and not (Path(path) / "asyncwatch" / "__init__.py").is_file():
        raise SystemExit(f"--asyncwatch-src {path!r}: no asyncwatch/__init__.py in that directory")
    _asyncwatch_src = None if path is None else str(Path(path).resolve())


def child_env() -> dict[str, str]:
    """The environment for children: ours, minus anything that would change a mode."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ASYNCWATCH_") and k not in ("PYTHONASYNCIODEBUG", "PYTHONDEVMODE")
    }
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    if _asyncwatch_src is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_asyncwatch_src, env.get("PYTHONPATH")]))
    return env


def asyncwatch_description() -> str:
    """Which asyncwatch the children import: version, path, and its git state when it has one."""
    proc = subprocess.run(
        [sys.executable, "-c", "import asyncwatch; print(asyncwatch.__version__); print(asyncwatch.__file__)"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )
    if proc.returncode != 0:
        return "not importable"
    version, path = proc.stdout.split()[:2]
    where = Path(path).resolve().parent
    text = f"{version} from {where}"
    try:
        commit = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if commit.returncode == 0:
            dirty = subprocess.run(
                ["git", "-C", str(where), "status", "--porcelain", "--", "."],
                check=False,
                capture_output=True,
                text=True,
                timeout=30,
            )
            text += f", commit {commit.stdout.strip()}" + (" with uncommitted changes" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return text


def run_child(
    workload: str,
    mode: str,
    *,
    smoke: bool,
    sizes: Sequence[str],
    timeout_s: float,
    round_no: int,
    workdir: str,
    warmup: bool = True,
) -> Measurement:
    """Run one measurement in a fresh process; never raise, never hang."""
    cmd = [sys.executable, str(CHILD), "--workload", workload, "--mode", mode]
    if smoke:
        cmd.append("--smoke")
    if not warmup:
        cmd.append("--no-warmup")
    for size in sizes:
        cmd += ["--size", size]
    m = Measurement(round=round_no, workload=workload, mode=mode)
    try:
        proc = subprocess.run(
            cmd, check=False, capture_output=True, text=True, timeout=timeout_s, env=child_env(), cwd=workdir
        )
    except subprocess.TimeoutExpired:
        m.error = f"timed out after {timeout_s:.0f} s"
        return m
    record: dict[str, Any] = {}
    lines = proc.stdout.strip().splitlines()
    if lines:
        try:
            record = json.loads(lines[-1])
        except json.JSONDecodeError:
            record = {}
    if proc.returncode == EXIT_UNAVAILABLE:
        m.error = "unavailable: " + str(record.get("unavailable", "?"))
        return m
    if proc.returncode not in (0, EXIT_FINDINGS) or "elapsed_s" not in record:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        m.error = f"exit status {proc.returncode}\n{tail}"
        return m
    m.elapsed_s = float(record["elapsed_s"])
    m.cpu_s = float(record["cpu_s"]) if "cpu_s" in record else None
    m.peak_rss_bytes = int(record["peak_rss_bytes"])
    m.info = record.get("info", {})
    m.findings = record.get("findings", [])
    return m


def stop_children_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that ``subprocess.run`` kills the running
    child on its way out instead of leaving it behind."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def sizes_for(workload: str, overrides: Sequence[str]) -> list[str]:
    """The ``--size`` overrides (``workload.name=value``) that apply to *workload*."""
    picked = []
    for item in overrides:
        target, _, rest = item.partition(".")
        if target == workload:
            picked.append(rest)
    return picked


# --- statistics and tables -------------------------------------------------------


@dataclass
class Cell:
    """A mode on a workload: median time, and ratios to its baseline."""

    median_s: float | None
    ratios: list[float]
    peak_rss_mb: float | None
    failed: int

    @property
    def ratio(self) -> float | None:
        return statistics.median(self.ratios) if self.ratios else None


def _time(m: Measurement | None, clock: str) -> float | None:
    if m is None:
        return None
    return m.cpu_s if clock == "cpu" else m.elapsed_s


def summarize(
    measurements: Sequence[Measurement], workloads_: Sequence[str], modes: Sequence[str], clock: str = "wall"
) -> dict[str, dict[str, Cell]]:
    """Per workload and mode: the median time, the per-round ratios to the baseline, the median peak RSS.

    *clock* "wall" compares elapsed times; "cpu" compares the CPU time the
    process used (all threads), which leaves out time spent waiting for a
    core (but not cache contention, nor, in a VM, stolen time)."""
    by_key: dict[tuple[int, str, str], Measurement] = {(m.round, m.workload, m.mode): m for m in measurements}
    rounds = sorted({m.round for m in measurements})
    table: dict[str, dict[str, Cell]] = {}
    for w in workloads_:
        table[w] = {}
        for mode in modes:
            mine = [by_key[(r, w, mode)] for r in rounds if (r, w, mode) in by_key]
            times = [t for t in (_time(m, clock) for m in mine) if t is not None]
            rss = [m.peak_rss_bytes / 2**20 for m in mine if m.peak_rss_bytes is not None]
            ratios = []
            for r in rounds:
                this = _time(by_key.get((r, w, mode)), clock)
                base = _time(by_key.get((r, w, BASELINE[mode])), clock)
                if this and base:
                    ratios.append(this / base)
            table[w][mode] = Cell(
                median_s=statistics.median(times) if times else None,
                ratios=ratios,
                peak_rss_mb=statistics.median(rss) if rss else None,
                failed=sum(1 for m in mine if m.error),
            )
    return table


def _ratio_text(cell: Cell, single: bool) -> str:
    if cell.ratio is None:
        return "FAILED" if cell.failed else "-"
    text = f"{cell.ratio:.2f}x"
    if not single:
        text += f" ({min(cell.ratios):.2f}-{max(cell.ratios):.2f})"
    return text


def render_table(table: dict[str, dict[str, Cell]], modes: Sequence[str], *, markdown: bool) -> str:
    """Rows: modes; columns: workloads.  The first row is plain asyncio's median time."""
    wls = list(table)
    single = all(len(c.ratios) <= 1 for row in table.values() for c in row.values())
    header = ["mode", *wls]
    rows: list[list[str]] = []
    plain_row = ["plain asyncio, median"]
    for w in wls:
        cell = table[w].get("plain")
        plain_row.append(f"{cell.median_s:.3f} s" if cell and cell.median_s is not None else "FAILED")
    rows.append(plain_row)
    for mode in modes:
        if mode == "plain":
            continue
        label = mode if BASELINE[mode] == "plain" else f"{mode} (vs uvloop)"
        rows.append([label, *(_ratio_text(table[w][mode], single) for w in wls)])
    return _format(header, rows, markdown)


def render_rss(table: dict[str, dict[str, Cell]], modes: Sequence[str], *, markdown: bool) -> str:
    """Median peak RSS in MiB per mode and workload."""
    wls = list(table)
    rows = [
        [mode, *(f"{table[w][mode].peak_rss_mb:.0f}" if table[w][mode].peak_rss_mb is not None else "-" for w in wls)]
        for mode in modes
    ]
    return _format(["peak RSS (MiB)", *wls], rows, markdown)


def _format(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row))

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)])


def check_targets(table: dict[str, dict[str, Cell]]) -> list[str]:
    """One line per applicable target: met or missed, with the median ratio and the worst round."""
    lines = []
    for mode, workload, limit in TARGETS:
        for w in [workload] if workload else list(table):
            cell = table.get(w, {}).get(mode)
            if cell is None or cell.ratio is None:
                continue
            verdict = "met   " if cell.ratio <= limit else "MISSED"
            base = "plain uvloop" if BASELINE[mode] == "uvloop" else "plain asyncio"
            lines.append(
                f"  {verdict} {mode} on {w}: {cell.ratio:.3f}x of {base} (target <= {limit:.2f}x; "
                f"worst round {max(cell.ratios):.3f}x)"
            )
    return lines


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, or "?" where the OS has none."""
    if not hasattr(os, "getloadavg"):
        return "?"
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_description() -> str:
    """One line about where this ran: CPU, cores, OS, Python, the load now."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"{platform.python_implementation()} {platform.python_version()}, load average {load_average()}"
    )


def probe_modes(modes: Sequence[str]) -> dict[str, str | None]:
    """Ask children which of *modes* are available here (mode -> None, or the reason it is not)."""
    proc = subprocess.run(
        [sys.executable, str(CHILD), "--probe", *modes],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        env=child_env(),
    )
    if proc.returncode != 0:
        raise SystemExit(f"run.py: probing the modes failed:\n{proc.stderr}")
    found: dict[str, str | None] = json.loads(proc.stdout.strip().splitlines()[-1])
    return {mode: found.get(mode, "unknown mode") for mode in modes}


# --- main --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rounds", type=int, default=5, help="rounds (fresh processes per workload and mode); default 5"
    )
    parser.add_argument(
        "--workloads",
        nargs="+",
        default=list(workloads.TIMED),
        choices=list(workloads.TIMED),
        metavar="WORKLOAD",
        help=f"default: all of {', '.join(workloads.TIMED)}",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        default=list(MODES),
        choices=list(MODES),
        metavar="MODE",
        help=f"default: every available one of {', '.join(MODES)}",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that everything runs, time nothing")
    parser.add_argument(
        "--size",
        action="append",
        default=[],
        metavar="WORKLOAD.NAME=INT",
        help="override a size, e.g. --size task_churn.tasks=100000 (repeatable)",
    )
    parser.add_argument(
        "--no-warmup", action="store_true", help="time each process's first run (see _child.py on why not)"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for the order of modes (default: random)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per child process")
    parser.add_argument("--json", metavar="PATH", help="also write every measurement and the summary as JSON")
    parser.add_argument(
        "--asyncwatch-src",
        metavar="DIR",
        help="import asyncwatch from DIR (holding asyncwatch/) instead of the installed one, e.g. a checkout's src",
    )
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--report", metavar="PATH", help="only print the tables of a run saved with --json PATH")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    for item in args.size:
        target, _, rest = item.partition(".")
        name, eq, value = rest.partition("=")
        if target not in workloads.WORKLOADS or not eq or not value.lstrip("-").isdigit():
            parser.error(f"--size {item!r}: use WORKLOAD.NAME=INT, e.g. task_churn.tasks=100000")
        try:
            workloads.WORKLOADS[target].sizes(False, {name: int(value)})
        except KeyError as exc:
            parser.error(f"--size {item!r}: {exc.args[0]}")
    return args


def report(path: str, *, markdown: bool) -> int:
    """Print the tables and targets of a run saved with ``--json``, without running anything."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    measurements = [Measurement(**m) for m in doc["measurements"]]
    wls = list(doc["summary"])
    modes = [m for m in MODES if any(m in row for row in doc["summary"].values())]
    table = summarize(measurements, wls, modes)
    print(
        f"{doc['rounds']} round(s); machine: {doc['machine']} (at the start: {doc.get('load_average_at_start', '?')})"
    )
    print(f"asyncwatch: {doc.get('asyncwatch', '?')}")
    print()
    print(render_table(table, modes, markdown=markdown))
    print()
    print(render_rss(table, modes, markdown=markdown))
    if not doc["smoke"]:
        print()
        print("\n".join(check_targets(table)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        return report(args.report, markdown=args.markdown)
    set_asyncwatch_src(args.asyncwatch_src)
    stop_children_on_sigterm()
    modes = list(dict.fromkeys(args.modes))  # de-duplicated, in the order given
    wls = list(dict.fromkeys(args.workloads))

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    # Plain asyncio is every table's first row, and a ratio needs its baseline in the same round.
    wanted = {"plain", *modes, *(BASELINE[m] for m in modes)}
    availability = probe_modes([m for m in MODES if m in wanted])
    skipped = {mode: reason for mode, reason in availability.items() if reason is not None}
    for mode, reason in skipped.items():
        print(f"{mode}: {reason}; skipped")
    modes = [m for m in MODES if m in wanted and m not in skipped]
    if "plain" not in modes:
        raise SystemExit("run.py: plain asyncio cannot run here, so there is nothing to compare with")

    load_at_start = load_average()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    measurements: list[Measurement] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="asyncwatch-bench-") as workdir:
        for round_no in range(1, args.rounds + 1):
            for w in wls:
                order = list(modes)
                rng.shuffle(order)
                timeout = max(args.timeout, workloads.WORKLOADS[w].timeout_s or 0)
                for mode in order:
                    m = run_child(
                        w,
                        mode,
                        smoke=args.smoke,
                        sizes=sizes_for(w, args.size),
                        timeout_s=timeout,
                        round_no=round_no,
                        workdir=workdir,
                        warmup=not args.no_warmup,
                    )
                    measurements.append(m)
                    status = m.error.splitlines()[0] if m.error else f"{m.elapsed_s:.3f} s"
                    if m.findings:
                        status += f", {len(m.findings)} FINDINGS"
                    log(f"round {round_no}/{args.rounds}  {w:<18} {mode:<18} {status}")

    table = summarize(measurements, wls, modes)
    failures = [m for m in measurements if m.error]
    false_positives = [m for m in measurements if m.findings]

    print()
    print(
        f"asyncwatch benchmark: {args.rounds} round(s){' (smoke sizes: timings mean nothing)' if args.smoke else ''}, "
        f"mode order seed {seed}, {time.monotonic() - started:.0f} s"
    )
    print(f"machine: {machine_description()} (at the start: {load_at_start})")
    print(f"asyncwatch: {asyncwatch_description()}")
    print(
        "sizes: "
        + "; ".join(
            f"{w} "
            + ", ".join(
                f"{k}={v:,}" for k, v in workloads.WORKLOADS[w].sizes(args.smoke, _overrides(w, args.size)).items()
            )
            for w in wls
        )
    )
    cpu_table = summarize(measurements, wls, modes, clock="cpu")
    print()
    print("Wall time: plain asyncio's median; every other mode as the median of its per-round ratio")
    print("to plain asyncio (asyncwatch-uvloop: to plain uvloop), with the min-max over rounds.")
    print()
    print(render_table(table, modes, markdown=args.markdown))
    print()
    print("CPU time of the process (all its threads, asyncwatch's watchdog included), the same way.")
    print("It leaves out time spent waiting for a core, not cache and memory contention, nor (in a VM)")
    print("time the hypervisor gave away; for a count no load disturbs, see benchmarks/instructions.py.")
    print()
    print(render_table(cpu_table, modes, markdown=args.markdown))
    print()
    print(render_rss(table, modes, markdown=args.markdown))
    print()
    if args.smoke:
        print("targets: not evaluated with smoke sizes")
    else:
        print("targets (issue 5; ratios in this run), wall time:")
        print("\n".join(check_targets(table)) or "  (none applicable to the modes run)")
        print("the same on CPU time:")
        print("\n".join(check_targets(cpu_table)) or "  (none applicable to the modes run)")
    for m in failures:
        print(f"\nFAILED: {m.workload} / {m.mode} in round {m.round}: {m.error}")
    for m in false_positives:
        print(f"\nFALSE POSITIVE: asyncwatch reported {len(m.findings)} finding(s) in {m.workload} / {m.mode}:")
        for f in m.findings[:5]:
            print(f"  {f.get('kind')}: {f.get('message')}")

    if args.json:
        doc = {
            "machine": machine_description(),
            "load_average_at_start": load_at_start,
            "asyncwatch": asyncwatch_description(),
            "python": platform.python_version(),
            "rounds": args.rounds,
            "smoke": args.smoke,
            "seed": seed,
            "skipped": skipped,
            "sizes": {w: workloads.WORKLOADS[w].sizes(args.smoke, _overrides(w, args.size)) for w in wls},
            "summary": {
                w: {
                    mode: {
                        "baseline": BASELINE[mode],
                        "median_s": c.median_s,
                        "ratio_median": c.ratio,
                        "ratios": c.ratios,
                        "peak_rss_mib_median": c.peak_rss_mb,
                        "failed": c.failed,
                    }
                    for mode, c in row.items()
                }
                for w, row in table.items()
            },
            "measurements": [m.__dict__ for m in measurements],
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if false_positives:
        return EXIT_FINDINGS
    return 1 if failures else 0


def _overrides(workload: str, overrides: Sequence[str]) -> dict[str, int]:
    return {name: int(value) for name, _, value in (s.partition("=") for s in sizes_for(workload, overrides))}


if __name__ == "__main__":
    sys.exit(main())
