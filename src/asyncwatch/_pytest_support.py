"""The pytest plugin's machinery: who owns a finding, which tasks leaked, and
how a verdict reads.  `asyncwatch.pytest_plugin` holds the options, the
marker, the fixture and the hooks, and delegates everything else to `Watcher`.

Three ideas carry the design:

* **Watching is per run, judging is per test.**  Once anything asks for
  asyncwatch, every loop pytest-asyncio makes (and every loop the event-loop
  policy makes) is watched; only the tests that asked are judged.
* **A finding belongs to whoever is running.**  A stack of owners (the test,
  or a fixture wider than the test while it is set up or torn down) receives
  each finding as it is reported.  The garbage is collected at the end of the
  test body and again after teardown, so objects the test dropped are
  reported in that test (see `_collect_garbage`).
* **A task belongs to the code that created it**, traced with a context
  variable that every task copies at creation: a task a test started is that
  test's, a task a module-scoped fixture (or the server it runs) started is
  the fixture's, whatever test happens to be running at the time.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import fnmatch
import gc
import json
import linecache
import os
import sys
import threading
import types
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytest

from ._engine import Engine, current_engine, ensure_engine, uninstall, watch_future_loops
from ._findings import Finding, FindingKind, Site, frame_site, is_library_file
from ._policy import EventLoopPolicy, get_policy, set_policy
from ._reporters import report_internal_error
from ._settings import ConfigurationError, did_you_mean, parse_bool, parse_kinds, parse_ms
from ._tasks import coro_name, created_at

__all__ = ["MARKER", "MODES", "NodeOptions", "RunOptions", "Watcher"]

LoopFactory = Callable[[], asyncio.AbstractEventLoop]

MARKER = "asyncwatch"
FIXTURE = "asyncwatch_findings"
MODES = ("fail", "report")
MARKER_OPTIONS = ("allow", "slow_callback_ms")

# The owner of the code that is running, copied into every task at its
# creation (tasks copy the current context): the leak check asks each
# pending task which owner created it.
_OWNER: contextvars.ContextVar[Owner | None] = contextvars.ContextVar("asyncwatch_pytest_owner", default=None)


# --- options -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """The effective settings of a run: command line, else ini file, else default."""

    every_test: bool = False
    mode: str = "fail"
    findings: str | None = None
    slow_callback_ms: float = 100.0
    allow: frozenset[FindingKind] = frozenset()
    track_coroutine_origins: bool = True
    log: bool = False
    fail_on: str = "project"
    allow_sites: tuple[str, ...] = ()
    root: str = ""

    def header(self) -> str:
        """Return the report header line."""
        who = "every test" if self.every_test else f"tests marked @pytest.mark.{MARKER} (--asyncwatch: every test)"
        allow = ",".join(sorted(k.value for k in self.allow)) or "none"
        return (
            f"asyncwatch: watching {who}; mode={self.mode}, slow_callback_ms={self.slow_callback_ms:g}, "
            f"allow={allow}, findings={self.findings or 'none'}, "
            f"track_coroutine_origins={self.track_coroutine_origins}, log={self.log}, "
            f"fail_on={self.fail_on}, allow_sites={','.join(self.allow_sites) or 'none'}"
        )


def read_options(config: pytest.Config) -> RunOptions:
    """Resolve the run's options; raise `pytest.UsageError` naming the bad one."""

    def pick(option: str, ini: str) -> tuple[Any, str]:
        value = config.getoption(option)
        if value is not None:
            return value, "--" + option.replace("_", "-")
        return config.getini(ini), ini

    every_test = bool(config.getoption("asyncwatch")) or _checked(parse_bool, config.getini("asyncwatch"), "asyncwatch")
    mode, mode_name = pick("asyncwatch_mode", "asyncwatch_mode")
    if mode not in MODES:
        raise pytest.UsageError(
            f"{mode_name}={mode!r} is not a valid mode{did_you_mean(mode, MODES)}; valid modes are: {', '.join(MODES)}"
        )
    ms, ms_name = pick("asyncwatch_slow_callback_ms", "asyncwatch_slow_callback_ms")
    allow, allow_name = pick("asyncwatch_allow", "asyncwatch_allow")
    findings = config.getoption("asyncwatch_findings")
    if findings is not None:
        findings = os.path.join(config.invocation_params.dir, findings)
    elif config.getini("asyncwatch_findings"):
        base = config.inipath.parent if config.inipath else config.rootpath
        findings = os.path.join(base, config.getini("asyncwatch_findings"))
    return RunOptions(
        every_test=every_test,
        mode=mode,
        findings=os.path.abspath(findings) if findings else None,
        slow_callback_ms=_checked(parse_ms, ms, ms_name),
        allow=_checked(parse_kinds, allow, allow_name),
        track_coroutine_origins=_checked(
            parse_bool, config.getini("asyncwatch_track_coroutine_origins"), "asyncwatch_track_coroutine_origins"
        ),
        log=_checked(parse_bool, config.getini("asyncwatch_log"), "asyncwatch_log"),
        fail_on=_fail_on(*pick("asyncwatch_fail_on", "asyncwatch_fail_on")),
        allow_sites=_allow_sites(config),
        root=os.fspath(config.rootpath),
    )


