"""What the benchmark's parent process asks of its worker processes, and how it runs one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# The entry point each worker process runs (``--worker``).
SCRIPT = Path(__file__).resolve().parents[1] / "benchmark.py"


@dataclass(frozen=True)
class PrepareJob:
    """Write the random checkpoint and (``with_diffusers``) its diffusers folder for one config, unless already
    there."""

    config: str
    seed: int
    checkpoint: str
    diffusers_dir: str
    with_diffusers: bool = True

    def done(self) -> bool:
        """Whether every file it writes is there."""
        diffusers_done = (Path(self.diffusers_dir) / "model_index.json").exists()
        return Path(self.checkpoint).exists() and (diffusers_done or not self.with_diffusers)


@dataclass(frozen=True)
class MatmulJob:
    """Measure (size x size) @ (size x size) matmuls in each of ``precisions``."""

    precisions: list[str]
    device: str
    size: int
    reps: int


@dataclass(frozen=True)
class RunJob:
    """Load one implementation and time one inpainting call."""

    implementation: str
    config: str
    checkpoint: str
    diffusers_dir: str
    size: int
    steps: int
    precision: str
    device: str
    seed: int
    warmup_calls: int
    compile: bool
    same_allocator: bool
    lean_memory: bool


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def worker_environment(threads: int) -> dict[str, str]:
    """This process's environment with ``threads`` threads for OpenMP and MKL, and no network for the hub."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }


def spawn(kind: str, job: Any, threads: int, timeout: float) -> dict[str, Any]:
    """Run ``job`` in a fresh interpreter; its result, or ``{"error": ...}`` if it failed or timed out."""
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / "result.json"
        request = {"kind": kind, "job": asdict(job), "threads": threads, "result": str(result)}
        command = [sys.executable, str(SCRIPT), "--worker", json.dumps(request)]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, env=worker_environment(threads)
            )
        except subprocess.TimeoutExpired:
            return {"error": f"{kind} worker timed out after {timeout:g} s"}
        if done.returncode != 0 or not result.exists():
            lines = done.stderr.strip().splitlines() or ["(no output)"]
            return {
                "error": f"{kind} worker exited with status {done.returncode}: {lines[-1]}",
                "stderr_tail": lines[-20:],
            }
        return json.loads(result.read_text())
