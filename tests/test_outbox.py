"""The slow-callback watchdog's findings are reported by a thread of their
own (`outbox`): a report's writes let the GIL go, and from the watchdog, in
the middle of its looks, they let a loop that runs steps holding the GIL
back to back run some unseen."""

from __future__ import annotations

import threading

import pytest

from asyncwatch._core.findings import Finding, FindingKind
from asyncwatch._detectors import outbox as outbox_module
from asyncwatch._detectors.outbox import Outbox


def finding(n: int) -> Finding:
    return Finding(kind=FindingKind.SLOW_CALLBACK, message=f"stall {n}", site=None)


class Reports(list):
    """What was reported, by which thread, and an event set on each report."""

    def __init__(self) -> None:
        super().__init__()
        self.came = threading.Event()

    def __call__(self, found: Finding) -> None:
        self.append((found.message, threading.get_ident()))
        self.came.set()


@pytest.fixture
def outbox():
    box = Outbox()
    box.start()
    yield box
    box.stop()


def test_a_finding_queued_while_a_loop_is_in_a_step_waits_for_a_quiet_moment(outbox):
    reports = Reports()
    outbox.put(reports, finding(1), now=10.0)
    outbox.send(now=10.1, quiet=False)
    assert outbox.since == 10.0  # held back: the thread was not woken
    assert reports == []
    outbox.send(now=10.2, quiet=True)
    assert reports.came.wait(30)
    assert reports == [("stall 1", reports[0][1])]
    assert reports[0][1] != threading.get_ident()  # the outbox's thread reported it
    assert outbox.since is None


def test_a_finding_held_back_goes_out_after_hold_s_even_if_the_loops_stay_busy(outbox):
    reports = Reports()
    outbox.put(reports, finding(1), now=10.0)
    outbox.send(now=10.0 + Outbox.HOLD_S, quiet=False)
    assert reports.came.wait(30)
    assert [message for message, _ in reports] == ["stall 1"]


def test_drain_reports_everything_queued_in_order_on_the_calling_thread():
    box = Outbox()  # no thread: only a drain reports
    reports = Reports()
    for n in range(3):
        box.put(reports, finding(n), now=float(n))
    box.drain()
    assert reports == [(f"stall {n}", threading.get_ident()) for n in range(3)]
    assert box.since is None
    box.drain()
    assert len(reports) == 3  # each one once


def test_a_failing_reporter_is_contained_and_the_next_finding_still_goes_out(monkeypatch):
    errors = []
    monkeypatch.setattr(outbox_module, "report_internal_error", lambda where, exc: errors.append((where, exc)))
    box = Outbox()
    reports = Reports()

    def broken(found: Finding) -> None:
        raise ValueError("the log is gone")

    box.put(broken, finding(1), now=1.0)
    box.put(reports, finding(2), now=1.0)
    box.drain()
    assert [message for message, _ in reports] == ["stall 2"]
    [(where, exc)] = errors
    assert where == "slow-callback report" and str(exc) == "the log is gone"


def test_stop_reports_what_is_left_and_ends_the_thread():
    box = Outbox()
    box.start()
    thread = box._thread
    assert thread is not None and thread.is_alive()
    reports = Reports()
    box.put(reports, finding(1), now=1.0)  # never sent: the loops stayed busy
    box.stop()
    assert [message for message, _ in reports] == ["stall 1"]
    thread.join(30)
    assert not thread.is_alive()
