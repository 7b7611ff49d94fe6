"""asyncwatch: make asyncio's silent failures visible while a program runs."""

from ._core.findings import Finding, FindingKind, Site
from ._core.settings import ConfigurationError, Settings
from ._engine import is_installed
from ._install import Installation, install, uninstall
from ._outputs.jsonl import JsonLinesReporter
from ._outputs.log import StructlogReporter
from ._outputs.pipeline import Reporter
from ._policy import EventLoopPolicy, loop_factory, new_event_loop
from ._version import __version__

__all__ = [
    "ConfigurationError",
    "EventLoopPolicy",
    "Finding",
    "FindingKind",
    "Installation",
    "JsonLinesReporter",
    "Reporter",
    "Settings",
    "Site",
    "StructlogReporter",
    "__version__",
    "install",
    "is_installed",
    "loop_factory",
    "new_event_loop",
    "uninstall",
]
