"""Watching the processes a program starts, for ``asyncwatch run``.

A forked child (``os.fork``, multiprocessing's ``fork``, the children of
its ``forkserver``) is a copy of a watched process: asyncwatch is installed
in it already.  A new interpreter (``subprocess.run([sys.executable, ...])``,
multiprocessing's ``spawn``, the ``forkserver`` itself) starts from nothing,
so the command line puts ``_bootstrap/`` first on ``PYTHONPATH``: the
``sitecustomize`` there calls `bootstrap`, which installs asyncwatch with the
settings of the run, read from the ``ASYNCWATCH_*`` variables (the way
coverage.py's ``COVERAGE_PROCESS_START`` and ``ddtrace-run`` reach child
processes; a ``.pth`` file in site-packages, as pytest-cov uses, would be
written into the user's environment and outlive the run).

Every child appends its findings to a private *spool* file, one complete
line per ``write()`` on an ``O_APPEND`` descriptor, so the lines of several
processes never interleave; the parent reads it at exit so that its summary
and ``--fail-on-findings`` count the children's findings.  The run's findings
file, if any, is shared the same way.  Children print no summary of their
own: one summary per command, from the process the user started.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
import tempfile
import threading
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

from ._core.findings import Finding, FindingKind, Site
from ._core.runtime import in_forked_child, new_lock
from ._core.settings import (
    ENV_VARS,
    OPTIONS,
    RUN_MARKER,
    ConfigurationError,
    RunSettings,
    Settings,
    environ_for,
    resolve_run,
)
from ._engine import ensure_engine, is_installed
from ._install import finish_at_exit
from ._outputs.collect import SummaryReporter
from ._outputs.jsonl import JsonLinesReporter, finding_line, write_all
from ._outputs.pipeline import Reporter

__all__ = ["BOOTSTRAP_DIR", "Spool", "SpoolReporter", "bootstrap", "start_watching"]

#: The directory put first on the children's ``PYTHONPATH``.
BOOTSTRAP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_bootstrap")

# Options of the engine that `start_watching` passes through from `Settings`.
# --- the spool -----------------------------------------------------------------


class SpoolReporter:
    """Append each finding to the spool as one JSON line, in one ``write()``.

    The file must exist: a child started after the run ended (and removed
    the spool) writes nowhere rather than leave a stray file.  With
    *skip_pid*, the findings of that process (the parent, which counts its
    own in memory) are not written; those of its forked children are.
    It counts, so it receives every finding, rate limit or not.
    """

    receives_all = True

    def __init__(self, path: str, *, skip_pid: int | None = None) -> None:
        self.path = path
        self._skip_pid = skip_pid
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND)
        self._lock = threading.Lock()
        in_forked_child(self, new_lock)  # a lock another thread held at fork() stays held

    def report(self, finding: Finding) -> None:
        if finding.pid == self._skip_pid:
            return
        data = finding_line(finding)
        with self._lock:
            if self._fd is not None:
                write_all(self._fd, data)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class Spool:
    """The parent's side: a private file the children's findings go to."""

    def __init__(self) -> None:
        fd, self.path = tempfile.mkstemp(prefix="asyncwatch-run-", suffix=".jsonl")
        os.close(fd)

    def reporter(self) -> SpoolReporter:
        """The reporter for this (the parent) process: it writes only from forked children."""
        return SpoolReporter(self.path, skip_pid=os.getpid())

    def collect(self, summary: SummaryReporter) -> list[int]:
        """Count the children's findings in *summary*; return the children's pids."""
        pids: list[int] = []
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = f.readlines()
        except OSError:
            return pids
        for line in lines:
            finding = _finding_from_line(line)
            if finding is None:
                continue
            summary.report(finding)
            if finding.pid not in pids:
                pids.append(finding.pid)
        return pids

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def _finding_from_line(line: str) -> Finding | None:
    """What the summary needs of one spooled finding; None for a line that is
    not one (a child of another asyncwatch version may know other kinds)."""
    try:
        record = json.loads(line)
        kind = FindingKind(record["kind"])
        site = record.get("site")
        return Finding(
            kind=kind,
            message=str(record.get("message", "")),
            site=Site(str(site["file"]), int(site["line"]), str(site["function"])) if site else None,
            pid=int(record["pid"]),
            cause=record.get("cause") if isinstance(record.get("cause"), str) else None,
        )
    except (ValueError, KeyError, TypeError):
        return None


def describe_children(count: int, pids: list[int]) -> str:
    """The line the summary adds for the findings of child processes."""
    shown = ", ".join(str(p) for p in pids[:5]) + (", ..." if len(pids) > 5 else "")
    processes = "process" if len(pids) == 1 else "processes"
    return f"asyncwatch: {count} of them from child {processes} (pid {shown})\n"


# --- the environment of the children -----------------------------------------


def export(
    environ: MutableMapping[str, str], settings: Settings, run: RunSettings, spool: Spool, findings: str | None
) -> dict[str, str | None]:
    """Make the Python processes started from now on watch themselves; return
    what to give `restore` to undo it.

    The findings file is passed in the private marker rather than as
    ``ASYNCWATCH_FINDINGS``: a child that calls ``install()`` itself, without
    the bootstrap, must not truncate the file the run shares.
    """
    changes: dict[str, str | None] = dict(environ_for(settings, run))
    changes[ENV_VARS["findings"]] = None
    changes[RUN_MARKER] = json.dumps({"spool": spool.path, "findings": findings})
    path = environ.get("PYTHONPATH")
    changes["PYTHONPATH"] = BOOTSTRAP_DIR + (os.pathsep + path if path else "")
    saved = {name: environ.get(name) for name in changes}
    restore(environ, changes)
    return saved


def restore(environ: MutableMapping[str, str], values: Mapping[str, str | None]) -> None:
    """Set each variable of *values*, removing those that are None."""
    for name, value in values.items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value


# --- starting, in the parent and in a child ------------------------------------


def loop_policy(loop: str) -> Any:
    """The event-loop policy to base the run's on (None: asyncio's)."""
    if loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        raise ConfigurationError(
            "--loop uvloop needs the uvloop package, which is not installed; "
            "install it with: pip install 'asyncwatch[uvloop]'"
        ) from None
    return uvloop.EventLoopPolicy()


def otlp_setup(metrics: bool) -> Any:
    """The OTLP set-up of ``--otlp``; ConfigurationError names the extra to install."""
    from ._outputs.otel.otlp import setup_otlp

    try:
        return setup_otlp(metrics=metrics)
    except ImportError as exc:
        raise ConfigurationError(f"--otlp: {exc}") from None


def start_watching(
    settings: Settings, run: RunSettings, reporters: Iterable[Reporter], policy: Any = None, otlp: Any = None
) -> None:
    """Install asyncwatch for the whole process as ``asyncwatch run`` does.

    ``settings.findings`` is not used: the caller passes the findings file
    as a reporter that appends, since several processes share it.
    """
    from ._engine import _state
    from ._install import _watch_future_loops
    from ._policy import set_policy

    options: dict[str, Any] = {o.name: getattr(settings, o.name) for o in OPTIONS if o.scope != "run"}
    options["findings"] = None
    options["log"] = settings.log and run.log_format != "off"
    with _state.lock:
        engine, loop_settings = ensure_engine(
            options,
            reporters=reporters,
            log_fallback=None if run.log_format == "off" else run.log_format,
            base=Settings(),
        )
        if otlp is not None and engine.telemetry is not None:
            # Set up when the first loop starts, and only if the program has not
            # configured a provider by then: its own configuration wins.
            engine.telemetry.fallback = otlp.install
        if policy is not None:
            set_policy(policy)
        # What install() does before any loop runs, with the run's settings:
        # install() itself would read the environment again, so the loops
        # would get the variables' threshold and kinds instead of the options'.
        _watch_future_loops(loop_settings)


# --- the child's side ------------------------------------------------------------


def bootstrap(environ: Mapping[str, str] | None = None) -> None:
    """Watch this process, a child of ``asyncwatch run`` (its sitecustomize calls this).

    Never raises: whatever goes wrong, the child runs, unwatched or with a
    default, and at most one line on stderr says what.
    """
    problems: list[str] = []
    try:
        _bootstrap(os.environ if environ is None else environ, problems)
    except Exception as exc:  # noqa: BLE001 - a child must start whatever happens here
        problems.append(f"not watched: {type(exc).__name__}: {exc}")
    if problems:
        try:
            sys.stderr.write(f"asyncwatch: child process {os.getpid()} ({sys.executable}): {'; '.join(problems)}\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001, S110 - no stderr to complain to
            pass


def _bootstrap(environ: Mapping[str, str], problems: list[str]) -> None:
    raw = environ.get(RUN_MARKER)
    if not raw or is_installed():
        return
    try:
        marker = json.loads(raw)
        spool_path, findings = marker["spool"], marker.get("findings")
    except (ValueError, KeyError, TypeError):
        problems.append(f"not watched: {RUN_MARKER}={raw!r} is not what asyncwatch run sets")
        return
    settings, run = resolve_run(
        {}, environ, on_error=lambda _name, _value, message: problems.append(f"{message} (ignored)")
    )
    reporters: list[Reporter] = []
    with contextlib.suppress(OSError):  # the run is over (the spool is gone): nobody would read it
        reporters.append(SpoolReporter(spool_path))
    if findings:
        try:
            reporters.append(JsonLinesReporter(findings, append=True))
        except OSError as exc:
            problems.append(f"cannot append to the findings file {findings!r} ({exc.strerror})")
    policy = otlp = None
    try:
        policy = loop_policy(run.loop)
    except ConfigurationError as exc:
        problems.append(f"{exc}; using asyncio's loop")
    if run.otlp:
        try:
            otlp = otlp_setup(settings.metrics)
        except ConfigurationError as exc:
            problems.append(f"{exc}; not exporting")
    start_watching(settings, run, reporters, policy, otlp)
    atexit.register(_at_exit, otlp)
    # SIGTERM (multiprocessing's terminate(), a supervisor) would end the
    # child before its findings file and spool are written out.
    from ._signals import SignalExit

    SignalExit(_flush_before_signal).install()


def _flush_before_signal(_signum: int) -> None:
    from ._core.runtime import wait_for_emitters
    from ._engine import current_engine

    engine = current_engine()
    if engine is not None:
        engine.flush_detectors()
        wait_for_emitters(ignore=threading.main_thread().ident)
        engine.pipeline.flush()


def _at_exit(otlp: Any) -> None:
    finish_at_exit()
    if otlp is not None:
        otlp.shutdown()
