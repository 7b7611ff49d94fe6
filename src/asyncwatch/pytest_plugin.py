"""pytest plugin: run async tests on watched loops and fail the test that produced findings.

Off until asked: ``pytest --asyncwatch``, ``asyncwatch = true`` in the ini
file, or ``@pytest.mark.asyncwatch`` on a test, class or module (which also
takes options: ``allow=[...]``, ``slow_callback_ms=...``).  Loaded through
the ``pytest11`` entry point; ``-p no:asyncwatch`` keeps it out entirely.

This module holds the options, the marker, the fixture and the hooks; the
work is done by `asyncwatch._pytest_support.Watcher`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, NoReturn

import pytest

from ._core.findings import Finding
from ._pytest_support import MARKER, MARKER_OPTIONS, MODES, Watcher, read_options

__all__ = ["asyncwatch_findings"]

_WATCHER = pytest.StashKey[Watcher]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("asyncwatch", "asyncwatch: make asyncio's silent failures visible")
    group.addoption(
        "--asyncwatch",
        action="store_true",
        default=False,
        help="watch every test and fail those with findings (default: only tests marked @pytest.mark.asyncwatch)",
    )
    group.addoption(
        "--asyncwatch-mode",
        dest="asyncwatch_mode",
        default=None,
        metavar="MODE",
        help=f"fail: a test with findings fails (default); report: list them in the summary only. One of: {', '.join(MODES)}",
    )
    group.addoption(
        "--asyncwatch-findings",
        dest="asyncwatch_findings",
        default=None,
        metavar="PATH",
        help="write every finding as one JSON line, with the test's node id, to PATH",
    )
    group.addoption(
        "--asyncwatch-slow-callback-ms",
        dest="asyncwatch_slow_callback_ms",
        default=None,
        metavar="MS",
        help="a callback or task step holding the loop this long is a slow_callback (default 100)",
    )
    group.addoption(
        "--asyncwatch-allow",
        dest="asyncwatch_allow",
        default=None,
        metavar="KINDS",
        help="finding kinds that never fail a test (comma-separated)",
    )
    group.addoption(
        "--asyncwatch-fail-on",
        dest="asyncwatch_fail_on",
        default=None,
        metavar="WHERE",
        help="project: fail a test only for findings sited in the project's own code (under the rootdir, not an "
        "installed package), report the others (default); all: fail for every finding",
    )
    group.addoption(
        "--asyncwatch-allow-site",
        dest="asyncwatch_allow_site",
        action="append",
        default=None,
        metavar="PATTERN",
        help="never fail a test for findings sited at PATTERN: a module (anyio._backends), a path glob "
        "(*/anyio/*), either with :LINE; repeatable",
    )
    parser.addini("asyncwatch", "watch every test (true/false)", default="false")
    parser.addini("asyncwatch_mode", f"default for --asyncwatch-mode ({', '.join(MODES)})", default="fail")
    parser.addini("asyncwatch_findings", "default for --asyncwatch-findings", default="")
    parser.addini("asyncwatch_slow_callback_ms", "default for --asyncwatch-slow-callback-ms", default="100")
    parser.addini("asyncwatch_allow", "default for --asyncwatch-allow", default="")
    parser.addini(
        "asyncwatch_track_coroutine_origins",
        "record where each coroutine is created, for exact coroutine_never_awaited sites (true/false)",
        default="true",
    )
    parser.addini("asyncwatch_log", "also log each finding as a structlog event (true/false)", default="false")
    parser.addini("asyncwatch_fail_on", "default for --asyncwatch-fail-on (project, all)", default="project")
    parser.addini(
        "asyncwatch_allow_sites",
        "sites whose findings never fail a test (see --asyncwatch-allow-site)",
        type="linelist",
        default=[],
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker, resolve the options, and start at once if every test is watched."""
    config.addinivalue_line(
        "markers",
        f"{MARKER}({', '.join(f'{o}=...' for o in MARKER_OPTIONS)}): watch this test (class, module) with "
        "asyncwatch and fail it if it produced findings; allow: finding kinds that never fail it; "
        "slow_callback_ms: the slow-callback threshold",
    )
    watcher = Watcher(config, read_options(config))
    config.stash[_WATCHER] = watcher
    config.pluginmanager.register(_GarbageCollection(watcher), "asyncwatch-garbage-collection")
    if watcher.options.every_test:
        watcher.activate()


