"""Cog's HTTP protocol (Replicate's hosted predictions), with the inputs of Replicate's Stable Diffusion
inpainting models.

- ``POST /predictions {"id"?, "input": {...}}``: synchronous (200 once finished), or with
  ``Prefer: respond-async`` 202 at once; poll ``GET /predictions/{id}``
- ``POST /predictions/{id}/cancel``; ``GET /health-check``; the OpenAPI document at ``/openapi.json``

A prediction is ``{id, status, input, output, error, logs, metrics: {predict_time}, created_at, started_at,
completed_at}``; ``output`` is a list of PNG data URIs (Cog's form when it has nowhere to upload files); status
``starting`` (queued), ``processing``, ``succeeded``, ``failed``, ``canceled``. Webhooks are not sent (the
server makes no outgoing connections).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ldm_inpaint.options import RANDOM_SEED, InpaintOptions
from ldm_inpaint.serving.handling import data_uri, find, finished, prepared, submit, worker_of
from ldm_inpaint.serving.inputs import ApiError, decode, run_for
from ldm_inpaint.serving.jobs import CANCELED, FAILED, PROCESSING, QUEUED, SUCCEEDED, Job

router = APIRouter()
DEFAULTS = InpaintOptions()
# Replicate's scheduler names -> (our sampler, eta). PNDM as diffusers runs it for Stable Diffusion
# (skip_prk_steps) is the PLMS of the original repository.
SCHEDULERS: dict[str, tuple[str, float]] = {
    "DDIM": ("ddim", 0.0),
    "K_EULER": ("euler", 0.0),
    "K_EULER_ANCESTRAL": ("euler_ancestral", 1.0),
    "DPMSolverMultistep": ("dpmpp_2m", 0.0),
    "PNDM": ("plms", 0.0),
}
STATUS = {
    QUEUED: "starting",
    PROCESSING: "processing",
    SUCCEEDED: "succeeded",
    FAILED: "failed",
    CANCELED: "canceled",
}


class CogInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field("", description="text prompt")
    negative_prompt: str | None = Field(None, description="what not to draw")
    image: str = Field(description="the image to inpaint: a data URI or base64")
    mask: str = Field(description="the mask, white = inpaint: a data URI or base64")
    width: int | None = Field(
        None, ge=64, le=1024, multiple_of=64, description="output width (default: the input's)"
    )
    height: int | None = Field(
        None, ge=64, le=1024, multiple_of=64, description="output height (default: the input's)"
    )
    num_outputs: int = Field(1, ge=1, le=4, description="images to generate")
    num_inference_steps: int = Field(DEFAULTS.steps, ge=1, le=500, description="denoising steps")
    guidance_scale: float = Field(
        DEFAULTS.guidance_scale, ge=1, le=20, description="classifier-free guidance scale"
    )
    scheduler: Literal["DDIM", "K_EULER", "K_EULER_ANCESTRAL", "DPMSolverMultistep", "PNDM"] = "DDIM"
    seed: int | None = Field(None, description="random seed; leave blank to randomize")

    def options(self) -> InpaintOptions:
        sampler, eta = SCHEDULERS[self.scheduler]
        return InpaintOptions(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt or "",
            sampler=sampler,
            eta=eta,
            steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            seed=RANDOM_SEED if self.seed is None else self.seed,
            n_samples=self.num_outputs,
            height=self.height,
            width=self.width,
        )


class PredictionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, description="the prediction's id (default: a new one)")
    input: CogInput
    webhook: str | None = None
    webhook_events_filter: list[str] | None = None
    output_file_prefix: str | None = None


def _time(stamp: float | None) -> str | None:
    return None if stamp is None else datetime.fromtimestamp(stamp, timezone.utc).isoformat()


def prediction(job: Job) -> dict[str, Any]:
    done = job.status == SUCCEEDED
    return {
        "id": job.id,
        "status": STATUS[job.status],
        "input": job.request,
        "output": [data_uri(output.png) for output in job.outputs] if done else None,
        "error": job.error,
        "logs": "\n".join(job.notes),
        "metrics": {} if job.predict_time is None else {"predict_time": job.predict_time},
        "created_at": _time(job.created),
        "started_at": _time(job.started),
        "completed_at": _time(job.finished),
    }


@router.post("/predictions")
async def predict(
    body: PredictionRequest, request: Request, prefer: str | None = Header(None)
) -> JSONResponse:
    if body.webhook or body.output_file_prefix:
        raise ApiError(
            422,
            "webhook / output_file_prefix: this server sends no webhooks and uploads nowhere; "
            "leave them out and poll GET /predictions/{id} (with Prefer: respond-async)",
        )
    cog = body.input

    def build(worker, limits):
        image, mask = decode(cog.image, "input.image", limits), decode(cog.mask, "input.mask", limits)
        return [run_for(worker, image, mask, cog.options())]

    job = submit(request, await prepared(request, build), body.id)
    job.request = cog.model_dump(exclude={"image", "mask"}) | {"seed": job.runs[0].options.seed}
    if prefer and "respond-async" in prefer.lower():
        return JSONResponse(prediction(job), status_code=202)
    return JSONResponse(prediction(await finished(request, job)))


@router.get("/predictions/{prediction_id}")
async def get_prediction(prediction_id: str, request: Request) -> dict[str, Any]:
    return prediction(find(request, prediction_id))


@router.post("/predictions/{prediction_id}/cancel")
async def cancel_prediction(prediction_id: str, request: Request) -> dict[str, Any]:
    find(request, prediction_id)
    return prediction(worker_of(request).cancel(prediction_id))


@router.get("/health-check")
async def health_check(request: Request) -> dict[str, Any]:
    worker = worker_of(request)
    if worker.load_error:
        status, setup = "SETUP_FAILED", "failed"
    elif not worker.ready:
        status, setup = "STARTING", "starting"
    else:
        status, setup = ("BUSY" if worker.queue_full() else "READY"), "succeeded"
    return {"status": status, "setup": {"status": setup, "logs": worker.load_error or ""}}
