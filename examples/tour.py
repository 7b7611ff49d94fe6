"""A tour of asyncwatch: run every mistake and its fix, and show what was found.

Each script runs in a subprocess under

    python -m asyncwatch run --findings <tmpfile> --no-summary --log-format off <script>

and the findings file (JSON Lines, one finding per line) is read back.  The
table shows, for each mistake, the kind asyncwatch reported and the
``file:line`` it points at (checked against the line marked
``# <- asyncwatch reports this line`` in the script), and that the fixed
version is clean.

    python examples/tour.py

Works from any directory.  Exits 0 when every mistake was reported as
expected and every fixed version was clean, 1 otherwise.
"""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
MARKER = "# <- asyncwatch reports this line"
# Stalls asyncwatch reports but does not blame on the program (the garbage
# collector, another thread holding the GIL, a machine short of CPUs, an
# import): --fail-on-findings does not count them, and neither does the tour.
NOT_THE_PROGRAMS = {"gc", "gil", "starved", "import"}

# (mistake script, the kind asyncwatch should report); the fix is <name>_fixed.py
MISTAKES = [
    ("slow_callback", "slow_callback"),
    ("orphan_task", "task_destroyed_pending"),
    ("never_awaited", "coroutine_never_awaited"),
    ("swallowed_cancel", "cancellation_swallowed"),
    ("unretrieved_exception", "task_exception_unretrieved"),
]


def marked_line(path):
    """The line number carrying MARKER in *path* (None if there is none)."""
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, 1):
            if MARKER in text:
                return number
    return None


def run_under_asyncwatch(path):
    """Run *path* under asyncwatch; return (exit status, findings, stderr)."""
    with tempfile.TemporaryDirectory() as tmp:
        findings_file = os.path.join(tmp, "findings.jsonl")
        command = [
            sys.executable, "-m", "asyncwatch", "run",
            "--findings", findings_file, "--no-summary", "--log-format", "off",
            path,
        ]  # fmt: skip
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
        findings = []
        if os.path.exists(findings_file):
            with open(findings_file, encoding="utf-8") as f:
                findings = [json.loads(line) for line in f if line.strip()]
    return proc.returncode, findings, proc.stderr


def describe(findings):
    """'3 x slow_callback at slow_callback.py:29', one entry per (kind, site)."""
    if not findings:
        return "nothing (clean)"
    counts = Counter()
    for f in findings:
        site = f.get("site")
        where = f"{os.path.basename(site['file'])}:{site['line']}" if site else "unknown site"
        counts[(f["kind"], where)] += 1
    parts = [f"{n} x {kind} at {where}" if n > 1 else f"{kind} at {where}" for (kind, where), n in counts.items()]
    return "; ".join(parts)


def main():
    if importlib.util.find_spec("asyncwatch") is None:
        print(f"asyncwatch is not installed for {sys.executable}; use the Python that has it.", file=sys.stderr)
        return 2
    width = max(len(name) for name, _ in MISTAKES) + len("_fixed.py") + 2
    print("asyncwatch tour: each mistake next to its fix\n")
    print(f"{'script':<{width}}{'':<5}asyncwatch found")
    print(f"{'-' * (width - 2):<{width}}{'':<5}{'-' * 16}")
    all_ok = True
    for name, kind in MISTAKES:
        for script, expect_kind in ((f"{name}.py", kind), (f"{name}_fixed.py", None)):
            path = os.path.join(HERE, script)
            status, findings, stderr = run_under_asyncwatch(path)
            elsewhere = [f for f in findings if f.get("cause") in NOT_THE_PROGRAMS]
            findings = [f for f in findings if f.get("cause") not in NOT_THE_PROGRAMS]
            if expect_kind is None:
                ok = status == 0 and not findings
            else:
                line = marked_line(path)
                ok = (
                    status == 0
                    and bool(findings)
                    and all(
                        f["kind"] == expect_kind
                        and f.get("site")
                        and f["site"]["file"] == path
                        and f["site"]["line"] == line
                        for f in findings
                    )
                )
            all_ok = all_ok and ok
            verdict = "ok" if ok else "??"
            text = describe(findings)
            if elsewhere:
                causes = ", ".join(sorted({f["cause"] for f in elsewhere}))
                text += f" (+{len(elsewhere)} stall(s) not the program's: {causes})"
            if status != 0:
                text += f" (exit status {status})"
            print(f"{script:<{width}}{verdict:<5}{text}", flush=True)
            if not ok and stderr.strip():
                print("    stderr: " + stderr.strip().replace("\n", "\n    "))
        print()
    if all_ok:
        print("Every mistake was reported at its marked line; every fixed version is clean.")
    else:
        print("Something unexpected happened: see the lines marked '??'.")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
