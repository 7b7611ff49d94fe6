"""asyncwatch's memory benchmark: RSS growth over a million tasks.

    python benchmarks/memory.py                  # 1,000,000 tasks (+ a third half-million), plain and asyncwatch
    python benchmarks/memory.py --smoke          # 10,000 (+ 5,000): checks that it runs
    python benchmarks/memory.py --tasks 2000000 --modes plain asyncwatch uvloop asyncwatch-uvloop

Each mode runs in a fresh process (`_child.py`, workload ``million_tasks``):
1.5 x TASKS short tasks in three equal segments ("half-millions" at the
default size), in batches of 10,000 through ``gather``; one task in 20 raises
(retrieved by ``gather``), one in 20 is cancelled mid-sleep.  The RSS is read
from /proc/self/statm after a full garbage collection before the first task
and after each segment.

Reported per mode:

* growth over TASKS tasks: RSS after the second segment minus RSS before the
  first (target for asyncwatch: at most 50 MB);
* growth from the 2nd to the 3rd segment: RSS after the third minus after the
  second (target: none, i.e. within 1 MiB of allocator noise).

Exit status: 0 when every mode ran (targets are reported, not enforced); 1 on
a failure; 3 when asyncwatch reported a finding (a false positive).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import workloads
from _child import EXIT_FINDINGS, MODES
from run import (
    asyncwatch_description,
    machine_description,
    probe_modes,
    run_child,
    set_asyncwatch_src,
    stop_children_on_sigterm,
)

GROWTH_TARGET_MB = 50.0  # the "MB", read as 10**6 bytes
FLAT_TOLERANCE_MIB = 1.0  # "no growth": within this much (page and allocator granularity)
MEMORY_MODES = tuple(
    m for m in MODES if m in ("plain", "asyncwatch", "asyncwatch-spans", "uvloop", "asyncwatch-uvloop")
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=None, help="the 'million' (default 1,000,000; smoke 10,000)")
    parser.add_argument("--batch", type=int, default=None, help="tasks per gather (default 10,000; smoke 1,000)")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["plain", "asyncwatch"],
        choices=MEMORY_MODES,
        metavar="MODE",
        help=f"default: plain asyncwatch; any of {', '.join(MEMORY_MODES)}",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that it runs")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per child process")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--asyncwatch-src", metavar="DIR", help="import asyncwatch from DIR instead of the installed one"
    )
    args = parser.parse_args(argv)
    if args.tasks is not None and (args.tasks < 2 or args.tasks % 2):
        parser.error("--tasks must be an even number of at least 2")
    return args


def mib(n: float) -> str:
    return f"{n / 2**20:+.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    set_asyncwatch_src(args.asyncwatch_src)
    stop_children_on_sigterm()
    workload = workloads.WORKLOADS[workloads.MEMORY]
    sizes = workload.sizes(args.smoke)
    if args.tasks is not None:
        sizes["segment"] = args.tasks // 2
    if args.batch is not None:
        sizes["batch"] = args.batch
    million = 2 * sizes["segment"]

    availability = probe_modes(list(dict.fromkeys(args.modes)))
    modes = []
    for mode, reason in availability.items():
        if reason is None:
            modes.append(mode)
        else:
            print(f"{mode}: {reason}; skipped")

    results: dict[str, dict[str, Any]] = {}
    failed = false_positive = False
    with tempfile.TemporaryDirectory(prefix="asyncwatch-memory-") as workdir:
        for mode in modes:
            m = run_child(
                workload.name,
                mode,
                smoke=args.smoke,
                sizes=[f"{k}={v}" for k, v in sizes.items()],
                timeout_s=args.timeout,
                round_no=1,
                workdir=workdir,
            )
            if m.error:
                print(f"FAILED: {mode}: {m.error}")
                failed = True
                continue
            if m.findings:
                print(f"FALSE POSITIVE: asyncwatch reported {len(m.findings)} finding(s) under {mode}:")
                for f in m.findings[:5]:
                    print(f"  {f.get('kind')}: {f.get('message')}")
                false_positive = True
            s = m.info["rss_samples"]
            results[mode] = {
                "rss_samples_bytes": s,
                "growth_over_million_bytes": s[2] - s[0],
                "growth_third_segment_bytes": s[3] - s[2],
                "peak_rss_bytes": m.peak_rss_bytes,
                "elapsed_s": m.elapsed_s,
                "tasks": m.info["tasks"],
                "failed_tasks": m.info["failed"],
                "cancelled_tasks": m.info["cancelled"],
            }

    seg = sizes["segment"]
    print()
    print(
        f"asyncwatch memory benchmark{' (smoke sizes: numbers mean nothing)' if args.smoke else ''}: "
        f"{3 * seg:,} tasks in 3 segments of {seg:,}, batches of {sizes['batch']:,} through gather"
    )
    print(f"machine: {machine_description()}")
    print(f"asyncwatch: {asyncwatch_description()}")
    print()
    header = [
        "mode",
        "RSS at start",
        f"after {seg:,}",
        f"after {2 * seg:,}",
        f"after {3 * seg:,}",
        f"growth over {million:,}",
        "growth 2nd->3rd segment",
        "peak RSS",
    ]
    rows = []
    for mode, r in results.items():
        s = r["rss_samples_bytes"]
        rows.append(
            [
                mode,
                f"{s[0] / 2**20:.1f} MiB",
                f"{s[1] / 2**20:.1f} MiB",
                f"{s[2] / 2**20:.1f} MiB",
                f"{s[3] / 2**20:.1f} MiB",
                f"{mib(r['growth_over_million_bytes'])} MiB",
                f"{mib(r['growth_third_segment_bytes'])} MiB",
                f"{r['peak_rss_bytes'] / 2**20:.1f} MiB",
            ]
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
    print()
    if args.smoke:
        print("targets: not evaluated with smoke sizes")
    else:
        print("targets (issue 5), asyncwatch modes:")
        for mode, r in results.items():
            if not mode.startswith("asyncwatch"):
                continue
            growth, flat = r["growth_over_million_bytes"], r["growth_third_segment_bytes"]
            ok1 = growth <= GROWTH_TARGET_MB * 1e6
            ok2 = flat <= FLAT_TOLERANCE_MIB * 2**20
            print(
                f"  {'met   ' if ok1 else 'MISSED'} {mode}: growth over {million:,} tasks {growth / 1e6:+.1f} MB "
                f"(target <= {GROWTH_TARGET_MB:.0f} MB)"
            )
            print(
                f"  {'met   ' if ok2 else 'MISSED'} {mode}: growth from the 2nd to the 3rd segment "
                f"{mib(flat)} MiB (target: none, within {FLAT_TOLERANCE_MIB:.0f} MiB)"
            )

    if args.json:
        doc = {
            "machine": machine_description(),
            "asyncwatch": asyncwatch_description(),
            "smoke": args.smoke,
            "sizes": sizes,
            "results": results,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if false_positive:
        return EXIT_FINDINGS
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
