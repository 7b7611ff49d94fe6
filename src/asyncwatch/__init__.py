"""asyncwatch: make asyncio's silent failures visible while a program runs."""

from ._engine import Installation, install, is_installed, uninstall
from ._findings import Finding, FindingKind, Site
from ._policy import EventLoopPolicy, loop_factory, new_event_loop
from ._reporters import JsonLinesReporter, Reporter, StructlogReporter
from ._settings import ConfigurationError, Settings
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
