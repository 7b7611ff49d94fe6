"""Watch this Python process: it was started by a program under ``asyncwatch run``.

``asyncwatch run`` puts this directory first on ``PYTHONPATH`` (see
``asyncwatch/_children.py``), so every Python the program starts imports
this module at start-up.  It installs asyncwatch when the process imports
``asyncio`` (a process that never does pays nothing: importing asyncio and
asyncwatch costs about 100 ms), then runs the ``sitecustomize`` this one
hides (the user's, or the distribution's), so that that still runs.

Any Python may import this file, asyncwatch installed or not, old or new, so
it uses no syntax newer than Python 2.7's, and it never raises: a Python that
cannot import asyncwatch (another interpreter, another virtual environment)
runs unwatched and says nothing.
"""

import os
import sys

MYPY = False
if MYPY:  # names for the type comments below (Python 2 has no annotations)
    from collections.abc import Sequence  # noqa: F401
    from importlib.machinery import ModuleSpec  # noqa: F401
    from types import ModuleType  # noqa: F401
    from typing import Any, Optional  # noqa: F401


def _watch():  # type: () -> None
    try:
        from asyncwatch._children import bootstrap
    except ImportError as exc:
        if getattr(exc, "name", None) in ("asyncwatch", "asyncwatch._children"):
            return  # not installed for this interpreter: not ours to watch
        _warn(exc)
        return
    except Exception as exc:  # noqa: BLE001 - a broken install must not stop the program
        _warn(exc)
        return
    bootstrap()  # never raises


def _warn(exc):  # type: (BaseException) -> None
    try:  # noqa: SIM105 - no contextlib import in the start-up of every child
        sys.stderr.write(
            "asyncwatch: child process %d (%s): not watched: cannot import asyncwatch: %s: %s\n"  # noqa: UP031 - no f-strings in Python 2
            % (os.getpid(), sys.executable, type(exc).__name__, exc)
        )
    except Exception:  # noqa: BLE001, S110 - no stderr to complain to
        pass


class _WatchAfterAsyncio(object):  # noqa: UP004 - Python 2 syntax
    """A one-shot import hook: once ``asyncio`` is imported, watch the process."""

    def find_spec(self, name, path=None, target=None):
        # type: (str, Optional[Sequence[str]], Optional[ModuleType]) -> Optional[ModuleSpec]
        if name != "asyncio":
            return None
        try:
            sys.meta_path.remove(self)
            from importlib.util import find_spec

            spec = find_spec(name)
            if spec is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _ThenWatch(spec.loader)  # type: ignore[assignment] # a Loader in all but name
                return spec
        except Exception:  # noqa: BLE001, S110 - the import goes on unwatched
            pass
        return None


class _ThenWatch(object):  # noqa: UP004 - Python 2 syntax
    """asyncio's loader, which watches the process once asyncio is loaded."""

    def __init__(self, loader):  # type: (Any) -> None
        self.loader = loader

    def create_module(self, spec):  # type: (ModuleSpec) -> Optional[ModuleType]
        return self.loader.create_module(spec)  # type: ignore[no-any-return]

    def exec_module(self, module):  # type: (ModuleType) -> None
        self.loader.exec_module(module)
        try:
            module.__loader__ = self.loader  # as if it had loaded it
            if module.__spec__ is not None:
                module.__spec__.loader = self.loader
            _watch()
        except Exception:  # noqa: BLE001, S110 - _watch never raises; belt and braces
            pass

    def __getattr__(self, name):  # type: (str) -> Any
        return getattr(self.loader, name)


def _chain():  # type: () -> None
    """Run the ``sitecustomize`` that would have run without this one.

    Its errors propagate, so that ``site`` reports them exactly as it would
    have ("Error in sitecustomize; set PYTHONVERBOSE for traceback").
    """
    here = os.path.dirname(os.path.realpath(__file__))
    rest = [p for p in sys.path if os.path.realpath(p or os.curdir) != here]
    try:
        from importlib.machinery import PathFinder
        from importlib.util import module_from_spec
    except ImportError:  # Python 2
        imp = __import__("imp")
        try:
            found = imp.find_module("sitecustomize", rest)
        except ImportError:
            return
        try:
            imp.load_module("sitecustomize", *found)
        finally:
            if found[0] is not None:
                found[0].close()
        return
    spec = PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = module_from_spec(spec)
    sys.modules["sitecustomize"] = module  # it is the sitecustomize now, as it would have been
    spec.loader.exec_module(module)


# Only as the interpreter's sitecustomize: a tool that imports every module
# of the package (as asyncwatch._bootstrap.sitecustomize) must not run the
# hidden one a second time.  Not under asyncwatch run (a PYTHONPATH copied
# elsewhere), or a Python asyncwatch cannot run on: nothing to do but chain.
if __name__ == "sitecustomize":
    if os.environ.get("ASYNCWATCH_RUN") and sys.version_info >= (3, 11):
        if "asyncio" in sys.modules:  # imported already (by a .pth file)
            _watch()
        else:
            sys.meta_path.insert(0, _WatchAfterAsyncio())
    _chain()
