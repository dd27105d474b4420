"""``ldm-inpaint eval``: inpainting models measured as the papers do (LDM paper Sec. 4.5, following LaMa).

Read in protocol order: :mod:`.masks` (LaMa's evaluation masks and crops), :mod:`.predict` (every crop/mask
pair inpainted with the protocol's defaults), :mod:`.features` and :mod:`.metrics` (FID, LPIPS, SSIM, PSNR as
functions over features and pixels), :mod:`.score` (overall and by mask area), :mod:`.report`, :mod:`.run`
(the whole protocol).
"""
