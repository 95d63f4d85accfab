"""The torch engines: an AOTInductor package (``aoti``), or the exported program itself run by torch
(``torch``), on CUDA when there is one, else the CPU.

Loading an AOTInductor package has crashed a whole process (a segfault on an H100 with torch
2.11), so ``load_check`` loads and runs a package in a child process first: export and ``serve
up`` only trust a package that came back with outputs.

    python -m clfpipe.runtime.torch_engine ENGINE PATH INPUTS.npy OUTPUTS.npy   (the child's side)
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from clfpipe.contract.engines import Prepare, chunks, in_chunks, unchanged
from clfpipe.contract.probabilities import activate

Runner = Callable[[np.ndarray], np.ndarray]


def device_here() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_module(engine: str, path: Path, device: torch.device | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The artifact as a function of a tensor batch on `device` (the variant's input form)."""
    device = device or device_here()
    if device.type == "cuda":
        # fp32 graphs are gated exactly against PyTorch fp32: no TF32 in cuDNN's convolutions or
        # cuBLAS (on by default for convolutions); fp16/bf16 graphs are not affected
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    if engine == "aoti":
        return torch._inductor.aoti_load_package(str(path))
    if engine == "torch":
        module = torch.export.load(str(path)).module().to(device)
        # uint8 NHWC permuted inside the graph is channels_last already: the weights follow
        return module.to(memory_format=torch.channels_last) if device.type == "cuda" else module
    raise ValueError(f"expected engine aoti or torch, got {engine!r}")


def load(engine: str, path: Path, device: torch.device | None = None) -> Runner:
    """A function from a numpy batch (the variant's input form) to numpy float32 outputs."""
    device = device or device_here()
    module = load_module(engine, path, device)

    @torch.inference_mode()
    def run(batch: np.ndarray) -> np.ndarray:
        return module(torch.from_numpy(np.ascontiguousarray(batch)).to(device)).float().cpu().numpy()

    return run


def save_prepared(path: Path, pixels: np.ndarray, prepare: Prepare | None) -> None:
    """`pixels` prepared into an .npy file a chunk at a time, through a memory map: the child's
    whole input is never in this process's memory at once."""
    prepare = prepare or unchanged
    first = prepare(pixels[:1])  # the prepared form's dtype and shape
    out = np.lib.format.open_memmap(path, mode="w+", dtype=first.dtype, shape=(len(pixels), *first.shape[1:]))
    for start, chunk in chunks(pixels):
        out[start : start + len(chunk)] = prepare(chunk)
    out.flush()


def seconds_per_batch(runner: Runner, batch: np.ndarray, rounds: int = 5) -> float:
    """Median seconds of `rounds` calls on one batch, after one warm-up call."""
    runner(batch)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        runner(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load_check(engine: str, path: Path, inputs: np.ndarray, timeout: float = 600.0) -> tuple[np.ndarray | None, str]:
    """Load and run the artifact in a child process: (its outputs, "") or (None, why it failed)."""
    outputs, why, _ = run_in_child(engine, path, inputs, None, timeout)
    return outputs, why


def profile_in_child(engine: str, path: Path, batch: np.ndarray, timeout: float = 600.0) -> float | None:
    """Seconds per call on `batch`, measured in a child process (None if it failed)."""
    return run_in_child(engine, path, batch[:1], batch, timeout)[2]


def run_in_child(engine: str, path: Path, inputs: np.ndarray, profile: np.ndarray | None,
                 timeout: float = 600.0, prepare: Prepare | None = None) -> tuple[np.ndarray | None, str, float | None]:
    """One child process loads the artifact, runs `inputs` (each chunk through `prepare` first) and,
    given a `profile` batch, times it: (outputs, "", seconds per call or None) or (None, why it failed, None)."""
    with tempfile.TemporaryDirectory() as tmp:
        given, out, timing = Path(tmp) / "inputs.npy", Path(tmp) / "outputs.npy", Path(tmp) / "timing.json"
        save_prepared(given, inputs, prepare)
        args = [sys.executable, "-m", "clfpipe.runtime.torch_engine", engine, str(path), str(given), str(out)]
        if profile is not None:
            np.save(Path(tmp) / "profile.npy", profile)
            args += [str(Path(tmp) / "profile.npy"), str(timing)]
        try:
            result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"loading it did not finish in {timeout:.0f}s", None
        if result.returncode != 0:
            how = f"killed by signal {-result.returncode}" if result.returncode < 0 else f"exit {result.returncode}"
            last = (result.stderr.strip().splitlines() or [""])[-1]
            return None, f"loading it failed ({how}){': ' + last if last else ''}", None
        seconds = json.loads(timing.read_text())["seconds_per_batch"] if profile is not None else None
        return np.load(out), "", seconds


class TorchProbabilities:
    """A torch artifact -> probabilities, as the served backbone computes them, from host pixels
    (``__call__``) or from pixels already on the device (``on_device``: the fused decode step)."""

    def __init__(self, engine: str, path: Path, activation: str = "softmax") -> None:
        activate(np.zeros((1, 1)), activation)  # an unknown name fails here, not on the first request
        self.device = device_here()
        self.module, self.activation = load_module(engine, path, self.device), activation

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any], model_dir: Path) -> "TorchProbabilities":
        value = lambda key: parameters[key]["string_value"]  # noqa: E731
        return cls(value("engine"), model_dir / value("model_file"), value("activation"))

    @torch.inference_mode()
    def on_device(self, pixels: torch.Tensor) -> np.ndarray:
        outputs = self.module(pixels.to(self.device)).float().cpu().numpy()
        return activate(outputs, self.activation).astype(np.float32)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.on_device(torch.from_numpy(np.ascontiguousarray(batch)))

    def close(self) -> None:
        self.module = None  # type: ignore[assignment]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _child(argv: list[str]) -> int:
    engine, path, given, out, *profile = argv
    runner = load(engine, Path(path))
    # mapped, and copied a chunk at a time (torch takes no read-only array)
    np.save(out, in_chunks(runner, np.load(given, mmap_mode="r"), prepare=np.array))
    if profile:
        batch, timing = profile
        Path(timing).write_text(json.dumps({"seconds_per_batch": seconds_per_batch(runner, np.load(batch))}))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
