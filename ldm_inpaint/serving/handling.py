"""What every route does with a job, whatever protocol it speaks: decode the inputs off the event loop, queue
the job (503 until the model is ready, 429 with ``Retry-After`` when the queue is full, 409 for a taken id),
wait for it while watching the connection (a client that goes away cancels its job), and show its images and
its preview."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Callable
from typing import TypeVar

from fastapi import Request
from PIL import Image
from starlette.concurrency import run_in_threadpool

from ldm_inpaint.preview import latent_to_rgb
from ldm_inpaint.serving.inputs import ApiError, Limits
from ldm_inpaint.serving.jobs import FINISHED, Job, JobIdTaken, NotReady, QueueFull, Run, Worker

T = TypeVar("T")


def worker_of(request: Request) -> Worker:
    return request.app.state.worker


def limits_of(request: Request) -> Limits:
    return request.app.state.limits


async def off_loop(function: Callable[..., T], *args: object) -> T:
    """``function(*args)`` on a thread (image decoding), so the event loop keeps answering."""
    return await run_in_threadpool(function, *args)


async def prepared(request: Request, build: Callable[[Worker, Limits], list[Run]]) -> list[Run]:
    """The runs ``build`` makes of a request (decoding and validating on a thread); 503 before the model is
    ready, as nothing can be validated against it then."""
    worker = worker_of(request)
    if not worker.ready:
        raise not_ready(worker)
    return await off_loop(build, worker, limits_of(request))


def submit(request: Request, runs: list[Run], job_id: str | None = None) -> Job:
    worker = worker_of(request)
    try:
        return worker.submit(runs, job_id)
    except NotReady:
        raise not_ready(worker) from None
    except QueueFull as full:
        raise ApiError(
            429,
            f"the queue is full ({worker.max_queue} jobs waiting): retry in {full.retry_after} s",
            {"Retry-After": str(full.retry_after)},
        ) from None
    except JobIdTaken as error:
        raise ApiError(409, str(error)) from None


def not_ready(worker: Worker) -> ApiError:
    if worker.load_error:
        return ApiError(503, worker.load_error)
    return ApiError(503, "the model is still loading: retry shortly", {"Retry-After": "5"})


class Watch:
    """``with Watch(job) as watch: await watch.change()``: wait on the event loop until ``job`` changes (a step,
    a status), woken by the worker thread, with no polling."""

    def __init__(self, job: Job) -> None:
        self.job, self.event = job, asyncio.Event()
        loop = asyncio.get_running_loop()
        self.listener = lambda: loop.call_soon_threadsafe(self.event.set)

    def __enter__(self) -> Watch:
        self.job.listeners.add(self.listener)
        return self

    def __exit__(self, *exc: object) -> None:
        self.job.listeners.discard(self.listener)

    async def change(self, timeout: float | None = None) -> None:
        """Until the next change (or ``timeout`` seconds)."""
        try:
            await asyncio.wait_for(self.event.wait(), timeout)
        except asyncio.TimeoutError:
            return
        self.event.clear()


async def disconnected(request: Request) -> None:
    """Returns when the client closes the connection (its body already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def finished(request: Request, job: Job) -> Job:
    """``job`` once finished; if the client disconnects first, its job is cancelled."""
    with Watch(job) as watch:
        gone = asyncio.ensure_future(disconnected(request))
        try:
            while job.status not in FINISHED:
                change = asyncio.ensure_future(watch.change())
                await asyncio.wait({gone, change}, return_when=asyncio.FIRST_COMPLETED)
                change.cancel()
                if gone.done():
                    worker_of(request).cancel(job.id, "the client disconnected")
                    break
        finally:
            gone.cancel()
    return job


def find(request: Request, job_id: str) -> Job:
    job = worker_of(request).get(job_id)
    if job is None:
        raise ApiError(404, f"no job {job_id!r}: unknown, or finished long enough ago to be forgotten")
    return job


def base64_png(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64_png(png)


def preview_png(job: Job) -> bytes | None:
    """The latest step's x0 prediction as a small PNG (the latent's cheap RGB map, 1/8 size), if any."""
    latent = job.preview
    if latent is None:
        return None
    buffer = io.BytesIO()
    Image.fromarray(latent_to_rgb(latent)[0].numpy()).save(buffer, format="PNG")
    return buffer.getvalue()
