"""``ldm-inpaint serve`` under bad input and faults: one clear line and the right status for every bad request,
503 until ready, 429 with Retry-After when the queue is full, cancellation and time limits that free the
worker, failing jobs that leave the server up, the API key, and requests that can never touch server paths."""

from __future__ import annotations

import base64
import functools
import http.server
import threading
from pathlib import Path

import pytest
from PIL import Image

from ldm_inpaint.serving.app import ServerSettings, create_app
from ldm_inpaint.serving.cli import serve_main
from ldm_inpaint.serving.jobs import Model

from .serving import (
    file_base64,
    image_and_mask,
    make_app,
    model_loader,
    png_base64,
    ready_client,
    tiny_checkpoint,
    wait_until,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    image, mask = image_and_mask(folder)
    return tiny_checkpoint(folder), file_base64(image), file_base64(mask), folder


def job(image: str, mask: str, **options: object) -> dict:
    return {"image": image, "mask": mask, "options": {"steps": 2, **options}}


def finished(client, job_id: str) -> dict:
    wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] not in ("queued", "processing"))
    return client.get(f"/v1/jobs/{job_id}").json()


def test_bad_requests_get_one_line_and_the_right_status(files) -> None:
    checkpoint, image, mask, _ = files
    big = png_base64(Image.new("RGB", (101, 100)))
    cases = [
        (job("not base64!", mask), 400, "expected base64"),
        (job("file:///etc/passwd", mask), 400, "found a file URL"),
        (job("http://127.0.0.1:9/x.png", mask), 400, "only when started with --allow-urls"),
        (job(base64.b64encode(b"not an image").decode(), mask), 400, "cannot identify as an image"),
        (job(big, big), 413, "expected at most 10,000 pixels"),
        (job(image, png_base64(Image.new("L", (10, 10)))), 400, "size"),
        (job(image, mask, stepz=3), 422, "unknown option 'stepz'"),
        (job(image, mask, steps=0), 422, "steps: expected 1..1000"),
        (job(image, mask, sampler="lms"), 422, "sampler: expected one of"),
        ({"image": image, "options": {"paste_back": True}}, 422, "act on a mask"),
        ({"image": image, "mask": mask, "colour": 1}, 422, "colour"),
    ]
    with ready_client(make_app(checkpoint, max_pixels=100 * 100, max_body_bytes=1 << 20)) as client:
        for body, status, fragment in cases:
            answer = client.post("/v1/jobs", json=body)
            assert answer.status_code == status, (body.get("options"), answer.json())
            detail = answer.json()["detail"]
            assert fragment in detail and "\n" not in detail and "Traceback" not in detail
        huge = client.post(
            "/v1/jobs", content=b"{" + b" " * (2 << 20), headers={"content-type": "application/json"}
        )
        assert huge.status_code == 413 and "expected at most 1,048,576 bytes" in huge.json()["detail"]
        chunked = client.post(
            "/v1/jobs", content=iter([b" " * (1 << 19)] * 3), headers={"content-type": "application/json"}
        )
        assert chunked.status_code == 413
        cog = {"input": {"image": image, "mask": mask, "scheduler": "KLMS"}}
        assert client.post("/predictions", json=cog).status_code == 422
        cog = {"input": {"image": image, "mask": mask}, "webhook": "http://127.0.0.1:9/hook"}
        assert "sends no webhooks" in client.post("/predictions", json=cog).json()["detail"]
        a1111 = {"init_images": [image], "mask": mask, "sampler_name": "Euler b"}
        assert (
            "sampler_name: expected one of" in client.post("/sdapi/v1/img2img", json=a1111).json()["detail"]
        )
        assert client.post("/score", json={"input_data": {"data": []}}).status_code == 422
        assert client.get("/v1/jobs/none-such").status_code == 404
        assert client.get("/livez").json() == {"status": "alive"}


def test_not_ready_until_loaded_and_a_failed_load_is_reported(files) -> None:
    checkpoint, image, mask, _ = files
    release = threading.Event()
    load = model_loader(checkpoint)
    app = create_app(lambda: release.wait(60) and load(), ServerSettings())
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 503
        assert client.get("/health-check").json()["status"] == "STARTING"
        refused = client.post("/v1/jobs", json=job(image, mask))
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        release.set()
        wait_until(lambda: client.get("/readyz").status_code == 200)
        assert client.post("/v1/jobs", json=job(image, mask)).status_code == 202

    def broken() -> Model:
        raise OSError("disk on fire")

    with TestClient(create_app(broken, ServerSettings())) as client:
        wait_until(lambda: client.get("/readyz").json()["error"] is not None)
        assert client.get("/readyz").status_code == 503
        assert client.get("/health-check").json()["status"] == "SETUP_FAILED"
        assert "disk on fire" in client.post("/v1/jobs", json=job(image, mask)).json()["detail"]


