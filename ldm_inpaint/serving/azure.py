"""The Azure ML online endpoint's scoring route of the model cards' deployments: ``POST /score``.

Request: ``{"input_data": {"columns": ["prompt", "image", "mask_image", "negative_prompt"?], "data": [row,
...], "index": [...]}, "parameters": {"num_inference_steps": 50, "guidance_scale": 7.5, ...}}``. A row is an
object keyed by column, or a list in the order of ``columns`` (pandas' "split" form); ``parameters`` may also
sit inside ``input_data``, and may name any option (``GET /v1/options``). Images are base64.

Answer (one entry per image, rows in order): ``[{"prompt", "generated_image": <base64 PNG>,
"nsfw_content_detected": null}, ...]`` (no safety checker runs here).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ldm_inpaint.serving.handling import base64_png, finished, prepared, submit
from ldm_inpaint.serving.inputs import ApiError, decode, parse_options, run_for
from ldm_inpaint.serving.jobs import SUCCEEDED, Job

router = APIRouter()
COLUMNS = ("prompt", "image", "mask_image", "negative_prompt")
# The model card's parameter names -> option names; other names are options' own.
PARAMETERS = {"num_inference_steps": "steps"}


class InputData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    columns: list[str] | None = None
    index: list[Any] | None = None
    data: list[dict[str, Any] | list[Any]] = Field(min_length=1)
    parameters: dict[str, Any] | None = None


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_data: InputData
    parameters: dict[str, Any] | None = None


def rows(data: InputData) -> list[dict[str, Any]]:
    """Each row as a dict keyed by column; 422 for unknown columns or a row of the wrong length."""
    result = []
    for number, row in enumerate(data.data):
        if isinstance(row, list):
            if data.columns is None or len(row) != len(data.columns):
                raise ApiError(
                    422,
                    f"input_data.data[{number}]: expected a value per column of input_data.columns "
                    f"({data.columns}), found {len(row)} values",
                )
            row = dict(zip(data.columns, row, strict=True))
        unknown = sorted(set(row) - set(COLUMNS))
        if unknown or "image" not in row or "mask_image" not in row:
            raise ApiError(
                422,
                f"input_data.data[{number}]: expected columns {', '.join(COLUMNS[:3])} (and optionally "
                f"negative_prompt), found {', '.join(sorted(row))}",
            )
        result.append(row)
    return result


def answer(job: Job) -> list[dict[str, Any]]:
    if job.status != SUCCEEDED:
        raise ApiError(504 if job.timed_out else 500, f"scoring {job.status}: {job.error}")
    return [
        {
            "prompt": output.options.prompt,
            "generated_image": base64_png(output.png),
            "nsfw_content_detected": None,
        }
        for output in job.outputs
    ]


@router.post("/score")
async def score(body: ScoreRequest, request: Request) -> list[dict[str, Any]]:
    given = {**(body.input_data.parameters or {}), **(body.parameters or {})}
    parameters = {PARAMETERS.get(name, name): value for name, value in given.items()}

    def build(worker, limits):
        runs = []
        for number, row in enumerate(rows(body.input_data)):
            image = decode(row["image"], f"input_data.data[{number}].image", limits)
            mask = decode(row["mask_image"], f"input_data.data[{number}].mask_image", limits)
            text = {"prompt": row.get("prompt") or "", "negative_prompt": row.get("negative_prompt") or ""}
            runs.append(run_for(worker, image, mask, parse_options({**parameters, **text})))
        return runs

    job = submit(request, await prepared(request, build))
    return answer(await finished(request, job))
