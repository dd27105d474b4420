from __future__ import annotations

import open_clip
import pytest
import torch

from ldm_inpaint.tokenizer import encode, tokenize

START, END = 49406, 49407
LONG_PROMPT = "a very detailed photograph of a red fox in a snowy forest at dawn, " * 8
PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "!!",
    "",
    LONG_PROMPT,
    "Café in Tōkyō, 東京の夜景 🙂 — naïve déjà vu",
    "  Multiple   spaces\tand\nnewlines  ",
]


def test_known_ids_of_the_clip_vocabulary() -> None:
    # The example of OpenAI's CLIP README: clip.tokenize("a diagram").
    assert encode("a diagram") == [START, 320, 22697, END]
    assert encode("") == [START, END]


def test_sd2_ids_match_open_clip_tokenize() -> None:
    tokens = tokenize(PROMPTS, pad_token=0)
    assert tokens.ids.dtype == torch.long
    assert torch.equal(tokens.ids, open_clip.tokenize(PROMPTS))


def test_double_exclamation_is_one_token() -> None:
    # open_clip (the original SD2 tokenizer) keeps "!!" whole; diffusers' SD2 tokenizer would split it in two.
    assert tokenize(["!!"], pad_token=0).ids[0, :4].tolist() == [START, 748, END, 0]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_sd1_pads_with_the_end_token(prompt: str) -> None:
    ids = tokenize([prompt], pad_token=END).ids[0]
    full = encode(prompt)
    assert ids.shape == (77,)
    assert ids[0] == START
    length = min(len(full), 77)
    assert ids[: length - 1].tolist() == full[: length - 1]
    assert (ids[length - 1 :] == END).all()


def test_truncation_keeps_the_end_token_last_and_counts_the_cut() -> None:
    full = encode(LONG_PROMPT)
    assert len(full) > 77
    tokens = tokenize([LONG_PROMPT, "short prompt"], pad_token=0)
    assert tokens.ids[0].tolist() == full[:76] + [END]
    assert tokens.truncated == [len(full) - 77, 0]


def test_exactly_full_context_is_not_truncated() -> None:
    prompt = "cat " * 75
    assert len(encode(prompt)) == 77
    tokens = tokenize([prompt, prompt + "dog"], pad_token=END)
    assert tokens.truncated == [0, 1]
    assert tokens.ids[0].tolist() == encode(prompt)
    assert tokens.ids[1].tolist() == encode(prompt)


def test_custom_context_length() -> None:
    tokens = tokenize(["a photograph of an astronaut riding a horse"], pad_token=0, context_length=4)
    assert tokens.ids.tolist() == [encode("a photograph")[:3] + [END]]
    assert tokens.truncated == [len(encode("a photograph of an astronaut riding a horse")) - 4]
