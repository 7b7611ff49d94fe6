"""Outputs: where findings go (the pipeline, structlog, JSON Lines, OpenTelemetry)."""
