"""The server's own routes: jobs described by the one options object itself, their event stream, and the
health checks.

- ``POST /v1/jobs`` ``{"image", "mask", "invert_mask", "options": {<InpaintOptions fields>}}`` -> 202, the job
- ``GET /v1/jobs/{id}``; ``DELETE /v1/jobs/{id}`` (cancel); ``GET /v1/jobs/{id}/images/{n}.png``
- ``GET /v1/jobs/{id}/events``: server-sent events ``queued`` (position), ``progress`` (step, total, preview as
  a data URI), then one ``done`` (the job, as ``GET /v1/jobs/{id}`` gives it)
- ``GET /v1/options``: every option with its default, help and choices (what the web page offers)
- ``GET /livez`` (the process answers), ``GET /readyz`` (503 until the model is loaded)
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import asdict, fields
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ldm_inpaint.options import InpaintOptions
from ldm_inpaint.serving.handling import (
    Watch,
    data_uri,
    find,
    prepared,
    preview_png,
    submit,
    worker_of,
)
from ldm_inpaint.serving.inputs import ApiError, decode, inverted, parse_options, run_for
from ldm_inpaint.serving.jobs import FINISHED, QUEUED, Job, Worker

router = APIRouter()


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(None, description="the image: base64 or a data: URI")
    mask: str | None = Field(None, description="the mask (white = repaint): base64 or a data: URI")
    invert_mask: bool = Field(False, description="repaint where the mask is black instead")
    options: dict[str, Any] = Field(
        default_factory=dict, description="InpaintOptions fields (GET /v1/options)"
    )


def describe(job: Job, worker: Worker) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": job.status,
        "position": worker.position(job),
        "step": job.step,
        "total": job.total,
        "error": job.error,
        "notes": job.notes,
        "created": job.created,
        "started": job.started,
        "finished": job.finished,
        "outputs": [
            {
                "url": f"/v1/jobs/{job.id}/images/{index}.png",
                "seed": output.options.seed,
                "infotext": output.infotext,
                "options": asdict(output.options),
            }
            for index, output in enumerate(job.outputs)
        ],
    }


@router.post("/v1/jobs", status_code=202)
async def create_job(body: JobRequest, request: Request) -> dict[str, Any]:
    def build(worker, limits):
        image, mask = decode(body.image, "image", limits), decode(body.mask, "mask", limits)
        if mask is not None and body.invert_mask:
            mask = inverted(mask)
        return [run_for(worker, image, mask, parse_options(body.options))]

    job = submit(request, await prepared(request, build))
    return describe(job, worker_of(request))


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> dict[str, Any]:
    return describe(find(request, job_id), worker_of(request))


@router.delete("/v1/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request) -> dict[str, Any]:
    find(request, job_id)
    return describe(worker_of(request).cancel(job_id), worker_of(request))


@router.get("/v1/jobs/{job_id}/images/{index}.png")
async def job_image(job_id: str, index: int, request: Request) -> Response:
    job = find(request, job_id)
    if not 0 <= index < len(job.outputs):
        raise ApiError(
            404, f"job {job_id!r} has {len(job.outputs)} image(s), found a request for image {index}"
        )
    return Response(job.outputs[index].png, media_type="image/png")


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


@router.get("/v1/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request) -> StreamingResponse:
    job, worker = find(request, job_id), worker_of(request)

    async def stream() -> AsyncIterator[str]:
        # Starlette ends this generator when the client disconnects.
        last = None
        with Watch(job) as watch:
            while True:
                state = (job.version, worker.position(job))
                if state != last:
                    last = state
                    if job.status in FINISHED:
                        yield _event("done", describe(job, worker))
                        return
                    if job.status == QUEUED:
                        yield _event("queued", {"position": state[1]})
                    else:
                        preview = preview_png(job)
                        yield _event(
                            "progress",
                            {"step": job.step, "total": job.total, "preview": preview and data_uri(preview)},
                        )
                # a queued job's position moves without a change of its own: look again every second
                await watch.change(timeout=1.0 if job.status == QUEUED else None)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


@router.get("/v1/options")
async def option_fields() -> dict[str, Any]:
    defaults = InpaintOptions()
    return {
        option.name: {
            "default": getattr(defaults, option.name),
            "help": option.metadata["help"],
            "choices": list(option.metadata["choices"]),
        }
        for option in fields(InpaintOptions)
    }


@router.get("/livez")
async def livez() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    worker = worker_of(request)
    body = {"ready": worker.ready, "queued": worker.queued(), "error": worker.load_error}
    return JSONResponse(body, status_code=200 if worker.ready else 503)
