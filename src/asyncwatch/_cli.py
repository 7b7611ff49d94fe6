"""``asyncwatch run [options] script.py [args...]`` / ``asyncwatch run -m module``.

Runs a program under asyncwatch with no code change.  The program sees the
``sys.argv``, ``__name__ == "__main__"`` and exit status it would see under
plain ``python``; asyncwatch adds its findings (structlog events on stderr,
an optional JSON Lines file) and a short summary on stderr at exit.  The
Python processes the program starts are watched too (see `_children`), and
the summary counts their findings.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import traceback
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from . import _children
from ._core.settings import (
    ENV_VARS,
    RUN_ENV_VARS,
    ConfigurationError,
    RunSettings,
    Settings,
    did_you_mean,
    resolve_run,
)
from ._engine import current_engine
from ._install import uninstall
from ._outputs.collect import SummaryReporter
from ._outputs.jsonl import JsonLinesReporter
from ._outputs.pipeline import RateLimiter, Reporter
from ._version import __version__

__all__ = ["main"]

#: Exit status when ``--fail-on-findings`` is on, the program itself
#: succeeded, and asyncwatch found something.
FINDINGS_EXIT_STATUS = 3

CLI_ENV = RUN_ENV_VARS


class _UsageError(Exception):
    pass


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The ``asyncwatch`` parser and its ``run`` subparser."""
    parser = argparse.ArgumentParser(
        prog="asyncwatch",
        description="Make asyncio's silent failures visible while a program runs.",
    )
    parser.add_argument("--version", action="version", version=f"asyncwatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="run a Python script or module under asyncwatch",
        description=(
            "Run a script (asyncwatch run app.py ARGS) or a module (asyncwatch run -m pkg.mod ARGS) "
            "under asyncwatch. Every option has an environment variable, given in brackets; "
            "the option wins over the variable."
        ),
        usage="asyncwatch run [options] (script.py | -m module) [args ...]",
    )
    run.add_argument(
        "--findings", metavar="PATH", help=f"write each finding as one JSON line to PATH [{ENV_VARS['findings']}]"
    )
    run.add_argument(
        "--slow-callback-ms",
        metavar="N",
        help=f"report callbacks holding the loop at least N ms (default 100) [{ENV_VARS['slow_callback_ms']}]",
    )
    run.add_argument(
        "--report-limit",
        metavar="N",
        help=(
            "log at most N findings of one kind at one site, then one a minute with a count; "
            f"0: no limit (default 10; the summary counts all) [{ENV_VARS['report_limit']}]"
        ),
    )
    run.add_argument("--loop", metavar="{asyncio,uvloop}", help=f"the event loop to use (default asyncio) [{CLI_ENV['loop']}]")
    run.add_argument(
        "--fail-on-findings",
        action="store_const",
        const="1",
        help=(
            f"exit with status {FINDINGS_EXIT_STATUS} if anything was found and the program "
            f"itself succeeded [{CLI_ENV['fail_on_findings']}]"
        ),
    )
    run.add_argument(
        "--log-format",
        metavar="{console,json,off}",
        help=(
            "how findings are logged to stderr when the program does not configure structlog "
            f"itself (default console) [{CLI_ENV['log_format']}]"
        ),
    )
    run.add_argument(
        "--json", dest="log_format", action="store_const", const="json", help="same as --log-format json"
    )
    run.add_argument(
        "--detect",
        metavar="KINDS",
        help=f"comma-separated finding kinds to detect (default all) [{ENV_VARS['detect']}]",
    )
    run.add_argument(
        "--track-coroutine-origins",
        action="store_const",
        const="1",
        help=(
            "record where every coroutine is created, for exact never-awaited sites "
            f"(slower) [{ENV_VARS['track_coroutine_origins']}]"
        ),
    )
    run.add_argument(
        "--spans",
        metavar="{notable,all,off}",
        help=(
            "OpenTelemetry spans for tasks: only notable ones, every task, or none (default; "
            "notable with --otlp) "
            f"[{ENV_VARS['spans']}]"
        ),
    )
    run.add_argument(
        "--spans-min-duration-ms",
        metavar="N",
        help=f"a task living at least N ms is notable (default 1000) [{ENV_VARS['spans_min_duration_ms']}]",
    )
    run.add_argument(
        "--no-metrics",
        dest="metrics",
        action="store_const",
        const="0",
        help=f"no OpenTelemetry metrics (they are on with --otlp) [{ENV_VARS['metrics']}]",
    )
    run.add_argument(
        "--otlp",
        action="store_const",
        const="1",
        help=(
            "unless the program configures OpenTelemetry itself, set up the SDK and send spans and "
            "metrics over OTLP/HTTP (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER "
            f"...; needs asyncwatch[otlp]) [{CLI_ENV['otlp']}]"
        ),
    )
    run.add_argument(
        "--no-summary",
        dest="summary",
        action="store_const",
        const="0",
        help=f"do not print the summary on stderr at exit [{CLI_ENV['summary']}]",
    )
    run.add_argument(
        "--children",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=(
            "watch the Python processes the program starts, with the same settings (default; "
            "--no-children: this process and its forks only) "
            f"[{CLI_ENV['children']}]"
        ),
    )
    run.add_argument("-m", dest="module", metavar="MODULE", help="run a library module as a script")
    run.add_argument("target", nargs=argparse.REMAINDER, help="script.py [args ...], or the module's args with -m")
    return parser, run


