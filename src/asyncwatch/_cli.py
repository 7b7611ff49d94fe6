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
import builtins
import contextlib
import os
import runpy
import signal
import sys
import threading
import traceback
import types
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from . import _children, _signals
from ._core.runtime import wait_for_emitters
from ._core.settings import (
    OPTIONS,
    ConfigurationError,
    Option,
    RunSettings,
    Settings,
    did_you_mean,
    resolve_run,
)
from ._engine import current_engine
from ._install import finish_at_exit, uninstall
from ._outputs.collect import SummaryReporter
from ._outputs.jsonl import JsonLinesReporter
from ._outputs.pipeline import RateLimiter, Reporter
from ._version import __version__

__all__ = ["main"]

#: Exit status when ``--fail-on-findings`` is on, the program itself
#: succeeded, and asyncwatch found something.
FINDINGS_EXIT_STATUS = 3


class _UsageError(Exception):
    pass


def _add_flag(run: argparse.ArgumentParser, option: Option) -> None:
    """``asyncwatch run``'s flag for *option*, as its row in the options table says."""
    if option.flag is None:
        return
    text = f"{option.help} [{option.variable}]"
    if option.cli == "value":
        run.add_argument(option.flag, dest=option.name, metavar=option.metavar, help=text)
    elif option.cli in ("on", "off"):
        const = "1" if option.cli == "on" else "0"
        run.add_argument(option.flag, dest=option.name, action="store_const", const=const, help=text)
    else:  # "both": --name / --no-name
        run.add_argument(option.flag, dest=option.name, action=argparse.BooleanOptionalAction, default=None, help=text)


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
    for option in OPTIONS:
        _add_flag(run, option)
    run.add_argument("--json", dest="log_format", action="store_const", const="json", help="same as --log-format json")
    run.add_argument(
        "-m",
        dest="module",
        metavar="MODULE",
        help="run a library module as a script; what follows is the module's (as with python -m)",
    )
    run.add_argument(
        "target",
        nargs="*",
        metavar="script.py [args ...]",
        help="the script; what follows it is the script's (as with python script.py)",
    )
    return parser, run


class _Command:
    """``asyncwatch run``'s command line, split as ``python`` splits its own:
    asyncwatch's options, then the script or ``-m MODULE``, then the
    program's arguments, untouched (``--help``, ``--``, options asyncwatch
    also has)."""

    def __init__(self, options: list[str], module: str | None, script: str | None, args: list[str]) -> None:
        self.options = options
        self.module = module
        self.script = script
        self.args = args


def _split(argv: Sequence[str], run: argparse.ArgumentParser) -> _Command:
    """Split the arguments after ``run`` at the script or ``-m MODULE``."""
    takes_value = {
        option
        for action in run._actions
        if action.nargs is None and action.option_strings and action.dest != "module"
        for option in action.option_strings
    }
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":  # as python: the end of the options; the script comes next
            script = argv[i + 1] if i + 1 < len(argv) else None
            return _Command(argv[:i], None, script, argv[i + 2 :])
        if arg == "-m":
            module = argv[i + 1] if i + 1 < len(argv) else None
            if module is None:
                raise _UsageError("-m needs a module name (asyncwatch run -m pkg.mod [args ...])")
            return _Command(argv[:i], module, None, argv[i + 2 :])
        if arg.startswith("-m") and not arg.startswith("--"):  # -mpkg, as python accepts
            return _Command(argv[:i], arg[2:], None, argv[i + 1 :])
        if not arg.startswith("-") or arg == "-":
            return _Command(argv[:i], None, arg, argv[i + 1 :])
        i += 2 if arg in takes_value else 1
    return _Command(argv, None, None, [])


