// The page of `ldm-inpaint serve`: open an image, paint the mask, queue a job on POST /v1/jobs, follow its
// server-sent events (read with fetch, so the API key header goes along), show the results. No libraries.
"use strict";

const $ = (id) => document.getElementById(id);
const stage = $("stage");
const imageCanvas = $("image-canvas");
const maskCanvas = $("mask-canvas");
const maskContext = maskCanvas.getContext("2d");
const STROKE = [255, 59, 48]; // how the mask shows on the page; what is sent is white on black
let imageData = null; // the opened file as a data URI: sent as it is, so the server decodes the same bytes
let tool = "brush";
let job = null; // {id, controller}

function headers(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: headers(body ? { "Content-Type": "application/json" } : {}),
    body: body ? JSON.stringify(body) : undefined,
  });
  const payload = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(payload.detail || `${response.status} ${response.statusText}`);
  return payload;
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function loadImage(source) {
  return new Promise((resolve, reject) => {
    const picture = new Image();
    picture.onload = () => resolve(picture);
    picture.onerror = () => reject(new Error("the browser cannot read this file as an image"));
    picture.src = source;
  });
}

async function openImage(file) {
  try {
    const data = await readFile(file);
    const picture = await loadImage(data);
    for (const canvas of [imageCanvas, maskCanvas]) {
      canvas.width = picture.naturalWidth;
      canvas.height = picture.naturalHeight;
    }
    imageCanvas.getContext("2d").drawImage(picture, 0, 0);
    stage.style.aspectRatio = `${picture.naturalWidth} / ${picture.naturalHeight}`;
    stage.classList.remove("empty");
    imageData = data;
    showError("");
  } catch (error) {
    showError(`${file.name}: ${error.message}`);
  }
}

// -- the mask: strokes (their alpha) on a transparent canvas of the image's size ---------------------------

function canvasPoint(event) {
  const box = maskCanvas.getBoundingClientRect();
  return [
    ((event.clientX - box.left) * maskCanvas.width) / box.width,
    ((event.clientY - box.top) * maskCanvas.height) / box.height,
  ];
}

function brushWidth() {
  const box = maskCanvas.getBoundingClientRect();
  return (Number($("brush-size").value) * maskCanvas.width) / Math.max(box.width, 1);
}

let last = null;
function paint(event) {
  const point = canvasPoint(event);
  maskContext.globalCompositeOperation = tool === "eraser" ? "destination-out" : "source-over";
  maskContext.strokeStyle = `rgb(${STROKE})`;
  maskContext.lineWidth = brushWidth();
  maskContext.lineCap = maskContext.lineJoin = "round";
  maskContext.beginPath();
  maskContext.moveTo(...(last || point));
  maskContext.lineTo(...point);
  maskContext.stroke();
  last = point;
}

maskCanvas.addEventListener("pointerdown", (event) => {
  if (!imageData) return;
  maskCanvas.setPointerCapture(event.pointerId);
  last = null;
  paint(event);
});
maskCanvas.addEventListener("pointermove", (event) => {
  if (last) paint(event);
});
for (const name of ["pointerup", "pointercancel"]) maskCanvas.addEventListener(name, () => (last = null));

function eachMaskPixel(change) {
  const pixels = maskContext.getImageData(0, 0, maskCanvas.width, maskCanvas.height);
  for (let i = 0; i < pixels.data.length; i += 4) {
    const alpha = change(pixels.data, i);
    pixels.data.set([...STROKE, alpha], i);
  }
  maskContext.globalCompositeOperation = "source-over";
  maskContext.putImageData(pixels, 0, 0);
}

$("mask-clear").onclick = () => maskContext.clearRect(0, 0, maskCanvas.width, maskCanvas.height);
$("mask-invert").onclick = () => eachMaskPixel((data, i) => (data[i + 3] >= 128 ? 0 : 255));
$("mask-input").onchange = async (event) => {
  const file = event.target.files[0];
  if (!file || !imageData) return showError("open an image before its mask");
  const picture = await loadImage(await readFile(file)).catch((error) => showError(error.message));
  if (!picture) return;
  maskContext.clearRect(0, 0, maskCanvas.width, maskCanvas.height);
  maskContext.drawImage(picture, 0, 0, maskCanvas.width, maskCanvas.height);
  eachMaskPixel((data, i) => ((data[i] + data[i + 1] + data[i + 2]) / 3 >= 128 && data[i + 3] >= 128 ? 255 : 0));
};

function canvasLike(canvas) {
  const copy = document.createElement("canvas");
  copy.width = canvas.width;
  copy.height = canvas.height;
  return [copy, copy.getContext("2d")];
}

function maskPng() {
  // white where painted (as much as the stroke's alpha), black elsewhere
  const [white, whiteContext] = canvasLike(maskCanvas);
  whiteContext.drawImage(maskCanvas, 0, 0);
  whiteContext.globalCompositeOperation = "source-in";
  whiteContext.fillStyle = "#fff";
  whiteContext.fillRect(0, 0, white.width, white.height);
  const [flat, context] = canvasLike(maskCanvas);
  context.fillStyle = "#000";
  context.fillRect(0, 0, flat.width, flat.height);
  context.drawImage(white, 0, 0);
  return flat.toDataURL("image/png");
}

