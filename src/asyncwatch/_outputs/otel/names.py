"""OpenTelemetry names: spans, events, attributes and instruments in one place.

They are part of what users query in their tracing backend: they change only
on purpose (see the README's tables).
"""

from __future__ import annotations

from typing import Any

from ..._core.findings import Finding, Site
from ..._core.frames import site_text

SCOPE = "asyncwatch"

#: What to run when the ``otlp`` extra is missing.
INSTALL_OTLP = "pip install 'asyncwatch[otlp]'"

# --- names: span, event, attribute and instrument names in one place -------

SPAN_PREFIX = "asyncio.task "
FINDING_SPAN_PREFIX = "asyncwatch "
FINDING_EVENT_PREFIX = "asyncwatch."

ATTR_TASK_NAME = "asyncio.task.name"
ATTR_TASK_STATE = "asyncio.task.state"
ATTR_SCHEDULING_DELAY = "asyncio.task.scheduling_delay"
ATTR_STEPS = "asyncio.task.steps"
ATTR_BUSY_TIME = "asyncio.task.busy_time"
ATTR_CANCEL_MESSAGE = "asyncio.task.cancel_message"
ATTR_CODE_FUNCTION = "code.function.name"
ATTR_CODE_FILE = "code.file.path"
ATTR_CODE_LINE = "code.line.number"
ATTR_FINDING_KIND = "asyncwatch.finding.kind"
ATTR_FINDING_MESSAGE = "asyncwatch.finding.message"
ATTR_FINDING_DURATION = "asyncwatch.finding.duration"
ATTR_FINDING_CANCELLED_BY = "asyncwatch.finding.cancelled_by"
ATTR_FINDING_SWALLOWED_AT = "asyncwatch.finding.swallowed_at"
ATTR_FINDING_TASK = "asyncwatch.finding.task"
#: On every span that holds a finding (an event on a task's span, or a
#: finding's own short span): what to search a backend for.
ATTR_HAS_FINDINGS = "asyncwatch.has_findings"
#: OpenTelemetry's semantic convention for the thread's name.
ATTR_THREAD_NAME = "thread.name"

EVENT_CANCEL_REQUESTED = "asyncio.task.cancel_requested"

STATE_FINISHED = "finished"
STATE_CANCELLED = "cancelled"
STATE_EXCEPTION = "exception"
#: A task garbage-collected while pending (see ``task_destroyed_pending``).
STATE_DESTROYED = "destroyed_pending"
STATES = (STATE_FINISHED, STATE_CANCELLED, STATE_EXCEPTION, STATE_DESTROYED)

METRIC_LOOP_LAG = "asyncio.event_loop.lag"
METRIC_TASKS_CREATED = "asyncio.task.created"
METRIC_TASKS_FINISHED = "asyncio.task.finished"
METRIC_TASKS_ALIVE = "asyncio.task.count"
METRIC_FINDINGS = "asyncwatch.findings"


def site_attributes(site: Site | None) -> dict[str, Any]:
    """The ``code.*`` attributes of *site*."""
    if site is None:
        return {}
    return {ATTR_CODE_FUNCTION: site.function, ATTR_CODE_FILE: site.file, ATTR_CODE_LINE: site.line}


def finding_ns(finding: Finding) -> int:
    """When *finding* was made, in nanoseconds since the epoch."""
    return int(finding.time.timestamp() * 1e9)


def finding_attributes(finding: Finding) -> dict[str, Any]:
    """A finding as the attributes of its span event (or short span)."""
    attributes: dict[str, Any] = {
        ATTR_FINDING_KIND: finding.kind.value,
        ATTR_FINDING_MESSAGE: finding.message,
        **site_attributes(finding.site),
    }
    if finding.duration_s is not None:
        attributes[ATTR_FINDING_DURATION] = round(finding.duration_s, 6)
    if finding.cancelled_by is not None:
        attributes[ATTR_FINDING_CANCELLED_BY] = site_text(finding.cancelled_by)
    if finding.swallowed_at is not None:
        attributes[ATTR_FINDING_SWALLOWED_AT] = site_text(finding.swallowed_at)
    if finding.task is not None:
        attributes[ATTR_FINDING_TASK] = finding.task
    if finding.thread is not None:
        attributes[ATTR_THREAD_NAME] = finding.thread
    return attributes