FAIL_ON = ("project", "all")


def _fail_on(value: Any, name: str) -> str:
    if value not in FAIL_ON:
        raise pytest.UsageError(
            f"asyncwatch: {name}={value!r} is not valid{did_you_mean(str(value), FAIL_ON)}; valid values are: "
            "project (fail only for findings sited in the project's own code), all"
        )
    return str(value)


def _allow_sites(config: pytest.Config) -> tuple[str, ...]:
    given = [*(config.getoption("asyncwatch_allow_site") or []), *config.getini("asyncwatch_allow_sites")]
    out = []
    for pattern in given:
        pattern = str(pattern).strip()
        if not pattern:
            continue
        if any(c.isspace() for c in pattern):
            raise pytest.UsageError(
                f"asyncwatch: allow-site pattern {pattern!r} holds a space; give a module (anyio._backends), "
                "a path glob (*/anyio/*) or a path glob with a line (tests/test_x.py:12)"
            )
        out.append(pattern)
    return tuple(out)


def _checked(parse: Callable[[Any, str], Any], value: Any, name: str) -> Any:
    try:
        return parse(value, name)
    except ConfigurationError as exc:
        raise pytest.UsageError(f"asyncwatch: {exc}") from None


@dataclasses.dataclass(frozen=True)
class NodeOptions:
    """What applies to one test (or to the class, module or session a fixture
    belongs to): the run's options refined by ``@pytest.mark.asyncwatch``."""

    allow: frozenset[FindingKind]
    slow_callback_ms: float

    def counts(self, finding: Finding) -> bool:
        """Return whether *finding* fails (or, in report mode, is reported for) its owner."""
        if finding.kind in self.allow:
            return False
        if finding.kind is FindingKind.SLOW_CALLBACK and finding.duration_s is not None:
            # A loop shared with other tests is watched with its own threshold;
            # a higher threshold asked for here still applies to this test.
            return finding.duration_s * 1000 >= self.slow_callback_ms
        return True


def node_options(node: pytest.Item | pytest.Collector, run: RunOptions) -> NodeOptions:
    """Merge the markers on *node* and its parents over the run's options.

    ``allow`` adds up from the ini file to the test; ``slow_callback_ms`` is
    taken from the closest marker that gives it.  Bad values raise
    `pytest.UsageError`.
    """
    allow = set(run.allow)
    ms: float | None = None
    for mark in node.iter_markers(MARKER):  # closest first
        where = f"{node.nodeid}: @pytest.mark.{MARKER}"
        unknown = set(mark.kwargs) - set(MARKER_OPTIONS)
        if mark.args or unknown:
            got = ", ".join([repr(a) for a in mark.args] + sorted(unknown))
            hint = did_you_mean(min(unknown), MARKER_OPTIONS) if unknown else ""
            raise pytest.UsageError(
                f"{where} got {got}{hint}; it takes keyword arguments only, and the valid ones are: "
                f"{', '.join(MARKER_OPTIONS)}"
            )
        if "allow" in mark.kwargs:
            allow |= _checked(parse_kinds, mark.kwargs["allow"], f"{where}(allow=...)")
        if ms is None and "slow_callback_ms" in mark.kwargs:
            ms = _checked(parse_ms, mark.kwargs["slow_callback_ms"], f"{where}: slow_callback_ms")
    return NodeOptions(frozenset(allow), run.slow_callback_ms if ms is None else ms)


# --- owners ------------------------------------------------------------------


class Owner:
    """A test, or a fixture wider than one test: receives the findings
    reported while it runs, and owns the tasks its code creates."""

    def __init__(self, what: str, nodeid: str | None, judged: bool, options: NodeOptions, fixture: str | None = None):
        self.what = what  # "the test", "fixture 'server' (module scope)"
        self.nodeid = nodeid
        self.fixture = fixture
        self.judged = judged
        self.options = options
        self.findings: list[Finding] = []
        self.expected = False  # the test took the fixture: findings until its body ends are its to check
        self.verdict_upto = 0  # findings before this index have been judged
        self.counted: list[Finding] = []  # judged findings that count, for the summary
        # id() of findings sited outside the project -> why they do not fail (kept with the finding)
        self.not_ours: dict[int, str] = {}
        self.location: Site | None = None  # the test's own line: the site of last resort
        self.collected = ""  # the last phase whose garbage `Watcher.collect_after` collected
        self.gc_clock = _GcClock()
        self._lock = threading.Lock()

    def counts(self, finding: Finding) -> bool:
        """Return whether *finding* fails (in report mode: is listed for) this owner."""
        return id(finding) not in self.not_ours and self.options.counts(finding)

    def add(self, finding: Finding) -> None:
        with self._lock:
            self.findings.append(finding)

    def take_new(self) -> list[Finding]:
        """Return the findings not judged yet, and mark them judged."""
        with self._lock:
            new = self.findings[self.verdict_upto :]
            self.verdict_upto = len(self.findings)
        return new