for (const [id, name] of [["tool-brush", "brush"], ["tool-eraser", "eraser"]]) {
  $(id).onclick = () => {
    tool = name;
    $("tool-brush").classList.toggle("active", name === "brush");
    $("tool-eraser").classList.toggle("active", name === "eraser");
  };
}
$("brush-size").oninput = () => ($("brush-size-value").textContent = $("brush-size").value);
$("image-input").onchange = (event) => event.target.files[0] && openImage(event.target.files[0]);
stage.addEventListener("dragover", (event) => {
  event.preventDefault();
  stage.classList.add("dragging");
});
stage.addEventListener("dragleave", () => stage.classList.remove("dragging"));
stage.addEventListener("drop", (event) => {
  event.preventDefault();
  stage.classList.remove("dragging");
  if (event.dataTransfer.files[0]) openImage(event.dataTransfer.files[0]);
});
$("seed-random").onclick = () => ($("seed").value = Math.floor(Math.random() * 2 ** 32));

// -- jobs ------------------------------------------------------------------------------------------------

function options() {
  const number = (id) => Number($(id).value);
  const blur = number("mask-blur");
  const pasteBack = $("paste-back").checked;
  return {
    prompt: $("prompt").value,
    negative_prompt: $("negative-prompt").value,
    sampler: $("sampler").value,
    eta: /ancestral/.test($("sampler").value) ? 1 : 0,
    steps: number("steps"),
    guidance_scale: number("guidance"),
    seed: number("seed"),
    strength: number("strength"),
    n_samples: number("n-samples"),
    paste_back: pasteBack,
    mask_blur: pasteBack ? blur : 0,
  };
}

function setRunning(running, text) {
  $("generate").disabled = running;
  $("cancel").disabled = !running;
  $("status-text").textContent = text;
}

async function* serverEvents(path, signal) {
  const response = await fetch(path, { headers: headers(), signal });
  if (!response.ok) throw new Error(`events: ${response.status}`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const name = /^event: (.*)$/m.exec(block)?.[1];
      const data = /^data: (.*)$/m.exec(block)?.[1];
      if (name && data) yield [name, JSON.parse(data)];
    }
  }
}

function addResults(finished) {
  for (const output of finished.outputs) {
    const figure = document.createElement("figure");
    const link = document.createElement("a");
    link.href = output.url;
    link.download = `${finished.id}-${output.seed}.png`;
    link.textContent = "download";
    const picture = document.createElement("img");
    picture.alt = `result, seed ${output.seed}`;
    const caption = document.createElement("figcaption");
    caption.textContent = output.infotext;
    fetch(output.url, { headers: headers() })
      .then((response) => response.blob())
      .then((blob) => {
        picture.src = link.href = URL.createObjectURL(blob);
      });
    figure.append(picture, link, caption);
    $("results").prepend(figure);
  }
}

$("generate").onclick = async () => {
  if (!imageData) return showError("open an image first");
  showError("");
  setRunning(true, "sending…");
  $("progress").value = 0;
  try {
    const created = await api("POST", "/v1/jobs", { image: imageData, mask: maskPng(), options: options() });
    job = { id: created.id, controller: new AbortController() };
    for await (const [name, data] of serverEvents(`/v1/jobs/${created.id}/events`, job.controller.signal)) {
      if (name === "queued") setRunning(true, `queued: position ${data.position}`);
      if (name === "progress") {
        $("progress").value = data.total ? data.step / data.total : 0;
        setRunning(true, `step ${data.step} of ${data.total}`);
        if (data.preview) {
          $("preview").src = data.preview;
          $("preview").hidden = false;
        }
      }
      if (name === "done") {
        setRunning(false, data.status);
        if (data.status === "succeeded") addResults(data);
        else if (data.status === "failed") showError(data.error);
      }
    }
  } catch (error) {
    if (error.name !== "AbortError") showError(error.message);
    setRunning(false, job ? "stopped" : "idle");
  } finally {
    job = null;
    $("preview").hidden = true;
  }
};

$("cancel").onclick = async () => {
  if (!job) return;
  const id = job.id;
  $("cancel").disabled = true;
  await api("DELETE", `/v1/jobs/${id}`).catch((error) => showError(error.message));
};

async function start() {
  $("api-key").value = localStorage.getItem("ldm-inpaint-api-key") || "";
  $("api-key").onchange = () => localStorage.setItem("ldm-inpaint-api-key", $("api-key").value);
  try {
    const fields = await api("GET", "/v1/options");
    for (const name of fields.sampler.choices) $("sampler").add(new Option(name, name));
    $("sampler").value = fields.sampler.default;
    $("steps").value = fields.steps.default;
    $("guidance").value = fields.guidance_scale.default;
    $("seed").value = fields.seed.default;
  } catch (error) {
    showError(`options: ${error.message}`);
  }
  watchReadiness();
}

async function watchReadiness() {
  const ready = await fetch("/readyz").then((response) => response.json()).catch(() => null);
  $("server-state").textContent = ready?.ready ? "model ready" : ready?.error || "model loading…";
  if (!ready?.ready && !ready?.error) setTimeout(watchReadiness, 2000);
}

start();
