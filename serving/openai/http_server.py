"""uvicorn inside the server's own event loop, beside grpc.aio.

The socket is bound here (so a port in use is an ``OSError`` at start-up and
port 0 reports the port it got) and handed to ``uvicorn.Server.serve``, which
runs as a task of the same loop as the gRPC server. uvicorn's own signal
handling is switched off: the ``InferenceServer`` owns SIGTERM/SIGINT and drains
both front ends; lifespan events are off (the engine's life is the server's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Generator
from typing import Any

import uvicorn

from serving.auth import TlsFiles

log = logging.getLogger("energon.serving")


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:  # the InferenceServer handles signals
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port} for HTTP (in use, or not an address of this host)") from e
    sock.setblocking(False)
    return sock


class HttpFrontEnd:
    """One uvicorn server over ``app``; ``start`` binds and serves, ``stop`` closes."""

    def __init__(self, app: Any, host: str, port: int, tls: TlsFiles | None = None) -> None:
        kwargs: dict[str, Any] = {}
        if tls is not None:
            for name in ("cert", "key", "client_ca"):
                path = getattr(tls, name)
                if path is not None and not path.is_file():
                    raise ValueError(f"TLS {name} file {str(path)!r} does not exist")
            kwargs = dict(ssl_certfile=str(tls.cert), ssl_keyfile=str(tls.key))
            if tls.client_ca is not None:
                kwargs.update(ssl_ca_certs=str(tls.client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(
            app, lifespan="off", log_level="warning", access_log=False, timeout_graceful_shutdown=1,
            server_header=False, **kwargs,
        )  # fmt: skip
        config.load()  # a bad certificate fails here, at start-up
        self._server = _Uvicorn(config)
        self._sock = _bind(host, port)
        self.port: int = self._sock.getsockname()[1]
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.01)

    async def stop(self, timeout_s: float = 5.0) -> None:
        if self._task is None:
            self._sock.close()
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
        except TimeoutError:
            self._server.force_exit = True
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        except Exception as e:  # noqa: BLE001 - closing must not hide the server's own exit code
            log.debug("HTTP server stopped with %r", e)
        self._sock.close()