# Each option's ``dest`` on the command line, and the name an error blames.
_OPTIONS = {
    "findings": "--findings",
    "slow_callback_ms": "--slow-callback-ms",
    "detect": "--detect",
    "track_coroutine_origins": "--track-coroutine-origins",
    "spans": "--spans",
    "spans_min_duration_ms": "--spans-min-duration-ms",
    "metrics": "--no-metrics",
    "report_limit": "--report-limit",
    "loop": "--loop",
    "fail_on_findings": "--fail-on-findings",
    "log_format": "--log-format",
    "summary": "--no-summary",
    "otlp": "--otlp",
    "children": "--children",
}


def _configure(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[Settings, RunSettings]:
    """The run's settings: each option, else its variable, else the default."""
    given: dict[str, tuple[Any, str]] = {}
    for name, blame in _OPTIONS.items():
        value = getattr(args, name)
        if value is not None:
            if name == "children" and value is False:
                blame = "--no-children"
            given[name] = (value, blame)
    try:
        return resolve_run(given, env)
    except ConfigurationError as exc:
        raise _UsageError(str(exc)) from None


def _run_target(args: argparse.Namespace) -> int:
    """Run the script or module as ``__main__``; return its exit status."""
    module: str | None = args.module
    if module is not None:
        sys.argv = [module, *args.target]
    else:
        script = args.target[0]
        sys.argv = list(args.target)
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        if module is not None:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        return _exit_status(exc.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        return 130
    except BaseException as exc:  # noqa: BLE001 - the program's crash, reported as python would
        _print_user_traceback(exc)
        return 1
    return 0


def _exit_status(code: Any) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _print_user_traceback(exc: BaseException) -> None:
    """Print the traceback as plain ``python`` would: without our frames and runpy's."""
    tb = exc.__traceback__
    skip = (os.path.dirname(os.path.abspath(__file__)), "<frozen runpy>", os.path.abspath(runpy.__file__))
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(skip):
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb or exc.__traceback__)


def _check_target(args: argparse.Namespace) -> None:
    if not args.module and not args.target:
        raise _UsageError("nothing to run; give a script (asyncwatch run app.py) or a module (asyncwatch run -m pkg)")
    if not args.module and not os.path.isfile(args.target[0]):
        raise _UsageError(
            f"script {args.target[0]!r} does not exist; give the path of a Python file (or -m MODULE)"
        )
    if args.module:
        import importlib.util

        sys.path.insert(0, os.getcwd())  # as `python -m` does
        try:
            found = importlib.util.find_spec(args.module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise _UsageError(f"no module named {args.module!r}; check the name and that it is importable from here")


def _findings_file(path: str) -> JsonLinesReporter:
    """Start the run's findings file empty; every process of the run appends to it."""
    try:
        open(path, "w").close()  # truncate once, here
        return JsonLinesReporter(path, append=True)
    except OSError as exc:
        raise _UsageError(
            f"--findings={path!r} cannot be written ({exc.strerror}); give a path in a writable directory"
        ) from None


def _spool() -> _children.Spool | None:
    try:
        return _children.Spool()
    except OSError as exc:
        sys.stderr.write(
            f"asyncwatch: cannot create a temporary file ({exc.strerror}); child processes are not watched, "
            "and the summary counts this process only\n"
        )
        return None


def _run(args: argparse.Namespace) -> int:
    _check_target(args)
    settings, run = _configure(args, os.environ)
    try:
        policy = _children.loop_policy(run.loop)
        otlp = _children.otlp_setup(settings.metrics) if run.otlp else None
    except ConfigurationError as exc:
        raise _UsageError(str(exc)) from None
    summary = SummaryReporter()
    reporters: list[Reporter] = [summary]
    if settings.findings:
        reporters.append(_findings_file(settings.findings))
    spool = _spool()
    if spool is not None:
        reporters.append(spool.reporter())
    _children.start_watching(settings, run, reporters, policy, otlp)
    engine = current_engine()
    limiter = engine.pipeline.limiter if engine is not None else None
    saved_env = None
    if run.children and spool is not None:
        saved_env = _children.export(os.environ, settings, run, spool, settings.findings)
    pid = os.getpid()
    status = 0
    try:
        status = _run_target(args)
    finally:
        _children.collect_garbage()
        uninstall()
        if os.getpid() == pid:  # not a forked child leaving the program through here
            status = _finish(status, run, summary, spool, saved_env, otlp, limiter)
    return status


def _finish(
    status: int,
    run: RunSettings,
    summary: SummaryReporter,
    spool: _children.Spool | None,
    saved_env: dict[str, str | None] | None,
    otlp: Any,
    limiter: RateLimiter | None = None,
) -> int:
    """The parent's end of the run: the children's findings, the summary, the exit status."""
    if saved_env is not None:
        _children.restore(os.environ, saved_env)
    own = summary.total
    pids: list[int] = []
    if spool is not None:
        pids = spool.collect(summary)
        spool.remove()
    if otlp is not None and not otlp.shutdown():
        sys.stderr.write(
            f"asyncwatch: the OTLP receiver did not take every span within {otlp.FLUSH_TIMEOUT_S:.0f} s; "
            "some were dropped\n"
        )
    if run.summary:
        text = summary.render(held_back=limiter.suppressed if limiter is not None else None)
        if pids:
            text += _children.describe_children(summary.total - own, pids)
        sys.stderr.write(text)
        sys.stderr.flush()
    if status == 0 and run.fail_on_findings and summary.total:
        return FINDINGS_EXIT_STATUS
    return status


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``asyncwatch`` command."""
    parser, run = _parsers()
    args, unknown = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        sys.exit(2)
    if unknown:
        # Before the script, so the program's own options are never taken for ours.
        options = [o for action in run._actions for o in action.option_strings]
        parser.exit(
            2,
            f"asyncwatch: error: unknown option {unknown[0]!r}{did_you_mean(unknown[0], options)}; "
            "see asyncwatch run --help (the program's own options go after the script)\n",
        )
    try:
        status = _run(args)
    except _UsageError as exc:
        parser.exit(2, f"asyncwatch: error: {exc}\n")
    sys.exit(status)