def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave the process as it was (this also runs for pytester's in-process runs)."""
    watcher = config.stash.get(_WATCHER, None)
    if watcher is not None:
        watcher.close()


def pytest_report_header(config: pytest.Config) -> str:
    """Show the effective settings."""
    return config.stash[_WATCHER].options.header()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_pycollect_makeitem(
    collector: pytest.Module | pytest.Class, name: str, obj: object
) -> Generator[None, Any, Any]:
    # Start before pytest-asyncio parametrizes the first test that asks for
    # asyncwatch with its loop factories, so that those loops are watched.
    # Nothing here may raise or look into what a test module holds beyond a
    # plain function (`Watcher.asks`).
    __tracebackhide__ = True  # see pytest_runtest_setup
    watcher = collector.config.stash[_WATCHER]
    if not watcher.active and watcher.asks(collector, obj):
        watcher.activate()
    return (yield)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Check every marker's options now, and start if a test asks for asyncwatch
    in a way collection could not see (a marker added by a hook)."""
    watcher = config.stash[_WATCHER]
    for item in items:
        if watcher.wants(item):
            watcher.check_options(item)
            watcher.activate()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    """Make the test the owner of what happens, from its first fixture on."""
    # What the phase raises passes through this wrapper: pytest leaves out
    # frames that say so, and its report shows what it shows without
    # asyncwatch (an error in pytest's own setup state once named this line).
    __tracebackhide__ = True
    watcher = item.config.stash[_WATCHER]
    if watcher.active:
        watcher.start_test(item)
    return (yield)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """Fail the test, after its body, for what its setup and body produced.

    Failing from this wrapper makes it an ordinary test failure (with xfail
    and the short summary working as usual); a test that failed anyway gets
    the findings as a section of its report instead.
    """
    __tracebackhide__ = True  # see pytest_runtest_setup
    return (yield from _judged(item, Watcher.end_call))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    """Fail the teardown for tasks left running and for what teardown produced."""
    __tracebackhide__ = True  # see pytest_runtest_setup
    return (yield from _judged(item, Watcher.end_test))


def _judged(
    item: pytest.Item, judge: Callable[[Watcher, pytest.Item, bool], str | None]
) -> Generator[None, None, None]:
    """Run the phase, then fail it with the text *judge* gives (a phase that
    failed anyway is only told, and its own error stands)."""
    __tracebackhide__ = True  # see pytest_runtest_setup
    watcher = item.config.stash[_WATCHER]
    if not watcher.active:
        return (yield)
    try:
        result = yield
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        judge(watcher, item, True)
        raise
    failure = judge(watcher, item, False)
    if failure:
        _fail(failure)
    return result


def _fail(failure: str) -> NoReturn:
    """Fail the phase with *failure*, shown as itself.  From a frame of its
    own, not hidden: were every frame of the traceback hidden, pytest would
    add "All traceback entries are hidden" under the message."""
    pytest.fail(failure, pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
) -> Generator[None, Any, Any]:
    """Give a fixture wider than the test what it does while it sets up and tears down."""
    __tracebackhide__ = True  # see pytest_runtest_setup
    watcher = request.config.stash[_WATCHER]
    if not watcher.active:
        return (yield)
    entered = watcher.enter_fixture(fixturedef, request)
    try:
        value = yield
    finally:
        watcher.leave_fixture(entered)
    watcher.fixture_ready(fixturedef, entered, value)
    return value


def pytest_fixture_post_finalizer(fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> None:
    """End a wider fixture's ownership after its teardown."""
    watcher = request.config.stash[_WATCHER]
    if watcher.active:
        watcher.fixture_finalized(fixturedef)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run for findings that no test is theirs to fail (wider fixtures, between tests)."""
    watcher = session.config.stash[_WATCHER]
    if watcher.active and watcher.fails_session() and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """List findings that no failure shows: report mode's, and those outside any test."""
    watcher = config.stash[_WATCHER]
    if not watcher.active:
        return
    blocks = watcher.summary()
    if not blocks:
        return
    terminalreporter.write_sep("=", "asyncwatch findings")
    for title, text in blocks:
        terminalreporter.write_sep("_", title)
        terminalreporter.write_line(text)
    if watcher.fails_session():
        terminalreporter.write_line(
            "asyncwatch: the findings outside any test above fail the run (no test is theirs to fail)", red=True
        )


class _GarbageCollection:
    """Collect a judged test's garbage at the end of its call and teardown phases.

    Plain ``trylast`` implementations: they run after the phase itself (the
    test body; the fixtures' teardown), inside it.  pluggy calls the
    ``trylast`` ones last registered first, so this runs after pytest's
    unraisable-exception plugin has reported what the phase's finalizers
    raised; what the collection makes a finalizer raise is then reported
    here, as pytest reports it, so that it is the test's own, in its own
    phase, and never lands in the next test's setup.
    """

    def __init__(self, watcher: Watcher) -> None:
        self._watcher = watcher

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_call(self, item: pytest.Item) -> None:
        if self._watcher.active:
            self._watcher.collect_after(item, "call")
            _report_unraisable(item.config)

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_teardown(self, item: pytest.Item, nextitem: pytest.Item | None) -> None:
        if self._watcher.active:
            self._watcher.collect_after(item, "teardown")
            _report_unraisable(item.config)


def _report_unraisable(config: pytest.Config) -> None:
    """Have pytest (8.4 and later) report the unraisable exceptions queued so far, in this phase.

    Earlier pytest versions catch them with a wrapper around the whole
    phase, which this already runs inside of.
    """
    if not config.pluginmanager.has_plugin("unraisableexception"):
        return
    try:
        from _pytest.unraisableexception import collect_unraisable
    except ImportError:  # pytest < 8.4
        return
    collect_unraisable(config)


@pytest.fixture
def asyncwatch_findings(request: pytest.FixtureRequest) -> list[Finding]:
    """The findings asyncwatch reports for this test, as they happen.

    Taking this fixture turns asyncwatch on for the test, and makes the
    findings up to the end of the test function the test's own to check:
    they do not fail it.  Findings in its teardown (tasks left running, for
    instance) still do.
    """
    return request.config.stash[_WATCHER].findings_of(request.node)