def _configure(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[Settings, RunSettings]:
    """The run's settings: each option, else its variable, else the default."""
    given: dict[str, tuple[Any, str]] = {}
    for option in OPTIONS:
        flag = option.flag
        value = getattr(args, option.name, None) if flag else None
        if flag is not None and value is not None:
            # The flag an error blames: --no-children for a False of --children.
            given[option.name] = (value, flag if value is not False else "--no-" + option.name.replace("_", "-"))
    try:
        return resolve_run(given, env)
    except ConfigurationError as exc:
        raise _UsageError(str(exc)) from None


def _run_target(command: _Command) -> int:
    """Run the script or module as ``__main__``; return its exit status
    (`_SIGINT` when ``KeyboardInterrupt`` escaped it)."""
    if command.module is not None:
        if not sys.flags.safe_path:
            sys.path[0] = os.getcwd()  # as `python -m`: the working directory, not ours
        sys.argv = [command.module, *command.args]  # runpy puts the module's path in argv[0]
    else:
        assert command.script is not None
        sys.argv = [command.script, *command.args]
        if not sys.flags.safe_path:
            sys.path[0] = os.path.dirname(os.path.realpath(command.script))
    try:
        if command.module is not None:
            _run_module(command.module)
        else:
            _run_script(command.script or "")
    except SystemExit as exc:
        return _exit_status(exc.code)
    except KeyboardInterrupt as exc:
        _print_user_traceback(exc)
        return _SIGINT
    except BaseException as exc:  # noqa: BLE001 - the program's crash, reported as python would
        _print_user_traceback(exc)
        return 1
    return 0


#: `_run_target`'s status for a program ended by ``KeyboardInterrupt``: the
#: process then dies by SIGINT, as plain python does.
_SIGINT = -int(signal.SIGINT)


def _run_module(module: str) -> None:
    """Run *module* as ``python -m`` does, with the function it uses: the
    module's path in ``sys.argv[0]``, its spec in ``__spec__``, and it stays
    ``sys.modules["__main__"]`` (``runpy.run_module`` would put ours back)."""
    sys.modules["__main__"] = types.ModuleType("__main__")  # not ours: it runs in this one's namespace
    run: Any = runpy._run_module_as_main  # type: ignore[attr-defined]
    run(module, alter_argv=True)


def _run_script(script: str) -> None:
    """Run *script* as ``python script.py`` does: in a new ``__main__`` module
    that stays ``sys.modules["__main__"]``, ``__file__`` absolute (python 3.9+),
    ``__spec__`` None, compiled under its absolute path."""
    from importlib.machinery import SourceFileLoader

    # Joined, not normalised: python keeps "sub/../app.py" as given (_Py_abspath).
    path = script if os.path.isabs(script) else os.path.join(os.getcwd(), script)
    with open(path, "rb") as f:
        source = f.read()
    code = compile(source, path, "exec", dont_inherit=True)
    main = types.ModuleType("__main__")
    main.__file__ = path
    main.__cached__ = None  # type: ignore[attr-defined]
    main.__loader__ = SourceFileLoader("__main__", path)
    main.__spec__ = None
    main.__builtins__ = builtins  # type: ignore[attr-defined]
    sys.modules["__main__"] = main
    exec(code, main.__dict__)


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


def _check_target(command: _Command) -> None:
    if command.module is None and command.script is None:
        raise _UsageError("nothing to run; give a script (asyncwatch run app.py) or a module (asyncwatch run -m pkg)")
    if command.script is not None and not os.path.isfile(command.script):
        raise _UsageError(f"script {command.script!r} does not exist; give the path of a Python file (or -m MODULE)")
    if command.module is not None:
        import importlib.util

        path = list(sys.path)
        if not sys.flags.safe_path:
            sys.path[0] = os.getcwd()  # as `python -m` will see it
        try:
            found = importlib.util.find_spec(command.module) is not None
        except (ImportError, ValueError):
            found = False
        finally:
            sys.path[:] = path
        if not found:
            raise _UsageError(f"no module named {command.module!r}; check the name and that it is importable from here")


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


def _run(args: argparse.Namespace, command: _Command) -> int:
    _check_target(command)
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
    main_thread = threading.get_ident()

    def finish_before_signal(signum: int) -> None:
        """SIGTERM/SIGHUP at their default: what a normal exit would do, minus
        the program's exit work, which the signal skips under plain python too."""
        if engine is not None:
            engine.flush_detectors()  # a stall the signal interrupted
            wait_for_emitters(ignore=main_thread)  # a stall the watchdog thread is reporting
            engine.pipeline.flush()
        if os.getpid() != pid:  # a forked child: its findings are on file, no summary
            return
        _finish(0, run, summary, spool, None, otlp, limiter, signum=signum)

    signals = _signals.SignalExit(finish_before_signal)
    signals.install()
    status = 0
    try:
        status = _run_target(command)
    finally:
        signals.uninstall()
        if os.getpid() == pid:  # not a forked child leaving the program through here
            _program_exit_work()
        finish_at_exit()  # done by the exit work, unless something unregistered it
        uninstall()
        if os.getpid() == pid:
            status = _finish(status, run, summary, spool, saved_env, otlp, limiter)
    return status


def _program_exit_work() -> None:
    """What python does between the program's end and its shutdown, done
    before the summary: wait for its non-daemon threads, then run the exit
    functions, the program's (watched, as the rest of it: a mistake in one
    is counted) and then asyncwatch's (`finish_at_exit`: what the program
    left alive, the findings files).  Run after the summary, as before, a
    failed task kept in a module-level list was reported by asyncio as
    Python shut down, and asyncwatch's summary said "no findings".  Python
    finds nothing left to do at its own exit: atexit forgets what it ran."""
    import atexit

    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C while waiting for the threads: python goes on too
            shutdown()
    atexit._run_exitfuncs()


def _finish(
    status: int,
    run: RunSettings,
    summary: SummaryReporter,
    spool: _children.Spool | None,
    saved_env: dict[str, str | None] | None,
    otlp: Any,
    limiter: RateLimiter | None = None,
    *,
    signum: int | None = None,
) -> int:
    """The parent's end of the run: the children's findings, the summary, the
    exit status (*signum*: the run ends by that signal, whatever this returns)."""
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
    ended_by = signum if signum is not None else (-status if status == _SIGINT else None)
    if run.summary:
        text = summary.render(held_back=limiter.suppressed if limiter is not None else None)
        if pids:
            text += _children.describe_children(summary.total - own, pids)
        if ended_by is not None:
            text += (
                f"asyncwatch: the program was ended by {signal.Signals(ended_by).name}; the run ends by it too, "
                "as under python (--fail-on-findings cannot change a signal's exit status)\n"
            )
        # One write() on the descriptor: under a signal, the main thread may
        # be inside sys.stderr's buffer.
        _write_stderr(text, raw=signum is not None)
    if status == 0 and run.fail_on_findings and summary.verdict_total:
        return FINDINGS_EXIT_STATUS
    return status


def _write_stderr(text: str, *, raw: bool) -> None:
    if not raw:
        sys.stderr.write(text)
        sys.stderr.flush()
        return
    data = text.encode("utf-8", "replace")
    try:
        while data:
            data = data[os.write(2, data) :]
    except OSError:
        pass


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``asyncwatch`` command."""
    parser, run = _parsers()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Top-level options (--help, --version) and the command: everything from
    # "run" on is split by hand, so the program's arguments are never ours.
    at = argv.index("run") if "run" in argv else len(argv)
    args = parser.parse_args(argv[:at])
    if at == len(argv):
        parser.print_help(sys.stderr)
        sys.exit(2)
    try:
        command = _split(argv[at + 1 :], run)
    except _UsageError as exc:
        parser.exit(2, f"asyncwatch: error: {exc}\n")
    args, unknown = run.parse_known_args(command.options)
    if unknown or args.target or args.module:
        wrong = (unknown or args.target or [args.module])[0]
        options = [o for action in run._actions for o in action.option_strings]
        parser.exit(
            2,
            f"asyncwatch: error: unknown option {wrong!r}{did_you_mean(wrong, options)}; "
            "see asyncwatch run --help (the program's own options go after the script or -m MODULE)\n",
        )
    try:
        status = _run(args, command)
    except _UsageError as exc:
        parser.exit(2, f"asyncwatch: error: {exc}\n")
    if status == _SIGINT:
        _die_by_sigint_after_exit_work()
    sys.exit(status)


def _die_by_sigint_after_exit_work() -> NoReturn:
    """``KeyboardInterrupt`` escaped the program: python runs the exit work
    (threads joined, atexit handlers), then dies by SIGINT; so does the run."""
    # What Py_FinalizeEx does before Modules/main.c's exit_sigint() kills the
    # process; `_run` did it before the summary, and what was registered
    # since runs now.
    _program_exit_work()
    _signals.die_by(signal.SIGINT)
    raise AssertionError("unreachable")  # die_by does not return
