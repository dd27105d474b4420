"""AUTOMATIC1111's "infotext": the generation settings as the ``parameters`` PNG text chunk that A1111, its
extensions and image viewers read. Three lines: the prompt, ``Negative prompt: ...``, then ``Key: value`` pairs
separated by ``, `` (a value holding a comma or a quote is written in double quotes, JSON-escaped).

Sampler names are A1111's (:data:`A1111_SAMPLERS`), so an image made here can be sent back to A1111 ("Send to
img2img", its PNG Info tab) with its settings.
"""

from __future__ import annotations

import json
import re

from ldm_inpaint.options import InpaintOptions

# A1111 sampler name -> (our sampler, its eta): ancestral samplers run in their standard form (eta 1).
A1111_SAMPLERS: dict[str, tuple[str, float]] = {
    "DDIM": ("ddim", 0.0),
    "PLMS": ("plms", 0.0),
    "Euler": ("euler", 0.0),
    "Euler a": ("euler_ancestral", 1.0),
    "Heun": ("heun", 0.0),
    "DPM++ 2M": ("dpmpp_2m", 0.0),
    "DPM++ 2M Karras": ("dpmpp_2m_karras", 0.0),
    "DPM++ 2S a": ("dpmpp_2s_ancestral", 1.0),
}
OUR_SAMPLERS = {ours: name for name, (ours, _) in A1111_SAMPLERS.items()}
NEGATIVE = "Negative prompt: "
# A "Key: value" pair: a key without ":" or ",", and a bare value up to the next comma or a quoted one.
_PAIR = re.compile(r'\s*([^,:]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def infotext(options: InpaintOptions, size: tuple[int, int], model: dict[str, str]) -> str:
    """The infotext of one image of ``size`` (width, height) made with ``options`` by the checkpoint whose
    metadata is ``model`` (:func:`ldm_inpaint.cli.checkpoint_metadata`)."""
    pairs = {
        "Steps": options.steps,
        "Sampler": OUR_SAMPLERS.get(options.sampler, options.sampler),
        "CFG scale": options.guidance_scale,
        "Seed": options.seed,
        "Size": f"{size[0]}x{size[1]}",
        "Model hash": model.get("checkpoint_sha256", "")[:10],
        "Model": model.get("checkpoint", "").rsplit(".", 1)[0],
        "Denoising strength": options.strength,
    }
    if options.eta and options.sampler == "ddim":
        pairs["Eta DDIM"] = options.eta
    if options.paste_back:
        pairs["Mask blur"] = options.mask_blur
    if options.crop_to_mask is not None:
        pairs["Inpaint area"] = "Only masked"
        pairs["Masked area padding"] = options.crop_to_mask
    settings = ", ".join(f"{key}: {_quoted(str(value))}" for key, value in pairs.items())
    lines = [options.prompt] + ([NEGATIVE + options.negative_prompt] if options.negative_prompt else [])
    return "\n".join([*lines, settings])


def _quoted(value: str) -> str:
    return json.dumps(value) if any(c in value for c in ',:"\n') else value


def parse_infotext(text: str) -> dict[str, str]:
    """The fields of an infotext: ``Prompt``, ``Negative prompt`` (when there is one) and every ``Key: value``
    of its last line, as text. The last line is the settings line when it holds three pairs or more (A1111's
    rule); otherwise the whole text is prompt."""
    lines = text.strip("\n").split("\n")
    pairs = _PAIR.findall(lines[-1])
    settings, head = (pairs, lines[:-1]) if len(pairs) >= 3 else ([], lines)
    negative = next((i for i, line in enumerate(head) if line.startswith(NEGATIVE)), len(head))
    fields = {"Prompt": "\n".join(head[:negative])}
    if negative < len(head):
        fields["Negative prompt"] = "\n".join(head[negative:])[len(NEGATIVE) :]
    for key, value in settings:
        fields[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    return fields
