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

from .options import FIXTURE, MARKER, MARKER_OPTIONS, MODES, NodeOptions, RunOptions, read_options
from .render import render
from .watcher import Watcher

__all__ = [
    "FIXTURE",
    "MARKER",
    "MARKER_OPTIONS",
    "MODES",
    "NodeOptions",
    "RunOptions",
    "Watcher",
    "read_options",
    "render",
]