YOUNG = 1  # the generations the garbage collector's cheap collections look at: 0 and 1


def _collect_garbage(generation: int = 2) -> None:
    """Collect until nothing more is freed: finalizers can free more.

    A judged test's garbage is collected at the end of its body and after
    its teardown, so that what the test dropped is reported in that test.
    Nothing is frozen (an earlier version froze everything older than the
    test with `gc.freeze` to make these collections cheap: tests saw it,
    `gc.get_referrers` missed old referrers and `gc.collect` could not free
    cycles through old objects).  A full collection costs 15-100 ms in a
    large session (anyio's), so `_GcClock` says when a young one is enough.
    """
    for _ in range(4):
        if not gc.collect(generation):
            break


class _GcClock:
    """Whether the garbage a test made can be old.

    Objects start in generation 0 and reach the old generation only by
    surviving a collection of generation 1 or a full one.  If the
    interpreter ran none since the test began, the test's garbage is young,
    and a young collection finds what a full one would have found of it
    (compat/README.md: what that saves on anyio's suite).
    """

    def __init__(self) -> None:
        self._mark = self._now()

    @staticmethod
    def _now() -> tuple[int, int]:
        stats = gc.get_stats()
        return stats[1]["collections"], stats[2]["collections"]

    def collect(self, last: bool) -> None:
        """Collect the test's garbage: young if it all is, else in full.

        Before the *last* collection of the test, only generation 0 is
        collected when all is young: a collection of generation 1 would
        make what is still alive (the fixtures' objects, dropped by
        teardown) old, out of reach of the last, young, collection.
        """
        if self._now() != self._mark:
            _collect_garbage(2)
        else:
            _collect_garbage(YOUNG if last else 0)
        self._mark = self._now()


def _test_line(item: pytest.Item) -> Site | None:
    """The line where *item*'s test is defined, from pytest's own report info."""
    try:
        path, line, name = item.reportinfo()
        if line is None:
            return None
        return Site(os.path.abspath(os.fspath(path)), int(line) + 1, str(name).rsplit(".", 1)[-1])
    except Exception:  # noqa: BLE001 - a custom item's reportinfo: no fallback site then
        return None


def _in_project(file: str, root: str) -> bool:
    """Whether *file* is the project's own code: under the rootdir, not an installed package."""
    path = os.path.abspath(file)
    return (path == root or path.startswith(root.rstrip(os.sep) + os.sep)) and not is_library_file(path)


def _site_matches(pattern: str, file: str, line: int, root: str) -> bool:
    """Whether a site matches an allow-site *pattern*: a module name
    (``anyio._backends``: that module or package), a path glob matched against
    the absolute and the rootdir-relative path, or either with ``:LINE``."""
    if ":" in pattern and pattern.rsplit(":", 1)[1].isdigit():
        glob, want = pattern.rsplit(":", 1)
        if int(want) != line:
            return False
    else:
        glob = pattern
    if "/" not in glob and "*" not in glob and not glob.endswith(".py"):
        # A module or package: its file, or a file under its directory.
        stem = os.sep + glob.replace(".", os.sep) + os.sep
        return stem in os.path.splitext(os.path.abspath(file))[0] + os.sep
    rel = os.path.relpath(file, root) if os.path.isabs(file) else file
    return fnmatch.fnmatch(file, glob) or fnmatch.fnmatch(rel, glob)


def _sited(finding: Finding, fallback: Site | None, root: str) -> Finding:
    """*finding* with a site to open when asyncwatch found no frame of the
    application (every frame library code, as when a library's own suite
    runs against its installed copy): the innermost frame of its stack in
    the project (under the rootdir, not an installed package), else the
    test's own line, else the innermost frame of its stack; the message says
    which line it is."""
    if finding.site is not None:
        return finding
    stack = finding.stack
    site = next((s for s in reversed(stack) if _in_project(s.file, root)), None)
    how = "the innermost frame of the project's own code in its stack"
    if site is None and fallback is not None:
        site, how = fallback, "the test's own line"
    if site is None and stack:
        site, how = stack[-1], "the innermost frame of its stack"
    if site is None:
        return finding
    note = f" (no frame of the application was found: the site given is {how})"
    return dataclasses.replace(finding, site=site, message=finding.message + note)


