"""The subset of AUTOMATIC1111's web API that editor plug-ins (Krita, Photoshop, GIMP) use for inpainting.

- ``POST /sdapi/v1/img2img`` -> ``{images: [base64 PNG], parameters: <the request>, info: <JSON text>}``
- ``GET /sdapi/v1/progress[?id_task=ID]``; ``POST /sdapi/v1/interrupt[?id_task=ID]``
- ``GET /sdapi/v1/samplers``; ``POST /sdapi/v1/png-info``

How A1111's fields become options: ``cfg_scale`` -> guidance scale, ``denoising_strength`` -> strength,
``batch_size`` -> samples per run and ``n_iter`` -> runs (run k seeded ``seed + k * batch_size``), ``sampler_name``
by :data:`~ldm_inpaint.serving.infotext.A1111_SAMPLERS`; A1111 always pastes the original back outside the
mask, so ``mask_blur`` is the paste-back edge's sigma with paste-back on; ``inpaint_full_res`` is crop-to-mask
with ``inpaint_full_res_padding``; ``inpainting_mask_invert`` swaps the mask; a mask of another size is
resized to the image, as A1111 does. Fields of A1111's request that have no meaning here (styles, face
restoration, scripts, ...) are accepted and listed in ``info["ignored"]``. ``force_task_id`` names the job, so
that the caller's ``progress`` and ``interrupt`` concern its own job (A1111's interrupt stops whatever runs).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ldm_inpaint import image_io
from ldm_inpaint.errors import LdmInpaintError
from ldm_inpaint.options import MAX_SEED, RANDOM_SEED, InpaintOptions
from ldm_inpaint.serving.handling import base64_png, find, finished, prepared, preview_png, submit, worker_of
from ldm_inpaint.serving.infotext import A1111_SAMPLERS, parse_infotext
from ldm_inpaint.serving.inputs import ApiError, decode, image_bytes, inverted, run_for
from ldm_inpaint.serving.jobs import CANCELED, FAILED, Job

router = APIRouter(prefix="/sdapi/v1")


class Img2Img(BaseModel):
    model_config = ConfigDict(extra="allow")

    init_images: list[str] = Field(min_length=1, max_length=1)
    mask: str | None = None
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 50
    cfg_scale: float = 7.0
    sampler_name: str = "DDIM"
    seed: int = RANDOM_SEED
    batch_size: int = Field(1, ge=1, le=8)
    n_iter: int = Field(1, ge=1, le=16)
    width: int | None = None
    height: int | None = None
    denoising_strength: float = 0.75
    mask_blur: float = 4.0
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = 32
    inpainting_fill: int = 1
    force_task_id: str | None = None

    def options(self) -> InpaintOptions:
        if self.sampler_name not in A1111_SAMPLERS:
            raise ApiError(
                422, f"sampler_name: expected one of {', '.join(A1111_SAMPLERS)}, found {self.sampler_name!r}"
            )
        sampler, eta = A1111_SAMPLERS[self.sampler_name]
        masked = self.mask is not None
        return InpaintOptions(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            sampler=sampler,
            eta=eta,
            steps=self.steps,
            guidance_scale=self.cfg_scale,
            strength=self.denoising_strength,
            seed=self.seed,
            n_samples=self.batch_size,
            height=self.height,
            width=self.width,
            paste_back=masked,
            mask_blur=self.mask_blur if masked else 0.0,
            crop_to_mask=self.inpaint_full_res_padding if masked and self.inpaint_full_res else None,
        )


def _runs(body: Img2Img, worker, limits) -> list:
    image = decode(body.init_images[0], "init_images[0]", limits)
    mask = decode(body.mask, "mask", limits)
    if mask is not None and body.inpainting_mask_invert:
        mask = inverted(mask)
    first = run_for(worker, image, mask, body.options(), resize_mask=True)
    seeds = [first.options.seed + k * body.batch_size for k in range(body.n_iter)]
    if seeds[-1] > MAX_SEED:
        raise ApiError(422, f"seed: expected seed + n_iter * batch_size <= {MAX_SEED}, found {seeds[-1]}")
    return [replace(first, options=replace(first.options, seed=seed)) for seed in seeds]


def _info(body: Img2Img, job: Job) -> str:
    """A1111's ``info`` (JSON text); an interrupted job (status canceled) has no images and says why."""
    return json.dumps(
        {
            "prompt": body.prompt,
            "negative_prompt": body.negative_prompt,
            "seed": job.options[0].seed,
            "all_seeds": [output.options.seed for output in job.outputs],
            "steps": body.steps,
            "cfg_scale": body.cfg_scale,
            "sampler_name": body.sampler_name,
            "denoising_strength": body.denoising_strength,
            "mask_blur": body.mask_blur,
            "infotexts": [output.infotext for output in job.outputs],
            "job_id": job.id,
            "ignored": sorted(body.model_extra or {}),
            "interrupted": job.error if job.status == CANCELED else None,
        }
    )


@router.post("/img2img")
async def img2img(body: Img2Img, request: Request) -> dict[str, Any]:
    job = submit(
        request, await prepared(request, lambda w, limits: _runs(body, w, limits)), body.force_task_id
    )
    await finished(request, job)
    if job.status == FAILED:
        raise ApiError(504 if job.timed_out else 500, f"img2img failed: {job.error}")
    parameters = body.model_dump(exclude={"init_images", "mask"}) | {"init_images": None, "mask": None}
    return {
        "images": [base64_png(o.png) for o in job.outputs],
        "parameters": parameters,
        "info": _info(body, job),
    }


@router.get("/progress")
async def progress(request: Request, id_task: str | None = None, skip_current_image: bool = False) -> dict:
    worker = worker_of(request)
    job = find(request, id_task) if id_task else worker.current
    fraction, eta = 0.0, 0.0
    if job is not None and job.total and job.started is not None:
        fraction = job.step / job.total
        elapsed = (job.finished or time.time()) - job.started
        eta = elapsed / fraction - elapsed if fraction else 0.0
    preview = None if job is None or skip_current_image else preview_png(job)
    return {
        "progress": fraction,
        "eta_relative": eta,
        "state": {
            "skipped": False,
            "interrupted": bool(job and job.cancel_reason),
            "job": job.id if job else "",
            "job_count": worker.queued(),
            "job_no": 0,
            "sampling_step": job.step if job else 0,
            "sampling_steps": job.total if job else 0,
            "status": job.status if job else "idle",
        },
        "current_image": preview and base64_png(preview),
        "textinfo": None,
        "current_task": job.id if job else None,
    }


@router.post("/interrupt")
async def interrupt(request: Request, id_task: str | None = None) -> dict[str, Any]:
    worker = worker_of(request)
    job = find(request, id_task) if id_task else worker.current
    if job is not None:
        worker.cancel(job.id, "interrupted")
    return {"interrupted": None if job is None else job.id}


@router.get("/samplers")
async def samplers() -> list[dict[str, Any]]:
    return [{"name": name, "aliases": [ours], "options": {}} for name, (ours, _) in A1111_SAMPLERS.items()]


class PngInfo(BaseModel):
    image: str


@router.post("/png-info")
async def png_info(body: PngInfo, request: Request) -> dict[str, Any]:
    limits = request.app.state.limits
    try:
        chunks = image_io.png_metadata(image_bytes(body.image, "image", limits), "image", limits.max_pixels)
    except LdmInpaintError as error:
        raise ApiError(400, str(error)) from None
    text = chunks.pop("parameters", "")
    return {"info": text, "items": chunks, "parameters": parse_infotext(text) if text else {}}
