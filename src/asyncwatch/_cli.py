"""``asyncwatch run [options] script.py [args...]`` / ``asyncwatch run -m module``.

Runs a program under asyncwatch with no code change.  The program sees the
``sys.argv``, ``__name__ == "__main__"`` and exit status it would see under
plain ``python``; asyncwatch adds its findings (structlog events on stderr,
an optional JSON Lines file) and a short summary on stderr at exit.
"""

from __future__ import annotations

import argparse
import gc
import os
import runpy
import sys
import traceback
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from ._engine import ensure_engine, install, uninstall
from ._reporters import SummaryReporter
from ._settings import ENV_VARS, ConfigurationError, Settings, parse_bool, parse_kinds
from ._version import __version__

__all__ = ["main"]

#: Exit status when ``--fail-on-findings`` is on, the program itself
#: succeeded, and asyncwatch found something.
FINDINGS_EXIT_STATUS = 3

CLI_ENV = {
    "loop": "ASYNCWATCH_LOOP",
    "fail_on_findings": "ASYNCWATCH_FAIL_ON_FINDINGS",
    "log_format": "ASYNCWATCH_LOG_FORMAT",
    "summary": "ASYNCWATCH_SUMMARY",
    "otlp": "ASYNCWATCH_OTLP",
}
LOOPS = ("asyncio", "uvloop")
LOG_FORMATS = ("console", "json", "off")


class _UsageError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
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
    run.add_argument("-m", dest="module", metavar="MODULE", help="run a library module as a script")
    run.add_argument("target", nargs=argparse.REMAINDER, help="script.py [args ...], or the module's args with -m")
    return parser


def _pick(cli_value: Any, env: Mapping[str, str], var: str) -> tuple[Any, str] | None:
    """The option's value and the name to blame for it, CLI first."""
    if cli_value is not None:
        return cli_value, "--" + var.removeprefix("ASYNCWATCH_").lower().replace("_", "-")
    if var in env:
        return env[var], var
    return None


def _choice(value: str, name: str, choices: Sequence[str]) -> str:
    value = value.strip().lower()
    if value not in choices:
        raise _UsageError(f"{name}={value!r} is not valid; use one of: {', '.join(choices)}")
    return value


def _configure(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[Settings, dict[str, Any]]:
    settings = Settings()
    given = {
        "findings": args.findings,
        "slow_callback_ms": args.slow_callback_ms,
        "detect": args.detect,
        "track_coroutine_origins": args.track_coroutine_origins,
        "spans": args.spans,
        "spans_min_duration_ms": args.spans_min_duration_ms,
        "metrics": args.metrics,
    }
    for name, cli_value in given.items():
        picked = _pick(cli_value, env, ENV_VARS[name])
        if picked is None:
            continue
        value, blame = picked
        try:
            if name == "detect":
                value = parse_kinds(value, blame)
            settings = settings.with_options({name: value})
        except ConfigurationError as exc:
            message = str(exc).replace(f"{name}=", f"{blame}=", 1)
            if not message.startswith(blame):
                message = f"{blame}: {message}"
            raise _UsageError(message) from None
    extra: dict[str, Any] = {}
    picked = _pick(args.loop, env, CLI_ENV["loop"])
    extra["loop"] = _choice(picked[0], picked[1], LOOPS) if picked else "asyncio"
    picked = _pick(args.log_format, env, CLI_ENV["log_format"])
    extra["log_format"] = _choice(picked[0], picked[1], LOG_FORMATS) if picked else "console"
    for key, default in (("fail_on_findings", False), ("summary", True), ("otlp", False)):
        picked = _pick(getattr(args, key), env, CLI_ENV[key])
        if picked is None:
            extra[key] = default
            continue
        try:
            extra[key] = parse_bool(picked[0], picked[1])
        except ConfigurationError as exc:
            raise _UsageError(str(exc)) from None
    if settings.findings:
        directory = os.path.dirname(settings.findings) or "."
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK):
            raise _UsageError(
                f"--findings={settings.findings!r}: the directory {directory!r} does not exist or is not "
                "writable; give a path in a writable directory"
            )
    return settings, extra


def _base_policy(loop: str) -> Any:
    if loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        raise _UsageError(
            "--loop uvloop needs the uvloop package, which is not installed; "
            "install it with: pip install 'asyncwatch[uvloop]'"
        ) from None
    return uvloop.EventLoopPolicy()


def _otlp_setup(metrics: bool) -> Any:
    from ._otel import setup_otlp

    try:
        return setup_otlp(metrics=metrics)
    except ImportError as exc:
        raise _UsageError(f"--otlp: {exc}") from None


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
    except BaseException as exc:
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


def _run(args: argparse.Namespace) -> int:
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
    settings, extra = _configure(args, os.environ)
    base_policy = _base_policy(extra["loop"])
    summary = SummaryReporter()
    options = {name: getattr(settings, name) for name in ("slow_callback_ms", "detect", "findings")}
    options["track_coroutine_origins"] = settings.track_coroutine_origins
    options["log"] = extra["log_format"] != "off"
    spans, metrics = settings.spans, settings.metrics
    if extra["otlp"]:
        # Asking for OTLP is asking for telemetry: notable spans and metrics,
        # unless the option or its variable says otherwise.
        if args.spans is None and ENV_VARS["spans"] not in os.environ:
            spans = "notable"
        if args.metrics is None and ENV_VARS["metrics"] not in os.environ:
            metrics = True
    options.update(spans=spans, spans_min_duration_ms=settings.spans_min_duration_ms, metrics=metrics)
    otlp = _otlp_setup(metrics) if extra["otlp"] else None
    try:
        engine, _ = ensure_engine(
            options,
            reporters=[summary],
            log_fallback=None if extra["log_format"] == "off" else extra["log_format"],
            base=Settings(),
        )
    except ConfigurationError as exc:
        raise _UsageError(str(exc)) from None
    if otlp is not None and engine.telemetry is not None:
        # Set up when the first loop starts, and only if the program has not
        # configured a provider by then: its own configuration wins.
        engine.telemetry.fallback = otlp.install
    if base_policy is not None:
        from ._policy import set_policy

        set_policy(base_policy)
    install()  # no loop is running: watch every loop the program makes
    status = 0
    try:
        status = _run_target(args)
    finally:
        # Surface tasks and coroutines that are garbage but not yet collected.
        for _ in range(3):
            gc.collect()
        uninstall()
        if otlp is not None and not otlp.shutdown():
            sys.stderr.write(
                f"asyncwatch: the OTLP receiver did not take every span within {otlp.FLUSH_TIMEOUT_S:.0f} s; "
                "some were dropped\n"
            )
        if extra["summary"]:
            sys.stderr.write(summary.render())
            sys.stderr.flush()
    if status == 0 and extra["fail_on_findings"] and summary.total:
        return FINDINGS_EXIT_STATUS
    return status


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``asyncwatch`` command."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        sys.exit(2)
    try:
        status = _run(args)
    except _UsageError as exc:
        parser.exit(2, f"asyncwatch: error: {exc}\n")
    sys.exit(status)


