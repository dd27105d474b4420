"""Ours vs diffusers' ``StableDiffusionInpaintPipeline``, side by side, on the same random weights.

    python scripts/benchmark.py                                   # SD1.5 + SD2, 256 + 512 px, fp32 + bf16, CPU
    python scripts/benchmark.py --device cuda --precision fp16,bf16 --sizes 512,768
    python scripts/benchmark.py --load-memory --precision fp32                # the load-memory rows only

1. **Files, once** (``--workdir``, reused when present): for each model a random checkpoint of the real layout
   (``random_weights.random_checkpoint``) saved as ``.ckpt``, the file users load; the same weights converted
   by diffusers' own original-checkpoint code (``benchmarking/diffusers_files.py``, the parity tests' oracle
   too), with a transformers ``CLIPTextModel`` (SD2: the 23-block tower diffusers runs for OpenCLIP's
   penultimate layer) and a ``CLIPTokenizer`` built from open_clip's bundled BPE, saved with
   ``save_pretrained``: diffusers loads it by its normal ``from_pretrained(folder)``.
2. **Runs**: every (implementation, repetition) is a fresh interpreter (``--worker``), so load time and peak
   memory are its own; the order alternates (ours first, then diffusers first, ...). Both get the same image,
   mask, prompts, start latent, DDIM (the original's "uniform" grid: diffusers' leading spacing with
   ``steps_offset=1``, ``set_alpha_to_one=False``), eta 0, guidance 7.5 (a batch-2 UNet call per step),
   precision and thread count. ``--warmup-calls`` 1-step calls run first; then one measured call.
3. **Figures**: s/step = median of the measured call's step durations (step-end callbacks) without the first
   step — UNet + sampler only; s/image = the whole measured call (text, VAE encode, sampling, VAE decode);
   load = construction to ready; RSS = ``ru_maxrss`` after loading and at the end. UNet FLOPs per step are
   counted once by ``torch.utils.flop_counter`` on the meta device and divided by s/step; the machine's
   matmul throughput is the best of a few large square matmuls of the same dtype and threads.
4. **Load memory**, per model and precision: the peak resident memory of a fresh ``ldm-inpaint`` process that
   loads the ``.ckpt`` and inpaints one 64x64 step (what ``/usr/bin/time -v`` reports), over the file's size.
   ``--load-memory`` measures only this.

Writes ``benchmark-N.json`` (every raw measurement, machine info) and ``benchmark-N.md`` (the table) to
``--out`` without overwriting, and prints the table. Exit status 1 when a run failed (reported, not raised).
"""

import sys

from benchmarking.main import main

if __name__ == "__main__":
    sys.exit(main())
