"""The server's one worker: it loads the model, owns it, and runs one job at a time from a bounded queue.

A :class:`Job` is what one HTTP request asked for: one or more runs of the pipeline (an Azure request's rows,
an AUTOMATIC1111 request's iterations), each an image, a mask and validated :class:`InpaintOptions`. Its status
goes ``queued`` -> ``processing`` -> ``succeeded`` / ``failed`` / ``canceled``, and every change bumps its
``version`` (the event stream's cue). The worker's step callback (the pipeline's own progress hook) records
the step and the x0 prediction (the preview), and stops the run between two steps when the job is cancelled or
over its time limit, so the worker is free again at once. A run that fails (bad input found late, a
non-finite result, an internal error) fails its job only.

Finished jobs are kept for their clients to collect, the newest ``keep`` of them, without their inputs, so
memory stays flat however many requests come.
"""

from __future__ import annotations

import math
import secrets
import sys
import threading
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL.Image import Image
from torch import Tensor

from ldm_inpaint import image_io
from ldm_inpaint.cli import sample_metadata
from ldm_inpaint.errors import Cancelled, LdmInpaintError
from ldm_inpaint.options import InpaintOptions
from ldm_inpaint.pipeline import InpaintPipeline
from ldm_inpaint.samplers import StepInfo, steps_taken
from ldm_inpaint.serving.infotext import infotext

QUEUED, PROCESSING, SUCCEEDED, FAILED, CANCELED = "queued", "processing", "succeeded", "failed", "canceled"
FINISHED = (SUCCEEDED, FAILED, CANCELED)
ID_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class QueueFull(Exception):  # noqa: N818 - a state, as queue.Full
    """The queue holds ``max_queue`` jobs; ``retry_after`` seconds is a guess at when one is free."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("the queue is full")
        self.retry_after = retry_after


class NotReady(Exception):  # noqa: N818 - a state
    """The model is not loaded (yet, or it failed to load: ``reason``)."""


class JobIdTaken(LdmInpaintError):
    """A client-chosen job id that is taken or malformed."""


@dataclass(frozen=True)
class Model:
    """The loaded pipeline and what its outputs record: the checkpoint's metadata, precision and name."""

    pipeline: InpaintPipeline
    metadata: dict[str, str]
    precision: str


@dataclass(frozen=True)
class Run:
    """One pipeline call: an image and a mask (None for image-to-image / text-to-image) and its options,
    validated, with a concrete seed."""

    image: Image | None
    mask: Image | None
    options: InpaintOptions


@dataclass(frozen=True)
class Output:
    """One image of a finished job: its PNG file (our metadata and the AUTOMATIC1111 infotext as text
    chunks), the options that made it (its own seed) and where it was saved (``--outdir``), if anywhere."""

    png: bytes
    options: InpaintOptions
    infotext: str
    path: Path | None


@dataclass(eq=False)
class Job:
    id: str
    runs: list[Run]
    total: int
    status: str = QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    step: int = 0
    preview: Tensor | None = None
    outputs: list[Output] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    cancel_reason: str | None = None
    timed_out: bool = False
    request: dict = field(default_factory=dict)  # what the protocol echoes back of the request
    version: int = 0
    listeners: set[Callable[[], None]] = field(default_factory=set)

    @property
    def options(self) -> list[InpaintOptions]:
        return [run.options for run in self.runs]

    @property
    def predict_time(self) -> float | None:
        return None if self.started is None or self.finished is None else self.finished - self.started

    def changed(self) -> None:
        """Bump the version and tell the listeners (request handlers waiting on the job: they are woken, not
        polling, so that the server takes no CPU from the run while it waits)."""
        self.version += 1
        for listener in list(self.listeners):
            listener()


