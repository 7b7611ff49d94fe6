"""Ending by a signal as plain ``python`` would, with the findings saved first.

SIGTERM and SIGHUP kill a Python process that keeps their default
disposition at once: no ``finally``, no ``atexit``.  Under ``asyncwatch run``
that would lose what the findings file had queued, the summary and the
children's findings, so `SignalExit` catches them while (and only while) the
program leaves them at the default: it saves what asyncwatch owes, puts the
default back and sends the same signal again, and the process dies by it,
exactly as it would have (the parent shell, systemd or Kubernetes sees the
same wait status).  A program that sets its own handler replaces ours and
keeps its behaviour; one that restores the handler it found (uvicorn does,
then re-raises the signal after its graceful shutdown) gets ours back.

SIGINT keeps Python's own handler: the program gets ``KeyboardInterrupt``
as always, and if it escapes, `die_by` ends the process by SIGINT after
the exit work, as CPython does (``exit_sigint`` in Modules/main.c), instead
of exiting with status 130.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

from ._core.runtime import emitting

__all__ = ["CAUGHT", "SignalExit", "die_by"]

#: The signals whose default disposition ends the process without running Python code.
CAUGHT: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
)

#: How long the work before dying may take; a signal that asks a process to
#: stop must stop it (docker stop sends SIGKILL after 10 s).
FINISH_TIMEOUT_S = 5.0


class SignalExit:
    """Catch `CAUGHT` signals left at their default, run *finish(signum)*, die by the signal.

    *finish* runs in a short-lived thread that the handler waits for (at
    most `FINISH_TIMEOUT_S`): the handler runs on the main thread between
    two bytecodes of the program, which may hold a lock *finish* needs.
    """

    def __init__(self, finish: Callable[[int], None]) -> None:
        self._finish = finish
        self._installed: list[signal.Signals] = []

    def install(self) -> None:
        """Catch the signals that are at their default now (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in CAUGHT:
            try:
                if signal.getsignal(signum) is signal.SIG_DFL:
                    signal.signal(signum, self._handle)
                    self._installed.append(signum)
            except (OSError, ValueError):  # not settable here
                pass

    def uninstall(self) -> None:
        """Put back the default where the handler is still ours (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in self._installed:
            try:
                if signal.getsignal(signum) == self._handle:
                    signal.signal(signum, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
        self._installed = []

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame  # never keep the program's frame
        self.uninstall()  # a second signal now kills at once, as it would have
        thread = threading.get_ident()
        if emitting(thread):
            # The signal landed while this thread was handing a finding to
            # the reporters: let it complete (the summary and the file must
            # have it), and finish and die from a thread once it has.
            threading.Thread(
                target=self._finish_when_reported, args=(signum, thread), name="asyncwatch-exit", daemon=True
            ).start()
            return
        worker = threading.Thread(target=self._run_finish, args=(signum,), name="asyncwatch-exit", daemon=True)
        worker.start()
        worker.join(FINISH_TIMEOUT_S)
        die_by(signum)

    def _finish_when_reported(self, signum: int, thread: int) -> None:
        deadline = time.monotonic() + FINISH_TIMEOUT_S
        while emitting(thread) and time.monotonic() < deadline:
            time.sleep(0.001)
        self._run_finish(signum)
        die_by(signum)

    def _run_finish(self, signum: int) -> None:
        try:
            self._finish(signum)
        except Exception as exc:  # dying by the signal matters more than the summary
            with contextlib.suppress(OSError):
                os.write(2, f"asyncwatch: could not finish before the signal: {type(exc).__name__}: {exc}\n".encode())


def die_by(signum: int) -> None:
    """End this process by *signum* with its default disposition, as CPython does."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:  # a closed or broken stream: the signal still ends us
            pass
    try:
        signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
    except (OSError, ValueError, AttributeError):
        pass
    signal.raise_signal(signum)  # to this thread: delivered before it returns
    # Not fatal after all (a blocked or ignored signal): end as a shell reports a signal death.
    os._exit(128 + signum)
