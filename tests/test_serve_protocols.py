"""Each protocol of ``ldm-inpaint serve`` against the command line: for the same options and seed, the image a
route answers is bit-identical to the file the CLI writes. And the protocols' shapes: Cog's prediction
lifecycle, the Azure card's sample request and answer, A1111's info / progress / samplers / png-info, the
own jobs API and its server-sent events."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm_inpaint.cli import main as cli
from ldm_inpaint.image_io import read_png_metadata
from ldm_inpaint.serving.infotext import A1111_SAMPLERS, infotext, parse_infotext

from .serving import (
    CONFIG,
    file_base64,
    image_and_mask,
    make_app,
    pixels,
    ready_client,
    tiny_checkpoint,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    checkpoint = tiny_checkpoint(folder)
    image, mask = image_and_mask(folder)
    with ready_client(make_app(checkpoint)) as client:
        yield client, checkpoint, image, mask, folder


def cli_pixels(setup, *flags: str) -> list[np.ndarray]:
    _, checkpoint, image, mask, folder = setup
    outdir = folder / f"cli-{abs(hash(flags))}"
    args = ["--ckpt", str(checkpoint), "--config", str(CONFIG), "--image", str(image), "--mask", str(mask)]
    assert cli([*args, "--outdir", str(outdir), *flags]) == 0
    return [np.array(Image.open(path)) for path in sorted(outdir.glob("*.png"))]


def test_cog_prediction_equals_the_cli(setup) -> None:
    client, _, image, mask, _ = setup
    body = {
        "input": {
            "prompt": "a red bench",
            "negative_prompt": "blurry",
            "image": "data:image/png;base64," + file_base64(image),
            "mask": file_base64(mask),
            "num_inference_steps": 4,
            "guidance_scale": 5.0,
            "scheduler": "K_EULER_ANCESTRAL",
            "num_outputs": 2,
            "seed": 11,
        }
    }
    answer = client.post("/predictions", json=body).json()
    assert answer["status"] == "succeeded" and answer["error"] is None
    assert answer["input"]["seed"] == 11 and "image" not in answer["input"]
    assert answer["metrics"]["predict_time"] > 0 and answer["completed_at"] >= answer["started_at"]
    expected = cli_pixels(
        setup, "--prompt", "a red bench", "--negative-prompt", "blurry", "--steps", "4",
        "--guidance-scale", "5", "--sampler", "euler_ancestral", "--eta", "1", "--n-samples", "2", "--seed", "11",
    )  # fmt: skip
    assert len(answer["output"]) == 2
    for output, reference in zip(answer["output"], expected, strict=True):
        assert output.startswith("data:image/png;base64,")
        np.testing.assert_array_equal(pixels(output), reference)


def test_cog_async_prediction_poll_and_cancel(setup) -> None:
    client, _, image, mask, _ = setup
    body = {"id": "cog-async-1", "input": {"image": file_base64(image), "mask": file_base64(mask)}}
    body["input"]["num_inference_steps"] = 3
    started = client.post("/predictions", json=body, headers={"Prefer": "respond-async"})
    assert started.status_code == 202 and started.json()["id"] == "cog-async-1"
    assert started.json()["status"] in ("starting", "processing") and started.json()["output"] is None
    while (polled := client.get("/predictions/cog-async-1").json())["status"] in ("starting", "processing"):
        pass
    assert polled["status"] == "succeeded" and len(polled["output"]) == 1
    assert client.post("/predictions", json=body).status_code == 409  # the id is taken
    long = {"id": "cog-async-2", "input": {**body["input"], "num_inference_steps": 500}}
    client.post("/predictions", json=long, headers={"Prefer": "respond-async"})
    assert client.post("/predictions/cog-async-2/cancel").status_code == 200
    while (polled := client.get("/predictions/cog-async-2").json())["status"] in ("starting", "processing"):
        pass
    assert polled["status"] == "canceled" and polled["output"] is None
    assert client.post("/predictions/no-such/cancel").status_code == 404
    assert client.get("/health-check").json() == {
        "status": "READY",
        "setup": {"status": "succeeded", "logs": ""},
    }
    schema = client.get("/openapi.json").json()
    assert {"/predictions", "/score", "/sdapi/v1/img2img", "/v1/jobs"} <= set(schema["paths"])


def test_azure_card_request_equals_the_cli(setup) -> None:
    client, _, image, mask, _ = setup
    request = {
        "input_data": {
            "columns": ["prompt", "image", "mask_image"],
            "data": [
                {"prompt": "a red bench", "image": file_base64(image), "mask_image": file_base64(mask)},
                ["a blue bench", file_base64(image), file_base64(mask)],
            ],
            "index": [0, 1],
        },
        "parameters": {"num_inference_steps": 3, "guidance_scale": 6.0, "seed": 3},
    }
    answer = client.post("/score", json=request).json()
    assert [set(row) for row in answer] == [{"prompt", "generated_image", "nsfw_content_detected"}] * 2
    assert [row["prompt"] for row in answer] == ["a red bench", "a blue bench"]
    assert all(row["nsfw_content_detected"] is None for row in answer)
    for row in answer:
        expected = cli_pixels(
            setup, "--prompt", row["prompt"], "--steps", "3", "--guidance-scale", "6", "--seed", "3"
        )
        np.testing.assert_array_equal(pixels(row["generated_image"]), expected[0])


def test_a1111_img2img_equals_the_cli_and_carries_infotext(setup) -> None:
    client, checkpoint, image, mask, _ = setup
    body = {
        "init_images": [file_base64(image)],
        "mask": file_base64(mask),
        "prompt": "a red bench",
        "steps": 3,
        "cfg_scale": 7,
        "sampler_name": "DPM++ 2M",
        "seed": 21,
        "batch_size": 1,
        "n_iter": 2,
        "denoising_strength": 0.8,
        "mask_blur": 2,
        "restore_faces": False,
    }
    answer = client.post("/sdapi/v1/img2img", json=body).json()
    info = json.loads(answer["info"])
    assert info["all_seeds"] == [21, 22] and info["ignored"] == ["restore_faces"]
    assert answer["parameters"]["prompt"] == "a red bench" and answer["parameters"]["init_images"] is None
    for seed, encoded in zip((21, 22), answer["images"], strict=True):
        expected = cli_pixels(
            setup, "--prompt", "a red bench", "--steps", "3", "--guidance-scale", "7", "--sampler", "dpmpp_2m",
            "--seed", str(seed), "--strength", "0.8", "--paste-back", "--mask-blur", "2",
        )  # fmt: skip
        np.testing.assert_array_equal(pixels(encoded), expected[0])
    read = client.post("/sdapi/v1/png-info", json={"image": answer["images"][0]}).json()
    assert read["parameters"]["Seed"] == "21" and read["parameters"]["Sampler"] == "DPM++ 2M"
    assert read["parameters"]["Size"] == "64x48" and read["parameters"]["Mask blur"] == "2.0"
    assert read["items"]["seed"] == "21" and read["items"]["checkpoint"] == checkpoint.name
    names = [sampler["name"] for sampler in client.get("/sdapi/v1/samplers").json()]
    assert names == list(A1111_SAMPLERS)


def test_a1111_inverted_mask_and_progress(setup) -> None:
    client, _, image, mask, folder = setup
    inverted = folder / "inverted.png"
    Image.fromarray(255 - np.array(Image.open(mask))).save(inverted)
    body = {"init_images": [file_base64(image)], "mask": file_base64(inverted), "inpainting_mask_invert": 1}
    body |= {"steps": 3, "seed": 4, "denoising_strength": 1.0, "mask_blur": 0}
    answer = client.post("/sdapi/v1/img2img", json=body).json()
    expected = cli_pixels(setup, "--steps", "3", "--seed", "4", "--guidance-scale", "7", "--paste-back")
    np.testing.assert_array_equal(pixels(answer["images"][0]), expected[0])
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
    job = json.loads(answer["info"])["job_id"]
    finished = client.get(f"/sdapi/v1/progress?id_task={job}").json()
    assert finished["progress"] == 1 and finished["state"]["sampling_steps"] == 3
    assert client.post("/sdapi/v1/interrupt").json() == {"interrupted": None}


def test_own_jobs_api_events_and_equality_with_the_cli(setup) -> None:
    client, _, image, mask, _ = setup
    options = {"prompt": "a bench", "steps": 3, "seed": 8, "sampler": "heun", "mask_grow": 2}
    created = client.post(
        "/v1/jobs", json={"image": file_base64(image), "mask": file_base64(mask), "options": options}
    )
    assert created.status_code == 202
    job = created.json()["id"]
    events = []
    with client.stream("GET", f"/v1/jobs/{job}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                events.append(line[len("event: ") :])
            if line.startswith("data: "):
                data = json.loads(line[len("data: ") :])
    assert events[-1] == "done" and set(events[:-1]) <= {"queued", "progress"}
    assert data["status"] == "succeeded" and data["step"] == data["total"] == 3
    png = client.get(data["outputs"][0]["url"])
    assert png.headers["content-type"] == "image/png"
    expected = cli_pixels(
        setup, "--prompt", "a bench", "--steps", "3", "--seed", "8", "--sampler", "heun", "--mask-grow", "2"
    )
    saved = Path(setup[4]) / "served.png"
    saved.write_bytes(png.content)
    np.testing.assert_array_equal(np.array(Image.open(saved)), expected[0])
    metadata = read_png_metadata(saved)
    assert metadata["seed"] == "8" and parse_infotext(metadata["parameters"])["Sampler"] == "Heun"
    assert client.get(f"/v1/jobs/{job}/images/1.png").status_code == 404
    assert client.get("/v1/options").json()["sampler"]["default"] == "ddim"


def test_infotext_round_trip() -> None:
    from ldm_inpaint.options import InpaintOptions

    options = InpaintOptions(
        prompt="a cat, on a bench", negative_prompt="blurry\nugly", seed=5, paste_back=True
    )
    text = infotext(options, (64, 48), {"checkpoint": "model.ckpt", "checkpoint_sha256": "0123456789ab"})
    assert text.splitlines()[0] == "a cat, on a bench"
    fields = parse_infotext(text)
    assert fields["Prompt"] == "a cat, on a bench" and fields["Negative prompt"] == "blurry\nugly"
    assert fields["Steps"] == "50" and fields["Model hash"] == "0123456789" and fields["Model"] == "model"
    quoted = infotext(InpaintOptions(sampler="euler"), (8, 8), {"checkpoint": "a, b.ckpt"})
    assert parse_infotext(quoted)["Model"] == "a, b"
    assert parse_infotext("only a prompt: with a colon") == {"Prompt": "only a prompt: with a colon"}
