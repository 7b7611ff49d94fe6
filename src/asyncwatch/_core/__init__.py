"""The core: findings, frames, runtime, settings, the detector interface and tasks.

Imports only the standard library and structlog (a test says so).
"""
