"""``ldm-inpaint serve``: one checkpoint behind the HTTP APIs that clients already speak (Cog / Replicate,
the Azure ML endpoint, the AUTOMATIC1111 subset that editor plug-ins use), the server's own jobs API with
server-sent events, and a web page to draw masks on.

Every route turns its request into :class:`~ldm_inpaint.options.InpaintOptions` (the one request schema) and
images, queues a job on the one worker that owns the pipeline (:mod:`.jobs`), and answers in its protocol's
form; the images are the ones the command line makes for the same options and seed. Needs the ``serve``
extra (FastAPI, uvicorn).
"""
