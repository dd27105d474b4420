"""The FastAPI application: one worker that owns the model (:mod:`~ldm_inpaint.serving.jobs`), the four
protocols' routes (own, Cog, Azure ML, AUTOMATIC1111), the web page, and two guards in front of everything:

- a body limit: a request whose body is larger than ``max_body_bytes`` gets 413 before it is read (declared
  length) or as soon as it passes the limit (chunked uploads);
- with an API key, ``Authorization: Bearer KEY`` on every route but the health checks and the page's static
  files (which hold no data; the page asks for the key and sends it with its own requests).

Errors are JSON ``{"detail": "<one line>"}`` with the status that fits; nothing a request does can stop the
server or reach a file outside ``--outdir``.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ldm_inpaint import __version__
from ldm_inpaint.serving import a1111, azure, cog, own
from ldm_inpaint.serving.cli import DEFAULT_MAX_PIXELS
from ldm_inpaint.serving.inputs import ApiError, Limits
from ldm_inpaint.serving.jobs import Model, Worker

STATIC = Path(__file__).parent / "static"
OPEN_PATHS = ("/", "/livez", "/readyz", "/health-check", "/favicon.ico")


@dataclass(frozen=True)
class ServerSettings:
    """How the server runs (what the ``serve`` command line gives)."""

    max_queue: int = 8
    job_timeout: float = 600.0
    api_key: str | None = None
    allow_urls: bool = False
    outdir: Path | None = None
    max_body_bytes: int = 64 << 20
    max_pixels: int = DEFAULT_MAX_PIXELS
    keep_jobs: int = 100


def create_app(load: Callable[[], Model], settings: ServerSettings) -> FastAPI:
    """The application around a worker that calls ``load`` once, on its own thread, at start-up."""
    worker = Worker(
        load,
        max_queue=settings.max_queue,
        job_timeout=settings.job_timeout,
        outdir=settings.outdir,
        keep=settings.keep_jobs,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.close()

    app = FastAPI(
        title="ldm-inpaint",
        version=__version__,
        description="Latent-diffusion inpainting (SD 1.5 / SD 2 inpainting) over Cog, Azure ML and "
        "AUTOMATIC1111 protocols, and its own",
        lifespan=lifespan,
    )
    app.state.worker = worker
    app.state.limits = Limits(settings.max_body_bytes, settings.max_pixels, settings.allow_urls)
    for protocol in (own, cog, azure, a1111):
        app.include_router(protocol.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse({"detail": error.message}, status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(part) for part in problem['loc'][1:]) or 'body'}: {problem['msg']}"
            for problem in error.errors()
        ]
        return JSONResponse({"detail": "; ".join(problems)}, status_code=422)

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(BearerAuth, key=settings.api_key)
    return app


@contextmanager
def in_background(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """``app`` on uvicorn in a thread of this process (port 0: a free one); yields its base URL and stops it
    afterwards. For tests, benchmarks and notebooks; ``ldm-inpaint serve`` runs uvicorn in the foreground."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="ldm-inpaint-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


async def _reply(send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = JSONResponse({"detail": message}).body
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            + list(headers),
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """413 for a request body over ``max_bytes``: by its declared length, or, for a chunked body (no length
    declared), once the chunks read pass it; a chunked body is read here first and handed on whole."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body: expected at most {self.max_bytes:,} bytes (the server's --max-body-mb)"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                return await _reply(send, 413, message)
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            incoming = await receive()
            chunks.append(incoming)
            size += len(incoming.get("body", b""))
            if size > self.max_bytes:
                return await _reply(send, 413, message)
            if incoming["type"] != "http.request" or not incoming.get("more_body", False):
                break

        async def replay() -> Message:
            return chunks.pop(0) if chunks else await receive()

        await self.app(scope, replay, send)


class BearerAuth:
    """``Authorization: Bearer KEY`` required on every route but :data:`OPEN_PATHS` and the static files."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in OPEN_PATHS or path.startswith("/static/"):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            found = (
                "none"
                if not given
                else "a different key"
                if scheme.lower() == b"bearer"
                else "another scheme"
            )
            await _reply(
                send,
                401,
                f"expected the header Authorization: Bearer <the server's --api-key>, found {found}",
                [(b"www-authenticate", b"Bearer")],
            )
            return
        await self.app(scope, receive, send)
