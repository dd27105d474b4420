"""Load memory: the peak resident memory of a fresh ``ldm-inpaint`` process that loads a ``.ckpt`` and inpaints
one 64x64 step, over the file's size.

The command is the one users run, in a process of its own, and its peak is the kernel's account of that
process alone (``wait4``'s ``ru_maxrss``, the figure ``/usr/bin/time -v`` reports as "Maximum resident set
size"): imports, the memory-mapped file's pages as they are read, copies made while loading (casts, packed
convolutions) and the step itself.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .jobs import worker_environment
from .runs import rss_bytes, sample_inputs

SIZE = 64  # pixels: one latent of 8x8, so that the step adds next to nothing to the weights


def cli_command(checkpoint: str, config: str, precision: str, device: str, folder: Path) -> list[str]:
    """``ldm-inpaint`` inpainting one SIZE x SIZE step with the checkpoint (as ``python -m``, so that it runs
    in this interpreter's environment)."""
    image, mask = sample_inputs(SIZE)
    image.save(folder / "image.png")
    mask.save(folder / "mask.png")
    return [
        *(sys.executable, "-m", "ldm_inpaint.cli", "--ckpt", checkpoint, "--config", config),
        *("--image", str(folder / "image.png"), "--mask", str(folder / "mask.png"), "--outdir", str(folder)),
        *("--steps", "1", "--height", str(SIZE), "--width", str(SIZE)),
        *("--precision", precision, "--device", device),
    ]


def measure_load_memory(
    files: dict[str, Any], precision: str, device: str, threads: int, timeout: float
) -> dict:
    """The command's peak resident memory in bytes, the file's size and their ratio; or ``{"error": ...}``."""
    if "error" in files:
        return {"error": f"files not prepared: {files['error']}"}
    with tempfile.TemporaryDirectory() as folder:
        command = cli_command(files["checkpoint"], files["config"], precision, device, Path(folder))
        with open(Path(folder) / "output.txt", "w+") as output:
            process = subprocess.Popen(
                command, stdout=output, stderr=subprocess.STDOUT, env=worker_environment(threads)
            )
            ended = wait_with_usage(process, timeout)
            output.seek(0)
            lines = output.read().strip().splitlines() or ["(no output)"]
    if ended is None:
        return {"error": f"ldm-inpaint timed out after {timeout:g} s"}
    status, peak = ended
    if status != 0:
        return {"error": f"ldm-inpaint exited with status {status}: {lines[-1]}", "output_tail": lines[-20:]}
    file_bytes = Path(files["checkpoint"]).stat().st_size
    return {
        "command": shlex.join(["ldm-inpaint", *command[3:]]),
        "file_bytes": file_bytes,
        "peak_rss_bytes": peak,
        "ratio": peak / file_bytes,
    }


def wait_with_usage(process: subprocess.Popen, timeout: float) -> tuple[int, int] | None:
    """Wait for ``process`` (killed after ``timeout`` seconds: None); its exit status and peak resident memory
    in bytes, from ``wait4``, which reports on that one child."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
            return process.returncode, rss_bytes(usage.ru_maxrss)
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            return None
        time.sleep(0.05)
