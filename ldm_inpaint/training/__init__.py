"""``ldm-inpaint train``: fine-tune or inpaint-ify a latent diffusion model, on one process or many (torchrun).

Read in data-flow order: :mod:`.settings` (what a run is), :mod:`.data` (images, captions, masks ->
samples), :mod:`.batches` (the original ``AddMask``: one mask per image, masked image, caption dropout),
:mod:`.objective` (the loss, built with the inference conditioning), :mod:`.loop` (step, accumulate, clip,
update, EMA, log, save), :mod:`.outputs` (checkpoints in the original layout and the resume state).
"""