def _context_of(task: asyncio.Task[Any]) -> contextvars.Context | None:
    """The context *task* runs in (copied from its creator's)."""
    get_context = getattr(task, "get_context", None)
    if get_context is not None:  # 3.12+
        return get_context()  # type: ignore[no-any-return]
    context = getattr(task, "_context", None)  # the pure-Python Task
    if isinstance(context, contextvars.Context):
        return context
    # 3.11's C Task has no accessor, but it visits its own context first
    # when the garbage collector asks what it refers to.
    return next((r for r in gc.get_referents(task) if isinstance(r, contextvars.Context)), None)


def _owner_of(task: asyncio.Task[Any]) -> Owner | None:
    context = _context_of(task)
    return context.get(_OWNER) if context is not None else None


def _awaiting(task: asyncio.Task[Any]) -> tuple[Site, ...]:
    """Where a pending *task* is suspended: its chain of awaits, outermost first."""
    chain: list[Site] = []
    obj: Any = getattr(task, "get_coro", lambda: None)()  # pending: safe on 3.12.0-3.12.4 (gh-122332)
    while obj is not None and len(chain) < 64:
        frame = getattr(obj, "cr_frame", None) or getattr(obj, "gi_frame", None) or getattr(obj, "ag_frame", None)
        if frame is None:
            break
        chain.append(frame_site(frame))
        obj = getattr(obj, "cr_await", None) or getattr(obj, "gi_yieldfrom", None) or getattr(obj, "ag_await", None)
    return tuple(chain)


def leaked_finding(task: asyncio.Task[Any], owner: Owner) -> Finding:
    """A `task_leaked` finding for *task*, sited where it was created."""
    name = task.get_name()
    coro = coro_name(task)
    where = created_at(task)
    stack = _awaiting(task)
    waiting = next((s for s in reversed(stack) if not is_library_file(s.file)), None)
    waiting_text = f" (waiting at {os.path.basename(waiting.file)}:{waiting.line})" if waiting else ""
    return Finding(
        kind=FindingKind.TASK_LEAKED,
        message=(
            f"Task {name!r} (coroutine {coro!r}) was still pending when {owner.what} ended{waiting_text}; "
            "stop it before then: await it, or cancel it and await the cancellation (a TaskGroup does both)"
        ),
        site=where,
        stack=stack,
        task=name,
        coroutine=coro,
        created_at=where,
    )


# --- loops -------------------------------------------------------------------


