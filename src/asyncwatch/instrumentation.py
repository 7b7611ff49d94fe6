"""asyncwatch as an OpenTelemetry instrumentation.

``opentelemetry-instrument python app.py`` finds `AsyncwatchInstrumentor`
through the ``opentelemetry_instrumentor`` entry point and turns asyncwatch
on before the application runs; in code::

    from asyncwatch.instrumentation import AsyncwatchInstrumentor

    AsyncwatchInstrumentor().instrument(tracer_provider=provider, spans="all")

Needs the ``opentelemetry-instrumentation`` package (not a dependency of
asyncwatch: only this module uses it).

Instrumenting is asking for telemetry, as ``asyncwatch run --otlp`` is: spans
default to ``"notable"`` and metrics to on, unless an argument or the
``ASYNCWATCH_SPANS`` / ``ASYNCWATCH_METRICS`` variable says otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from typing import Any

try:
    from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - tested in a subprocess without the package
    raise ImportError(
        "asyncwatch.instrumentation needs the opentelemetry-instrumentation package; "
        "install it with: pip install opentelemetry-instrumentation"
    ) from exc

from ._core.settings import ENV_VARS, Settings, metrics_exported
from ._install import Installation, install

__all__ = ["AsyncwatchInstrumentor"]

_OPTIONS = frozenset(Settings.__dataclass_fields__)
#: What instrumenting turns on unless told otherwise (the ``--otlp`` defaults).
_TELEMETRY_DEFAULTS = {"spans": "notable", "metrics": True}


class AsyncwatchInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Install asyncwatch (`instrument`) and remove it (`uninstrument`).

    `instrument` takes ``tracer_provider=``, ``meter_provider=`` and any
    option of `asyncwatch.install` (``spans="all"``, ``slow_callback_ms=50``
    ...); other keyword arguments that OpenTelemetry's auto-instrumentation
    passes to every instrumentor are ignored.  Both calls are idempotent.
    """

    _installation: Installation | None = None

    def instrumentation_dependencies(self) -> Collection[str]:
        """Return nothing: asyncio is part of Python."""
        return ()

    def _instrument(self, **kwargs: Any) -> None:
        options = {name: value for name, value in kwargs.items() if name in _OPTIONS}
        for name, value in _TELEMETRY_DEFAULTS.items():
            if name not in options and ENV_VARS[name] not in os.environ:
                options[name] = value if name != "metrics" else metrics_exported(os.environ)
        self._installation = install(
            tracer_provider=kwargs.get("tracer_provider"),
            meter_provider=kwargs.get("meter_provider"),
            **options,
        )

    def _uninstrument(self, **kwargs: Any) -> None:
        installation, self._installation = self._installation, None
        if installation is not None:
            installation.uninstall()