class Worker:
    """Loads the model with ``load`` on its own thread, then runs the queued jobs one after another."""

    def __init__(
        self,
        load: Callable[[], Model],
        *,
        max_queue: int,
        job_timeout: float,
        outdir: Path | None = None,
        keep: int = 100,
    ) -> None:
        self._load, self.max_queue, self.job_timeout = load, max_queue, job_timeout
        self.outdir, self.keep = outdir, keep
        self.model: Model | None = None
        self.load_error: str | None = None
        self.current: Job | None = None
        self._queue: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._durations: deque[float] = deque(maxlen=20)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name="ldm-inpaint-worker", daemon=True)

    # -- what request handlers call ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Cancel what is queued or running and stop the thread."""
        with self._cond:
            self._stopping = True
            for job in [*self._queue, *([self.current] if self.current else [])]:
                job.cancel_reason = "the server is shutting down"
            self._cond.notify_all()
        self._thread.join(timeout=60)

    @property
    def ready(self) -> bool:
        return self.model is not None and not self._stopping

    @property
    def timesteps(self) -> int:
        return self._model().pipeline.config.schedule.timesteps

    def submit(self, runs: list[Run], job_id: str | None = None) -> Job:
        """Queue a job of ``runs`` (options already validated); NotReady, QueueFull or JobIdTaken."""
        timesteps = self.timesteps  # NotReady until the model is loaded
        total = sum(
            steps_taken(r.options.sampler, r.options.steps, r.options.strength, timesteps) for r in runs
        )
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(self._retry_after())
            job_id = self._new_id(job_id)
            job = Job(job_id, runs, total)
            self._jobs[job_id] = job
            self._queue.append(job)
            self._cond.notify_all()
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def cancel(self, job_id: str, reason: str = "canceled by the client") -> Job | None:
        """Cancel a job: a queued one at once, a running one after its current step. None if unknown."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.status in FINISHED:
                return job
            job.cancel_reason = job.cancel_reason or reason
            if job in self._queue:
                self._queue.remove(job)
                self._finish(job, CANCELED, job.cancel_reason)
            return job

    def position(self, job: Job) -> int | None:
        """0 while ``job`` runs, 1, 2, ... while it waits (1: next), None once finished."""
        with self._cond:
            if job is self.current:
                return 0
            return next((i + 1 for i, queued in enumerate(self._queue) if queued is job), None)

    def queued(self) -> int:
        """Jobs waiting or running."""
        return len(self._queue) + (self.current is not None)

    def known(self) -> int:
        """Jobs remembered: waiting, running, or finished and not yet forgotten."""
        return len(self._jobs)

    def queue_full(self) -> bool:
        return len(self._queue) >= self.max_queue

    # -- the worker thread -------------------------------------------------------------------------------

    def _model(self) -> Model:
        if self.model is None or self._stopping:
            raise NotReady(self.load_error or "the model is still loading")
        return self.model

    def _new_id(self, job_id: str | None) -> str:
        if job_id is None:
            return secrets.token_hex(8)
        if not 1 <= len(job_id) <= 64 or not set(job_id) <= ID_CHARACTERS:
            raise JobIdTaken(
                f"job id: expected 1 to 64 letters, digits, '-', '_' or '.', found {job_id[:80]!r}"
            )
        if job_id in self._jobs:
            raise JobIdTaken(f"job id {job_id!r} is taken: choose another, or leave it out")
        return job_id

    def _retry_after(self) -> int:
        mean = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return max(1, math.ceil(mean * (len(self._queue) + 1)))

    def _main(self) -> None:
        try:
            self.model = self._load()
        except Exception as error:  # any failure to load is reported by /readyz, never raised into the void
            self.load_error = f"the model failed to load: {error}"
            print(f"ldm-inpaint serve: error: {self.load_error}", file=sys.stderr)
            return
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._queue.popleft()
                self.current, job.status, job.started = job, PROCESSING, time.time()
                job.changed()
            status, error = self._execute(job)
            with self._cond:
                self.current = None
                self._durations.append(time.time() - job.started)
                self._finish(job, status, error)

    def _finish(self, job: Job, status: str, error: str | None) -> None:
        """Mark ``job`` finished, drop its inputs, forget the oldest finished jobs beyond ``keep``."""
        job.status, job.error, job.finished, job.preview = status, error, time.time(), None
        job.runs = [Run(None, None, run.options) for run in job.runs]
        job.changed()
        finished = [key for key, old in self._jobs.items() if old.status in FINISHED]
        for key in finished[: max(0, len(finished) - self.keep)]:
            del self._jobs[key]

    def _execute(self, job: Job) -> tuple[str, str | None]:
        deadline = time.monotonic() + self.job_timeout
        done_before = 0

        def progress(info: StepInfo) -> None:
            job.step = done_before + info.index + 1
            job.preview = info.x0_pred[:1].detach().float().cpu().clone()
            job.changed()
            if time.monotonic() > deadline:
                job.timed_out = True
                job.cancel_reason = f"timed out after {self.job_timeout:g} s (the server's --job-timeout)"
            if job.cancel_reason:
                raise Cancelled(job.cancel_reason)

        try:
            for run in job.runs:
                if job.cancel_reason:
                    raise Cancelled(job.cancel_reason)
                result = self._model().pipeline(run.image, run.mask, run.options, callback=progress)
                done_before = job.step
                if not torch.isfinite(result.images).all():
                    raise LdmInpaintError(
                        "the model gave non-finite values (NaN or infinity); fp16 overflows on some inputs: "
                        "serve with --precision fp32 or bf16"
                    )
                job.notes += result.notes
                job.outputs += self._outputs(job, result)
            return SUCCEEDED, None
        except Cancelled as cancelled:
            return (FAILED if job.timed_out else CANCELED), str(cancelled)
        except LdmInpaintError as error:
            return FAILED, str(error)
        except Exception as error:  # a bug or an out-of-memory fails this job, never the server
            traceback.print_exc(file=sys.stderr)
            return FAILED, f"internal error: {type(error).__name__}: {error}"

    def _outputs(self, job: Job, result) -> list[Output]:
        model = self._model()
        outputs = []
        for index, picture in enumerate(result.to_pil()):
            options = result.options
            text = infotext(options, picture.size, model.metadata)
            metadata = sample_metadata(
                model.metadata, result, index, model.precision, f"request {job.id}", f"request {job.id}"
            )
            metadata["parameters"] = text
            path = None if self.outdir is None else image_io.save_png(picture, self.outdir, job.id, metadata)
            outputs.append(Output(image_io.encode_png(picture, metadata), options, text, path))
        return outputs
