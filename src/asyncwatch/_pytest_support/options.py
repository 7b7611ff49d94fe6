"""The plugin's options: the run's (command line and ini) and each node's (the marker)."""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable
from typing import Any

import pytest

from .._core.findings import Finding, FindingKind
from .._core.settings import ConfigurationError, did_you_mean, parse_bool, parse_kinds, parse_ms

MARKER = "asyncwatch"
FIXTURE = "asyncwatch_findings"
MODES = ("fail", "report")
MARKER_OPTIONS = ("allow", "slow_callback_ms")


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


def _refuse_values_taken_for_test_paths(config: pytest.Config) -> None:
    """Refuse ``--asyncwatch-findings PATH`` (a separate argument) naming an
    existing path outside the invocation directory.

    pytest finds its rootdir and ini file before it loads plugins, so it
    takes the value of a plugin's option given as a separate argument for a
    test path (pytest-dev/pytest#8846).  A findings file that a first run
    wrote (``/tmp/findings.jsonl``) moved the second run's rootdir to
    ``/tmp``, away from the project's ini file: async_lru's suite lost its
    ``asyncio_mode = auto`` and 72 of its tests failed.  The run cannot be
    mended from here; with ``=`` it is not affected."""
    args = list(config.invocation_params.args)
    here = os.path.abspath(config.invocation_params.dir)
    for option, value in itertools.pairwise(args):
        if not option.startswith("--asyncwatch-") or "=" in option:
            continue
        path = os.path.abspath(os.path.join(here, value))
        if os.path.exists(path) and os.path.commonpath((here, path)) != here:
            raise pytest.UsageError(
                f"asyncwatch: {option} {value}: pytest takes an existing path given as a separate argument "
                f"for a test path while it looks for its rootdir and ini file, which may then not be {here}'s "
                f"(pytest-dev/pytest#8846); write {option}={value}"
            )


def read_options(config: pytest.Config) -> RunOptions:
    """Resolve the run's options; raise `pytest.UsageError` naming the bad one."""
    _refuse_values_taken_for_test_paths(config)

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


def _run_node_options(options: RunOptions) -> NodeOptions:
    return NodeOptions(options.allow, options.slow_callback_ms)


# --- rendering ---------------------------------------------------------------
