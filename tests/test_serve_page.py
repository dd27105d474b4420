"""The web page of ``ldm-inpaint serve`` in a real browser: Debian's chromium driven by Playwright, against a
real server on 127.0.0.1 with a tiny model. Open an image, paint a stroke, generate: a result appears, made
with the painted mask; a long job is cancelled from the page.

Without chromium (``apt-get install -y chromium``) these tests are skipped, unless
``LDM_INPAINT_BROWSER_TESTS=required`` (as ``.ci/run`` sets), which makes a missing browser a failure.
``LDM_INPAINT_SCREENSHOT=PATH`` saves the page with its result there (the README's picture).
"""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.data import chelsea

from .serving import live_server, make_app, tiny_checkpoint

CHROMIUM = Path("/usr/bin/chromium")
REQUIRED = os.environ.get("LDM_INPAINT_BROWSER_TESTS") == "required"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

if not REQUIRED:
    if not CHROMIUM.exists():
        pytest.skip("chromium is not installed (apt-get install -y chromium)", allow_module_level=True)
    pytest.importorskip("playwright")
from playwright.sync_api import sync_playwright  # noqa: E402 - after the check above


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    folder = tmp_path_factory.mktemp("page")
    checkpoint = tiny_checkpoint(folder)
    image = folder / "cat.png"
    Image.fromarray(chelsea()).resize((96, 64), Image.BICUBIC).save(image)
    with live_server(make_app(checkpoint)) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(url)
        page.wait_for_function("document.getElementById('server-state').textContent === 'model ready'")
        page.set_input_files("#image-input", str(image))
        page.wait_for_function("!document.getElementById('stage').classList.contains('empty')")
        yield page, folder
        browser.close()


def mask_sent(request_body: str) -> np.ndarray:
    data = json.loads(request_body)["mask"].split(",", 1)[1]
    return np.array(Image.open(io.BytesIO(base64.b64decode(data))).convert("L"))


def test_draw_a_stroke_generate_and_see_the_result(page) -> None:
    page, folder = page
    box = page.locator("#mask-canvas").bounding_box()
    page.fill("#brush-size", "20")
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.5, steps=8)
    page.mouse.up()
    page.fill("#prompt", "a red bench")
    page.fill("#steps", "3")
    page.fill("#seed", "7")
    with page.expect_request(lambda request: request.url.endswith("/v1/jobs")) as sent:
        page.click("#generate")
    mask = mask_sent(sent.value.post_data)
    assert mask.shape == (64, 96) and set(np.unique(mask)) <= set(range(256))
    assert mask[32, 48] > 200 and mask[5, 5] == 0 and mask[32, 10] == 0  # the stroke, nothing elsewhere
    result = page.locator("#results figure img").first
    result.wait_for()
    page.wait_for_function("document.querySelector('#results figure img').naturalWidth > 0")
    assert page.locator("#results figure").count() == 1
    caption = page.locator("#results figcaption").first.inner_text()
    assert caption.startswith("a red bench") and "Steps: 3" in caption and "Seed: 7" in caption
    assert page.locator("#status-text").inner_text() == "succeeded"
    assert page.locator("#results a").first.get_attribute("download").endswith("-7.png")
    shot = Path(os.environ.get("LDM_INPAINT_SCREENSHOT") or folder / "page.png")
    page.screenshot(path=str(shot), full_page=True)
    assert Image.open(shot).size[0] == 1200  # nothing wider than the window


def test_cancel_stops_a_running_job(page) -> None:
    page, _ = page
    page.fill("#steps", "1000")
    page.click("#generate")
    page.wait_for_function("/^step \\d+ of \\d+$/.test(document.getElementById('status-text').textContent)")
    assert page.locator("#progress").evaluate("bar => bar.value") < 1
    page.click("#cancel")
    page.wait_for_function("document.getElementById('status-text').textContent === 'canceled'")
    assert page.locator("#generate").is_enabled() and not page.locator("#cancel").is_enabled()