def test_full_queue_gets_429_and_cancel_frees_the_worker_at_once(files) -> None:
    checkpoint, image, mask, _ = files
    with ready_client(make_app(checkpoint, max_queue=1)) as client:
        running = client.post("/v1/jobs", json=job(image, mask, steps=1000)).json()["id"]
        wait_until(lambda: client.get(f"/v1/jobs/{running}").json()["status"] == "processing")
        waiting = client.post("/v1/jobs", json=job(image, mask)).json()
        assert waiting["status"] == "queued" and waiting["position"] == 1
        full = client.post("/v1/jobs", json=job(image, mask))
        assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
        assert "queue is full" in full.json()["detail"]
        assert client.get("/health-check").json()["status"] == "BUSY"
        assert client.delete(f"/v1/jobs/{waiting['id']}").json()["status"] == "canceled"
        client.delete(f"/v1/jobs/{running}")
        stopped = finished(client, running)
        assert stopped["status"] == "canceled" and stopped["step"] < stopped["total"]
        assert stopped["error"] == "canceled by the client"
        after = client.post("/v1/jobs", json=job(image, mask)).json()["id"]
        assert finished(client, after)["status"] == "succeeded"


class Faulty:
    """A pipeline that fails on request: prompt "boom" raises, prompt "nan" gives non-finite images."""

    def __init__(self, pipeline) -> None:
        self.pipeline, self.config = pipeline, pipeline.config

    def __call__(self, image, mask, options, callback):
        if options.prompt == "boom":
            raise RuntimeError("simulated failure")
        result = self.pipeline(image, mask, options, callback=callback)
        if options.prompt == "nan":
            result.images = result.images * float("nan")
        return result


def test_failing_jobs_and_timeouts_leave_the_server_up(files) -> None:
    checkpoint, image, mask, _ = files
    load = model_loader(checkpoint)

    def faulty() -> Model:
        model = load()
        return Model(Faulty(model.pipeline), model.metadata, model.precision)

    with ready_client(create_app(faulty, ServerSettings(job_timeout=1.0))) as client:
        boom = finished(client, client.post("/v1/jobs", json=job(image, mask, prompt="boom")).json()["id"])
        assert (
            boom["status"] == "failed" and boom["error"] == "internal error: RuntimeError: simulated failure"
        )
        nan = finished(client, client.post("/v1/jobs", json=job(image, mask, prompt="nan")).json()["id"])
        assert nan["status"] == "failed" and "non-finite" in nan["error"]
        slow = {"id": "slow", "input": {"image": image, "mask": mask, "num_inference_steps": 500}}
        timed_out = client.post("/predictions", json=slow).json()
        assert timed_out["status"] == "failed" and "timed out after 1 s" in timed_out["error"]
        fine = finished(client, client.post("/v1/jobs", json=job(image, mask)).json()["id"])
        assert fine["status"] == "succeeded" and client.get("/readyz").status_code == 200


def test_api_key_guards_every_route_but_the_health_checks(files) -> None:
    checkpoint, image, mask, _ = files
    with ready_client(make_app(checkpoint, api_key="s3cret")) as client:
        for path in ("/livez", "/readyz", "/health-check", "/", "/static/app.js"):
            assert client.get(path).status_code == 200, path
        for path in ("/v1/options", "/openapi.json", "/sdapi/v1/progress", "/predictions/x"):
            answer = client.get(path)
            assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
        assert "found none" in client.post("/v1/jobs", json=job(image, mask)).json()["detail"]
        wrong = client.post("/v1/jobs", json=job(image, mask), headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "found a different key" in wrong.json()["detail"]
        right = client.post("/v1/jobs", json=job(image, mask), headers={"Authorization": "Bearer s3cret"})
        assert right.status_code == 202


def test_serve_command_refuses_a_public_host_without_a_key(files, capsys) -> None:
    checkpoint = files[0]
    for flags, fragment in [
        (["--host", "0.0.0.0"], "give --api-key KEY"),
        (["--port", "70000"], "--port: expected 0..65535"),
        (["--max-queue", "0"], "--max-queue: expected 1.."),
        (["--job-timeout", "0"], "expected positive numbers"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            serve_main(["--ckpt", str(checkpoint), *flags])
        assert exit_.value.code == 2
        error = capsys.readouterr().err
        assert fragment in error and len(error.strip().splitlines()) == 1


def test_outdir_keeps_every_image_and_urls_only_when_allowed(files, tmp_path: Path) -> None:
    checkpoint, image, mask, folder = files
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{site.server_address[1]}/photo.png"
    try:
        app = make_app(checkpoint, outdir=tmp_path / "out", allow_urls=True)
        with ready_client(app) as client:
            for _ in range(2):
                created = client.post("/v1/jobs", json={**job(url, mask), "options": {"steps": 2, "seed": 1}})
                assert finished(client, created.json()["id"])["status"] == "succeeded"
            missing = client.post("/v1/jobs", json=job(url.replace("photo", "absent"), mask))
            assert missing.status_code == 400 and "could not fetch" in missing.json()["detail"]
    finally:
        site.shutdown()
    saved = sorted((tmp_path / "out").glob("*.png"))
    assert len(saved) == 2 and saved[0].read_bytes() != b""
