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
  reported in that test (and only those: see `_TestHeap`).
* **A task belongs to the code that created it**, traced with a context
  variable that every task copies at creation: a task a test started is that
  test's, a task a module-scoped fixture (or the server it runs) started is
  the fixture's, whatever test happens to be running at the time.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import gc
import json
import linecache
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import IO, Any

import pytest

from ._core.findings import Finding, FindingKind, Site, counts_against_program
from ._core.frames import frame_site, is_library_file
from ._core.runtime import report_internal_error
from ._core.settings import ConfigurationError, did_you_mean, parse_bool, parse_kinds, parse_ms
from ._core.tasks import coro_name, created_at
from ._engine import Engine, current_engine, ensure_engine
from ._install import uninstall
from ._policy import EventLoopPolicy, get_policy, set_policy

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

    def header(self) -> str:
        """Return the report header line."""
        who = "every test" if self.every_test else f"tests marked @pytest.mark.{MARKER} (--asyncwatch: every test)"
        allow = ",".join(sorted(k.value for k in self.allow)) or "none"
        return (
            f"asyncwatch: watching {who}; mode={self.mode}, slow_callback_ms={self.slow_callback_ms:g}, "
            f"allow={allow}, findings={self.findings or 'none'}, "
            f"track_coroutine_origins={self.track_coroutine_origins}, log={self.log}"
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
    )


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
        if not counts_against_program(finding):
            return False  # the collector, another thread's GIL, no CPU free, an import
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
        self._lock = threading.Lock()

    def add(self, finding: Finding) -> None:
        with self._lock:
            self.findings.append(finding)

    def take_new(self) -> list[Finding]:
        """Return the findings not judged yet, and mark them judged."""
        with self._lock:
            new = self.findings[self.verdict_upto :]
            self.verdict_upto = len(self.findings)
        return new


def _collect_garbage() -> None:
    """Collect until nothing more is freed: finalizers can free more."""
    for _ in range(4):
        if not gc.collect():
            break


class _TestHeap:
    """Keep each judged test's garbage collections about that test's objects.

    A full collection walks every object in the process, and a test session
    holds a lot of them (pytest's items and reports grow with every test):
    collecting at the end of each test made a suite of small tests a hundred
    times slower.  So while a judged test runs, everything older than the
    test is frozen (`gc.freeze`, a constant-time move in CPython): the
    collections at its end see only what the test made.  Garbage older than
    the test is not the test's anyway; it is collected once the test is
    over, or, for a wider fixture, right after its teardown.
    """

    def __init__(self) -> None:
        self.frozen = False

    def freeze(self) -> None:
        if not self.frozen:
            gc.freeze()
            self.frozen = True

    def unfreeze(self) -> None:
        if self.frozen:
            gc.unfreeze()
            self.frozen = False

    def collect_all(self) -> None:
        """Collect every generation, old objects included, then freeze again."""
        frozen = self.frozen
        self.unfreeze()
        _collect_garbage()
        if frozen:
            self.freeze()


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
    "or only report findings with --asyncwatch-mode=report)"
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
        self._heap = _TestHeap()
        self._file: IO[str] | None = None
        self._file_lock = threading.Lock()
        if options.findings:
            try:
                self._file = open(options.findings, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
            except OSError as exc:
                raise pytest.UsageError(
                    f"asyncwatch: cannot write the findings file {options.findings!r} ({exc.strerror}); "
                    "give a path in a writable directory"
                ) from None

    # -- activation ----------------------------------------------------------

    def wants(self, node: pytest.Item | pytest.Collector, obj: object = None) -> bool:
        """Return whether *node* (or the function *obj* being collected in it) asks to be judged."""
        if self.options.every_test or node.get_closest_marker(MARKER) is not None:
            return True
        if any(getattr(m, "name", None) == MARKER for m in getattr(obj, "pytestmark", ())):
            return True
        if FIXTURE in getattr(node, "fixturenames", ()):
            return True
        code = getattr(obj, "__code__", None)
        return code is not None and FIXTURE in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]

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
        self._heap.unfreeze()
        with self._file_lock:
            if self._file is not None:
                self._file.close()
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
        except Exception as exc:
            report_internal_error("pytest plugin", exc)

    # -- findings ------------------------------------------------------------

    def report(self, finding: Finding) -> None:
        """Receive a finding from the engine (any thread): it is the current owner's."""
        owner = self._current()
        if not owner.judged:
            return
        owner.add(finding)
        if self._file is not None:
            line = json.dumps({"nodeid": owner.nodeid, "fixture": owner.fixture, **finding.to_dict()})
            with self._file_lock:
                if self._file is not None:
                    self._file.write(line + "\n")
                    self._file.flush()

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
        if judged:
            self._heap.freeze()

    def end_call(self, item: pytest.Item, failed: bool) -> str | None:
        """Judge what setup and the test body produced; return the failure text, if it fails."""
        owner = item.stash.get(_OWNER_KEY, None)
        if owner is None or not owner.judged:
            return None
        _collect_garbage()
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
            _collect_garbage()
            self._report_leaks(self._open_loops(), only=owner)
            return self._verdict(owner, owner.take_new(), item, "teardown", failed)
        finally:
            self._heap.unfreeze()
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
        counted = [f for f in findings if owner.options.counts(f)]
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
                self._heap.collect_all()
            self._pop(owner)

    def _before_loop_closes(self, runner: asyncio.Runner) -> None:
        try:
            loop = runner.get_loop()
        except RuntimeError:  # already closed
            return
        if any(o.judged for o in self._owners):
            _collect_garbage()
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
            owner.counted = [f for f in owner.findings if owner.options.counts(f)]
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
            title = owner.nodeid if owner.fixture is None and owner.nodeid else owner.what
            if owner.fixture is not None and owner.nodeid:
                title += f" of {owner.nodeid}"
            out.append((title or "outside any test", render(owner.counted, self.config.rootpath)))
        return out


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