class _WatchingPolicy(EventLoopPolicy):
    """asyncwatch's policy, attaching each loop with the options of whoever runs."""

    def __init__(self, base: Any, attach: Callable[[asyncio.AbstractEventLoop], None]) -> None:
        super().__init__(base)
        self._attach = attach

    def _watch(self, loop: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
        if not self.inert:
            self._attach(loop)
        return loop


class LoopFactories:
    """Wraps pytest-asyncio's ``pytest_asyncio_loop_factories`` (1.4 and later).

    The user's factories (uvloop's, say) still make the loops; asyncwatch
    watches each loop they make.  Registered only once asyncwatch is asked
    for: as soon as any implementation exists, pytest-asyncio parametrizes
    every async test with the hook's factories, which must not happen to
    everybody who merely has asyncwatch installed.
    """

    def __init__(self, watcher: Watcher) -> None:
        self._watcher = watcher

    @pytest.hookimpl(wrapper=True)
    def pytest_asyncio_loop_factories(self, config: pytest.Config, item: pytest.Item) -> Any:
        factories = yield
        if factories is None:
            # Nobody chose a loop: asyncio's, made through the event-loop
            # policy as pytest-asyncio would have made it.
            factories = {"asyncio": asyncio.new_event_loop}
        if not isinstance(factories, Mapping):
            return factories  # pytest-asyncio explains what it expects
        return {name: self._watcher.watched(factory) for name, factory in factories.items()}


# --- the watcher -------------------------------------------------------------

_OWNER_KEY = pytest.StashKey[Owner]()
_OPTIONS_KEY = pytest.StashKey[NodeOptions]()

_HINT = (
    f"(a test with asyncwatch findings fails: allow a kind with @pytest.mark.{MARKER}(allow=[...]), "
    "a place with --asyncwatch-allow-site=MODULE|GLOB[:LINE], or only report findings with "
    "--asyncwatch-mode=report)"
)


class Watcher:
    """One pytest run's asyncwatch: owners, the engine, loops, and verdicts."""

    # Every test is judged on every finding it made: the rate limit per
    # place (report_limit) is for logs, and a site shared by many tests
    # (a helper, a fixture) must fail each of them.
    receives_all = True

    def __init__(self, config: pytest.Config, options: RunOptions) -> None:
        self.config = config
        self.options = options
        self.active = False
        self._engine: Engine | None = None
        self._owns_engine = False
        self._policy: _WatchingPolicy | None = None
        # Who runs now, innermost last.  The watchdog thread reads it too, so
        # it is only ever appended to and deleted from, never rebound.
        self._owners: list[Owner] = []
        self._outside = Owner("the session", None, options.every_test, _run_node_options(options))
        self._fixtures: dict[Any, Owner] = {}  # FixtureDef -> its owner, from setup to teardown
        self._fixture_owners: list[Owner] = []  # judged fixtures, for the summary
        self._failed_tests: list[Owner] = []  # tests with findings that count, for the summary
        self._reported: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
        self._wrapped: dict[Any, LoopFactory] = {}
        self._not_ours_seen: list[tuple[Owner, Finding]] = []  # for the summary
        self._file: int | None = None
        self._file_lock = threading.Lock()
        self._worker: str | None = getattr(config, "workerinput", {}).get("workerid")
        if options.findings:
            # One file for a whole run, pytest-xdist's workers included: the
            # controller (or a run without workers) starts it empty, each
            # worker appends; O_APPEND with one write() per line keeps the
            # lines whole however the processes interleave.
            worker = hasattr(config, "workerinput")
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if worker else os.O_TRUNC)
            try:
                self._file = os.open(options.findings, flags, 0o666)
            except OSError as exc:
                raise pytest.UsageError(
                    f"asyncwatch: cannot write the findings file {options.findings!r} ({exc.strerror}); "
                    "give a path in a writable directory"
                ) from None

    # -- activation ----------------------------------------------------------

    def wants(self, item: pytest.Item) -> bool:
        """Return whether *item* asks to be judged (pytest's own APIs only)."""
        if self.options.every_test or item.get_closest_marker(MARKER) is not None:
            return True
        return FIXTURE in getattr(item, "fixturenames", ())

    def asks(self, collector: pytest.Collector, obj: object) -> bool:
        """Return whether the plain function *obj*, being collected in
        *collector*, will ask to be judged; never raises.

        Test modules hold anything (a MarkDecorator as a class's
        ``pytestmark``, Mocks, descriptors, objects whose attribute access
        raises): only objects whose type is exactly a function are looked
        into, and only through what a function always has.
        """
        try:
            if collector.get_closest_marker(MARKER) is not None:
                return True
            if type(obj) is not types.FunctionType:
                return False
            marks = obj.__dict__.get("pytestmark", ())
            if not isinstance(marks, (list, tuple)):
                marks = [marks]
            if any(getattr(m, "name", None) == MARKER for m in marks):
                return True
            code = obj.__code__
            return FIXTURE in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
        except Exception:  # noqa: BLE001 - collection is pytest's; the item check after it still runs
            return False

    def activate(self) -> None:
        """Start watching: the engine, the event-loop policy, and pytest-asyncio's loop factories."""
        if self.active:
            return
        self.active = True
        # Every option is given, so ASYNCWATCH_* variables do not apply; an
        # engine someone else installed (`asyncwatch run -m pytest`) keeps its own.
        self._owns_engine = current_engine() is None
        options = {
            "slow_callback_ms": self.options.slow_callback_ms,
            "detect": "all",
            "findings": None,
            "track_coroutine_origins": self.options.track_coroutine_origins,
            "log": self.options.log,
        }
        self._engine, _ = ensure_engine(options if self._owns_engine else {})
        self._engine.pipeline.add(self)
        self._policy = _WatchingPolicy(get_policy(), self.attach)
        set_policy(self._policy)
        if self._owns_engine:
            # Loops the policy does not make (a loop_factory given to
            # asyncio.Runner or asyncio.run, uvloop.run, anyio's backend
            # options, a loop made by hand) are watched as install() watches
            # them, when they start; uninstall() in close() undoes it.
            watch_future_loops(self._engine.settings)
        if hasattr(self.config.hook, "pytest_asyncio_loop_factories"):  # pytest-asyncio >= 1.4
            self.config.pluginmanager.register(LoopFactories(self), "asyncwatch-loop-factories")

    def close(self) -> None:
        """Undo `activate`, leaving the process as it was."""
        if self._policy is not None:
            if get_policy() is self._policy:
                set_policy(self._policy.base)
            else:
                self._policy.inert = True  # someone set theirs on top of ours
            self._policy = None
        if self._engine is not None:
            self._engine.pipeline.remove(self)
            if self._owns_engine and current_engine() is self._engine:
                uninstall()
            self._engine = None
        with self._file_lock:
            if self._file is not None:
                os.close(self._file)
                self._file = None

    # -- loops ---------------------------------------------------------------

    def watched(self, factory: LoopFactory) -> LoopFactory:
        """Return *factory* with its loops watched.

        The same wrapper each time: pytest-asyncio calls the hook once per
        test and caches its loop fixtures by factory, so a new wrapper per
        call would close module- and session-scoped loops after every test.
        """
        if not callable(factory):
            return factory  # pytest-asyncio explains what it expects
        try:
            wrapper = self._wrapped.get(factory)
        except TypeError:  # unhashable
            return self._wrap(factory)
        if wrapper is None:
            wrapper = self._wrapped[factory] = self._wrap(factory)
        return wrapper

    def _wrap(self, factory: LoopFactory) -> LoopFactory:
        def asyncwatch_loop_factory() -> asyncio.AbstractEventLoop:
            loop = factory()
            self.attach(loop)
            return loop

        asyncwatch_loop_factory.__qualname__ = f"asyncwatch({getattr(factory, '__qualname__', factory)!s})"
        return asyncwatch_loop_factory

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Watch *loop* with the options of the test, or wider fixture, it is made for."""
        engine = current_engine()
        if engine is None or engine.is_watching(loop):
            return
        owner = self._current()
        settings = dataclasses.replace(engine.settings, slow_callback_ms=owner.options.slow_callback_ms)
        try:
            engine.attach(loop, settings)
        except Exception as exc:  # noqa: BLE001 - diagnostics never break a test run; it runs on unwatched
            report_internal_error("pytest plugin", exc)

    # -- findings ------------------------------------------------------------

    def report(self, finding: Finding) -> None:
        """Receive a finding from the engine (any thread): it is the current owner's."""
        owner = self._current()
        if not owner.judged:
            return
        outside = self._outside_project(finding)
        finding = _sited(finding, owner.location, self.options.root)
        if outside is not None:
            owner.not_ours[id(finding)] = outside
        owner.add(finding)
        if self._file is not None:
            record = {"nodeid": owner.nodeid, "fixture": owner.fixture, "counts": owner.counts(finding)}
            if outside is not None:
                record["not_counted"] = outside
            if self._worker:
                record["worker"] = self._worker
            data = (json.dumps({**record, **finding.to_dict()}) + "\n").encode("utf-8")
            with self._file_lock:
                if self._file is not None:
                    try:
                        os.write(self._file, data)
                    except OSError as exc:
                        report_internal_error("pytest plugin findings file", exc)

    def _outside_project(self, finding: Finding) -> str | None:
        """Why *finding* does not fail its test for where it is (None: it may)."""
        site = finding.site
        # Without an application frame, the place is where the stack ends.
        place = site or (finding.stack[-1] if finding.stack else None)
        if place is not None:
            for pattern in self.options.allow_sites:
                if _site_matches(pattern, place.file, place.line, self.options.root):
                    return f"its site matches the allowed site {pattern!r}"
        if finding.cause == "import":
            # A module imported inside the running loop (a lazy import, an
            # app factory): start-up work, not a mistake of the test's, as
            # `asyncwatch run --fail-on-findings` also judges it (issue 13).
            return "it is a stall inside an import, start-up work (cause=import)"
        if self.options.fail_on == "all":
            return None
        if site is None:
            return "no frame of the project's own code was running (fail_on=project)"
        if not _in_project(site.file, self.options.root):
            return "its site is outside the project, in code it does not own (fail_on=project)"
        return None

    def _current(self) -> Owner:
        try:
            return self._owners[-1]
        except IndexError:  # (checking first would race with the main thread)
            return self._outside

    def _push(self, owner: Owner) -> None:
        self._owners.append(owner)

    def _pop(self, owner: Owner) -> None:
        for i in range(len(self._owners) - 1, -1, -1):
            if self._owners[i] is owner:
                del self._owners[i]
                return

    def _emit_for(self, owner: Owner, finding: Finding) -> None:
        """Emit *finding* through the engine (every reporter sees it) as *owner*'s."""
        self._push(owner)
        try:
            if self._engine is not None:
                self._engine.emit(finding)
        finally:
            self._pop(owner)

    # -- tests ---------------------------------------------------------------

    def check_options(self, item: pytest.Item) -> NodeOptions:
        """Return *item*'s options; raise `pytest.UsageError` for a bad marker."""
        options = item.stash.get(_OPTIONS_KEY, None)
        if options is None:
            options = item.stash[_OPTIONS_KEY] = node_options(item, self.options)
        return options

    def start_test(self, item: pytest.Item) -> None:
        """Make *item* the owner of what follows, until `end_test`."""
        judged = self.wants(item)
        owner = Owner("the test", item.nodeid, judged, self.check_options(item))
        item.stash[_OWNER_KEY] = owner
        self._push(owner)
        _OWNER.set(owner)
        owner.location = _test_line(item)

    def collect_after(self, item: pytest.Item, when: str) -> None:
        """Collect *item*'s garbage once its phase *when* has run, before
        pytest reports the phase's unraisable exceptions: what a finalizer
        of the test's garbage raises is reported in the test's own phase,
        never in the next test's setup."""
        owner = item.stash.get(_OWNER_KEY, None)
        if owner is not None and owner.judged:
            owner.gc_clock.collect(last=when == "teardown")
            owner.collected = when

    def end_call(self, item: pytest.Item, failed: bool) -> str | None:
        """Judge what setup and the test body produced; return the failure text, if it fails."""
        owner = item.stash.get(_OWNER_KEY, None)
        if owner is None or not owner.judged:
            return None
        if owner.collected != "call":  # the phase failed before `collect_after`
            owner.gc_clock.collect(last=False)
        new = owner.take_new()
        if owner.expected:
            return None  # the test took them with the fixture: its own to check
        return self._verdict(owner, new, item, "call", failed)

    def end_test(self, item: pytest.Item, failed: bool) -> str | None:
        """Judge what teardown produced and the tasks left running; stop owning."""
        owner = item.stash.get(_OWNER_KEY, None)
        if owner is None:
            return None
        try:
            if not owner.judged:
                return None
            if owner.collected != "teardown":
                owner.gc_clock.collect(last=True)
            self._report_leaks(self._open_loops(), only=owner)
            return self._verdict(owner, owner.take_new(), item, "teardown", failed)
        finally:
            self._pop(owner)
            _OWNER.set(None)
            del item.stash[_OWNER_KEY]  # the summary keeps the ones with findings

    def findings_of(self, item: pytest.Item) -> list[Finding]:
        """Return the live list of *item*'s findings (the fixture); they no longer fail it."""
        owner = item.stash.get(_OWNER_KEY, None)
        if owner is None or not owner.judged:
            pytest.fail("asyncwatch is not watching this test", pytrace=False)
        owner.expected = True
        return owner.findings

    def _verdict(self, owner: Owner, findings: list[Finding], item: pytest.Item, when: str, failed: bool) -> str | None:
        counted = [f for f in findings if owner.counts(f)]
        self._not_ours_seen += [(owner, f) for f in findings if id(f) in owner.not_ours]
        if not counted:
            return None
        if not owner.counted:
            self._failed_tests.append(owner)
        owner.counted += counted
        if self.options.mode == "report":
            return None
        text = render(counted, self.config.rootpath, "teardown" if when == "teardown" else "")
        if failed:  # the phase failed anyway: show the findings beside its error
            item.add_report_section(when, "asyncwatch", text)
            return None
        return f"{text}\n\n{_HINT}"

    # -- fixtures ------------------------------------------------------------

    def enter_fixture(self, fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> Any:
        """A fixture starts its setup: one wider than the test owns what it does."""
        # The scope it is set up with, not the one it declares: pytest-asyncio
        # parametrizes its session-scoped loop-factory fixture per test.
        scope = request.scope
        if scope == "function":
            return None  # part of the test
        node = request.node
        owner = Owner(
            f"fixture {fixturedef.argname!r} ({scope} scope)",
            node.nodeid or None,
            self.options.every_test or node.get_closest_marker(MARKER) is not None,
            node_options(node, self.options),
            fixture=fixturedef.argname,
        )
        if owner.judged:
            self._fixture_owners.append(owner)
        self._push(owner)
        return owner, _OWNER.set(owner)

    def leave_fixture(self, entered: Any) -> None:
        """The fixture's setup is over (done or failed): what it dropped is its own."""
        if entered is not None:
            owner, token = entered
            if owner.judged:
                _collect_garbage()
            _OWNER.reset(token)
            self._pop(owner)

    def fixture_ready(self, fixturedef: pytest.FixtureDef[Any], entered: Any, value: Any) -> None:
        """A fixture is set up: own its teardown; look at a runner's loop before it closes."""
        if entered is not None:
            owner = entered[0]
            self._fixtures[fixturedef] = owner
            # Finalizers run last in, first out: this one runs before the
            # fixture's own teardown, pytest_fixture_post_finalizer after it.
            fixturedef.addfinalizer(lambda: self._push(owner))
        if isinstance(value, asyncio.Runner):
            # pytest-asyncio's runner cancels every task left on its loop as
            # it closes: see them first.  The fixtures that use the loop
            # register their teardown on the runner later, so they are torn
            # down before this runs.
            fixturedef.addfinalizer(lambda: self._before_loop_closes(value))

    def fixture_finalized(self, fixturedef: pytest.FixtureDef[Any]) -> None:
        """A wider fixture is torn down: what it dropped is its own."""
        owner = self._fixtures.pop(fixturedef, None)
        if owner is not None:
            if owner.judged:
                _collect_garbage()
            self._pop(owner)

    def _before_loop_closes(self, runner: asyncio.Runner) -> None:
        try:
            loop = runner.get_loop()
        except RuntimeError:  # already closed
            return
        if any(o.judged for o in self._owners):
            _collect_garbage(YOUNG)  # (the test's own collection follows its teardown)
        self._report_leaks([loop], only=None)

    # -- leaks ---------------------------------------------------------------

    def _open_loops(self) -> list[asyncio.AbstractEventLoop]:
        engine = self._engine
        if engine is None:
            return []
        return [loop for loop in list(engine.watches.keys()) if not loop.is_closed()]

    def _report_leaks(self, loops: Iterable[asyncio.AbstractEventLoop], only: Owner | None) -> None:
        """Report each task still pending on *loops* as leaked by the test or
        fixture that created it (by *only*, if given); once per task."""
        for loop in loops:
            try:
                pending = asyncio.all_tasks(loop)
            except RuntimeError:  # the set of tasks kept changing under us
                continue
            for task in pending:
                if task in self._reported:
                    continue
                creator = _owner_of(task)
                if creator is None or not creator.judged or (only is not None and creator is not only):
                    continue
                self._reported.add(task)
                self._emit_for(creator, leaked_finding(task, creator))
            del pending  # hold no task longer than needed

    # -- the end -------------------------------------------------------------

    def _outside_findings(self) -> list[Owner]:
        """Judged fixtures and the session itself, with the findings that count."""
        out = []
        for owner in [*self._fixture_owners, self._outside]:
            owner.counted = [f for f in owner.findings if owner.counts(f)]
            if owner.counted:
                out.append(owner)
        return out

    def fails_session(self) -> bool:
        """Return whether findings outside any test fail the run (they fail no test)."""
        return self.options.mode == "fail" and bool(self._outside_findings())

    def summary(self) -> list[tuple[str, str]]:
        """Return a (title, text) per owner to show in the terminal summary."""
        shown = [] if self.options.mode == "fail" else self._failed_tests  # failures show their own
        out = []
        for owner in [*shown, *self._outside_findings()]:
            out.append((_title(owner), render(owner.counted, self.config.rootpath)))
        not_ours: dict[str, list[Finding]] = {}
        for owner, finding in self._not_ours_seen:
            if owner.options.counts(finding):
                not_ours.setdefault(_title(owner), []).append(finding)
        for title, findings in not_ours.items():
            why = sorted({o.not_ours[id(f)] for o, f in self._not_ours_seen if _title(o) == title and id(f) in o.not_ours})
            text = render(findings, self.config.rootpath) + "\n\nnot failing the test: " + "; ".join(why) + "\n" + _WHERE_HINT
            out.append((f"{title} (reported, not failing)", text))
        return out


def _title(owner: Owner) -> str:
    title = owner.nodeid if owner.fixture is None and owner.nodeid else owner.what
    if owner.fixture is not None and owner.nodeid:
        title += f" of {owner.nodeid}"
    return title or "outside any test"


_WHERE_HINT = (
    "(findings sited outside the project's own code are reported, not failed: "
    "--asyncwatch-fail-on=all fails them too; --asyncwatch-allow-site=PATTERN or asyncwatch_allow_sites "
    "never fails findings at a module, path glob or path:line)"
)


def _run_node_options(options: RunOptions) -> NodeOptions:
    return NodeOptions(options.allow, options.slow_callback_ms)


# --- rendering ---------------------------------------------------------------


def render(findings: list[Finding], root: os.PathLike[str] | str, when: str = "") -> str:
    """Return *findings* as text for the terminal: a one-line summary (what
    pytest's short summary shows), then a block per finding."""
    places = dict.fromkeys(
        f"{f.kind.value} at {_where(f.site, root, short=True)}" if f.site else f.kind.value for f in findings
    )
    lines = [f"asyncwatch{f' ({when})' if when else ''}: {', '.join(places)}"]
    for finding in findings:
        lines += ["", f"{finding.kind.value}: {finding.message}"]
        lines += _site_lines(finding.site, root, "  ") if finding.site else ["  (site unknown)"]
        for label, extra in (("cancelled by", finding.cancelled_by), ("created at", finding.created_at)):
            if extra is not None and extra != finding.site:
                lines += _site_lines(extra, root, "  ", f"{label} ")
        if finding.stack and finding.stack != (finding.site,):
            lines.append("  stack (outermost first):")
            for site in finding.stack:
                lines += _site_lines(site, root, "    ")
    return "\n".join(lines)


def _where(site: Site, root: os.PathLike[str] | str, short: bool = False) -> str:
    path = _display_path(site.file, os.fspath(root))
    return f"{path}:{site.line}" if short else f"{path}:{site.line} in {site.function}"


def _display_path(path: str, root: str) -> str:
    """*path* relative to the rootdir, or to its entry of ``sys.path``
    (``asyncio/tasks.py``), or as it is."""
    for base in (root, *sorted((p for p in sys.path if p and os.path.isabs(p)), key=len, reverse=True)):
        try:
            rel = os.path.relpath(path, base)
        except ValueError:  # another drive on Windows
            continue
        if not rel.startswith(".."):
            return rel
    return path


def _site_lines(site: Site, root: os.PathLike[str] | str, indent: str, label: str = "") -> list[str]:
    """``file:line in function`` and, below it, the source line."""
    out = [f"{indent}{label}{_where(site, root)}"]
    source = linecache.getline(site.file, site.line).strip()
    if source:
        out.append(f"{indent}    {source}")
    return out
