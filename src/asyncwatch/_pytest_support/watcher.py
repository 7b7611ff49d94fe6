"""The `Watcher`: watching every loop of the run, judging the tests that asked.

One concept, hence one module over the usual length: the owner stack, the
loops it attaches and the verdicts share the watcher's state and its lock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import threading
import types
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytest

from .._core import loops
from .._core.findings import Finding, counts_against_program
from .._core.runtime import report_internal_error
from .._engine import Engine, current_engine, ensure_engine
from .._install import uninstall, watch_future_loops
from .._policy import EventLoopPolicy, get_policy, set_policy
from .options import FIXTURE, MARKER, NodeOptions, RunOptions, _run_node_options, node_options
from .owners import (
    _OWNER,
    YOUNG,
    Owner,
    _collect_garbage,
    _in_project,
    _owner_of,
    _site_matches,
    _sited,
    _test_line,
    leaked_finding,
)
from .render import _WHERE_HINT, _title, render

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


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
        # The function itself, not os.write looked up at each finding: a
        # finding is often reported on the loop thread, where a test suite's
        # blocking-call guard (blockbuster, patching os.write) would turn
        # this one-line O_APPEND write into an exception of ours.
        self._write = os.write
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
                        self._write(self._file, data)
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
        if not counts_against_program(finding) and finding.site is not None:
            # The test's own gc.collect() call: its line, the collector's time
            # (a full collection lasts as long as the heap makes it).
            return f"it is the collector's time, a collection this line asked for (cause={finding.cause})"
        if not counts_against_program(finding):
            # The collector, another thread holding the GIL, or a machine
            # short of CPUs stalled the loop: no line of the test's (issue 12).
            return f"it is a stall that is not the program's line (cause={finding.cause})"
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
        return [loop for loop in list(engine.watches.keys()) if not loops.is_closed(loop)]

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
        out = [
            (_title(owner), render(owner.counted, self.config.rootpath))
            for owner in [*shown, *self._outside_findings()]
        ]
        not_ours: dict[str, list[Finding]] = {}
        for owner, finding in self._not_ours_seen:
            if owner.options.counts(finding):
                not_ours.setdefault(_title(owner), []).append(finding)
        for title, findings in not_ours.items():
            why = sorted(
                {o.not_ours[id(f)] for o, f in self._not_ours_seen if _title(o) == title and id(f) in o.not_ours}
            )
            text = (
                render(findings, self.config.rootpath)
                + "\n\nnot failing the test: "
                + "; ".join(why)
                + "\n"
                + _WHERE_HINT
            )
            out.append((f"{title} (reported, not failing)", text))
        return out
