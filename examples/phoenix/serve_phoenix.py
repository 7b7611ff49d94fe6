"""Start Arize Phoenix, a trace UI with an OTLP/HTTP receiver, on this machine only.

    python examples/phoenix/serve_phoenix.py        # in Phoenix's own virtual environment

Phoenix (``pip install arize-phoenix``) takes OTLP/HTTP at
http://127.0.0.1:6006/v1/traces and serves its UI on the same port.  By
default its HTTP server listens on every interface and its gRPC receiver on
``[::]:4317``; this launcher keeps both on 127.0.0.1 (``PHOENIX_HOST``, and
the gRPC server's addresses rewritten before Phoenix adds them), so that
trying the example publishes nothing to the network.  It also keeps Phoenix
from reaching out on its own (``PHOENIX_ALLOW_EXTERNAL_RESOURCES=false``: no
web fonts, usage telemetry or sandbox download; offline, those fail with
tracebacks in the log) and from printing every SQL statement of its first
start's database migration (``PHOENIX_LOG_MIGRATIONS=false``).  Each is a
default: set the variable to have it otherwise.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("PHOENIX_HOST", "127.0.0.1")
os.environ.setdefault("PHOENIX_ALLOW_EXTERNAL_RESOURCES", "false")
os.environ.setdefault("PHOENIX_LOG_MIGRATIONS", "false")

import grpc.aio._server  # patched below, before Phoenix makes its receiver

_add_insecure_port = grpc.aio._server.Server.add_insecure_port


def _on_loopback(self: grpc.aio._server.Server, address: str) -> int:
    """Bind the gRPC receiver to 127.0.0.1 on the port Phoenix asked for."""
    port = address.rsplit(":", 1)[-1]
    return _add_insecure_port(self, f"127.0.0.1:{port}")


grpc.aio._server.Server.add_insecure_port = _on_loopback  # type: ignore[method-assign]

from phoenix.server.main import main  # noqa: E402

if __name__ == "__main__":
    sys.argv = ["phoenix", "serve"]
    main()
