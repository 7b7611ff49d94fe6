"""OpenTelemetry output: names, task spans, findings on spans, metrics, OTLP setup."""
