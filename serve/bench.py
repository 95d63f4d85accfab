"""``clfpipe bench``: a latency/throughput sweep over concurrency, in the manner of perf_analyzer.

Each level runs `concurrency` closed-loop clients (one thread and one client each) that send
requests of `batch` encoded images; client latencies give p50/p90/p95/p99, and deltas of
Triton's statistics extension give the server-side split (queue, compute input/infer/output)
and the mean executed batch size of each composing model.

Unless a fixed number of requests or seconds is asked for, a level is measured the way
perf_analyzer does: windows of `window_s` seconds until three in a row agree within 10% on
throughput and p50 latency (or `max_windows` have run); the level reports those three windows.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from clfpipe.contract import tensors
from clfpipe.contract.dataset import image_problem
from clfpipe.contract.errors import ServeError
from clfpipe.contract.manifest import atomic_write_bytes
from clfpipe.contract.recipe import MAX_BATCH_SIZE
from clfpipe.serve.client import PROTOCOLS, describe, encoded_batch, model_config, not_triton, server_error, unreachable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Level:
    concurrency: int
    requests: int
    images: int
    seconds: float
    throughput: float  # images/s
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    errors: int
    server: dict[str, Any] = field(default_factory=dict)  # per model: queue/compute us per request, mean batch
    windows: int = 1  # measurement windows run
    stable: bool | None = None  # three windows in a row agreed (None: a fixed amount was asked for)


@dataclass(frozen=True)
class Window:
    """Raw figures of one measurement: client latencies (s), errors, wall seconds, server statistics."""

    latencies: list[float]
    errors: int
    wall: float
    before: dict[str, dict]
    after: dict[str, dict]


def percentiles(latencies_s: Sequence[float]) -> dict[str, float]:
    values = np.asarray(latencies_s) * 1000.0
    return {f"p{q}_ms": float(np.percentile(values, q)) for q in (50, 90, 95, 99)}


def _client(url: str, protocol: str):
    return httpclient.InferenceServerClient(url, network_timeout=300, connection_timeout=300) if protocol == "http" \
        else grpcclient.InferenceServerClient(url)


def model_stats(client, protocol: str, model: str) -> dict[str, float]:
    """One model's cumulative statistics (counts, and ns per phase) from Triton's statistics extension."""
    raw = client.get_inference_statistics(model, as_json=True) if protocol == "grpc" else client.get_inference_statistics(model)
    stats = raw["model_stats"][0]
    inf = stats["inference_stats"]
    ns = lambda key: float(inf.get(key, {}).get("ns", 0))  # noqa: E731
    count = lambda key: float(inf.get(key, {}).get("count", 0))  # noqa: E731
    return {"inference_count": float(stats.get("inference_count", 0)), "execution_count": float(stats.get("execution_count", 0)),
            "success": count("success"), "queue_ns": ns("queue"), "compute_input_ns": ns("compute_input"),
            "compute_infer_ns": ns("compute_infer"), "compute_output_ns": ns("compute_output")}


def settled_stats(read: Callable[[], dict[str, dict]], before: dict[str, dict], images: int,
                  timeout: float = 2.0) -> dict[str, dict]:
    """The statistics once every model counts the `images` answered since `before`: Triton records
    a step's figures after its response has gone out, so a read at once missed the last few (61 of
    64 under load). Past `timeout`, what is there."""
    deadline = time.perf_counter() + timeout
    while True:
        after = read()
        if all(after[m]["inference_count"] - before[m]["inference_count"] >= images for m in after) \
                or time.perf_counter() > deadline:
            return after
        time.sleep(0.01)


def sample_evenly(paths: Sequence[Path], most: int) -> list[Path]:
    """At most ``most`` of paths, spread evenly over them in their order (every class of a sorted
    folder has its share), the same ones every run."""
    if len(paths) <= most:
        return list(paths)
    return [paths[i * len(paths) // most] for i in range(most)]


def load_images(paths: Sequence[Path]) -> list[bytes]:
    """The encoded images a sweep sends, each first checked as training and the server read it
    (``image_problem``): with a bad one among them, its requests would fail and the figures would
    count only the others."""
    for path in paths:
        if (problem := image_problem(path)) is not None:
            raise ServeError(f"bench: {path}: {problem}: expected only images the server answers "
                             "('clfpipe data check' finds the others in a data folder)")
    return [path.read_bytes() for path in paths]


def composing_models(client, protocol: str, model: str) -> list[str]:
    steps = model_config(client, protocol, model).get("ensemble_scheduling", {}).get("step", [])
    return [model] + [s["model_name"] for s in steps]


def server_split(before: dict[str, dict], after: dict[str, dict]) -> dict[str, Any]:
    """Per model: mean queue and compute times per request (us) and mean executed batch size."""
    split = {}
    for model in after:
        d = {k: after[model][k] - before[model][k] for k in after[model]}
        requests = max(d["success"], 1.0)
        split[model] = {
            "queue_us": d["queue_ns"] / requests / 1e3,
            "compute_input_us": d["compute_input_ns"] / requests / 1e3,
            "compute_infer_us": d["compute_infer_ns"] / requests / 1e3,
            "compute_output_us": d["compute_output_ns"] / requests / 1e3,
            "inference_count": d["inference_count"],
            "execution_count": d["execution_count"],
            "mean_batch": d["inference_count"] / d["execution_count"] if d["execution_count"] else None,
        }
    return split


def measure(url: str, protocol: str, model: str, images: Sequence[bytes], *, concurrency: int, batch: int = 1,
            requests: int | None = None, seconds: float | None = None, parameters: dict | None = None) -> Window:
    """`concurrency` closed-loop clients: `requests` in total, or as many as fit in `seconds`."""
    monitor = _client(url, protocol)
    models = composing_models(monitor, protocol, model)
    before = {m: model_stats(monitor, protocol, m) for m in models}
    latencies: list[float] = []
    errors: list[Any] = [0, None]  # how many failed, and the first one's message
    lock = threading.Lock()
    counter = iter(range(requests if requests is not None else 10**12))
    deadline = time.perf_counter() + seconds if seconds is not None else None

    def worker(worker_id: int) -> None:
        client = _client(url, protocol)
        lib = httpclient if protocol == "http" else grpcclient
        position = worker_id * batch
        while True:
            with lock:
                if next(counter, None) is None or (deadline is not None and time.perf_counter() > deadline):
                    return
            chunk = [images[(position + i) % len(images)] for i in range(batch)]
            position += batch * concurrency
            data = encoded_batch(chunk)
            tensor = lib.InferInput(tensors.IMAGE, list(data.shape), "BYTES")
            tensor.set_data_from_numpy(data)
            start = time.perf_counter()
            try:
                client.infer(model, [tensor], outputs=[lib.InferRequestedOutput(tensors.SCORES)], parameters=parameters)
            except InferenceServerException as exc:
                with lock:
                    errors[0] += 1
                    errors[1] = errors[1] or re.sub(r"^\[request id: [^\]]*\]\s*", "", (exc.message() or str(exc)).strip())
                continue
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    after = settled_stats(lambda: {m: model_stats(monitor, protocol, m) for m in models}, before, len(latencies) * batch)
    if not latencies:
        raise ServeError(f"bench: every request to {model!r} failed at concurrency {concurrency} ({errors[0]} errors; "
                         f"the first: {errors[1]})")
    return Window(latencies, errors[0], wall, before, after)


def level_of(windows: Sequence[Window], concurrency: int, batch: int, *, ran: int = 1, stable: bool | None = None) -> Level:
    """One level from consecutive windows: their latencies pooled, the server split across them."""
    latencies = [x for w in windows for x in w.latencies]
    wall = sum(w.wall for w in windows)
    return Level(concurrency, len(latencies), len(latencies) * batch, wall, len(latencies) * batch / wall,
                 errors=sum(w.errors for w in windows), server=server_split(windows[0].before, windows[-1].after),
                 windows=ran, stable=stable, **percentiles(latencies))


def run_level(url: str, protocol: str, model: str, images: Sequence[bytes], *, concurrency: int, batch: int = 1,
              requests: int | None = None, seconds: float | None = None, parameters: dict | None = None) -> Level:
    """One concurrency level of a fixed size: `requests` in total, or as many as fit in `seconds`."""
    window = measure(url, protocol, model, images, concurrency=concurrency, batch=batch, requests=requests,
                     seconds=seconds, parameters=parameters)
    return level_of([window], concurrency, batch)


def agree(values: Sequence[float], tolerance: float) -> bool:
    """perf_analyzer's stability test: every value within tolerance of their mean."""
    mean = float(np.mean(values))
    return mean > 0 and all(abs(v - mean) <= tolerance * mean for v in values)


def stable_level(url: str, protocol: str, model: str, images: Sequence[bytes], *, concurrency: int, batch: int = 1,
                 window_s: float = 2.0, max_windows: int = 10, tolerance: float = 0.1) -> Level:
    """Windows until the last three agree within `tolerance` on throughput and p50, or `max_windows`."""
    windows: list[Window] = []
    for _ in range(max(3, max_windows)):
        windows.append(measure(url, protocol, model, images, concurrency=concurrency, batch=batch, seconds=window_s))
        last = windows[-3:]
        if len(last) == 3 and agree([len(w.latencies) * batch / w.wall for w in last], tolerance) \
                and agree([float(np.median(w.latencies)) for w in last], tolerance):
            return level_of(last, concurrency, batch, ran=len(windows), stable=True)
    log.warning("bench: concurrency %d not stable after %d windows of %.1fs (3 in a row within %d%%): reporting the last 3",
                concurrency, len(windows), window_s, round(tolerance * 100))
    return level_of(windows[-3:], concurrency, batch, ran=len(windows), stable=False)


# option -> (least, most): nan passed "at least" and then measured forever, as inf would
AMOUNTS = {"--requests": (1, 10_000_000), "--seconds": (1e-3, 3600.0), "--window": (1e-3, 600.0),
           "--batch": (1, MAX_BATCH_SIZE), "--max-windows": (3, 1000), "--max-images": (1, 1_000_000)}


def check_amounts(values: dict[str, float | None]) -> None:
    """Each given amount finite and within its bounds (``AMOUNTS``); None is not given."""
    for name, value in values.items():
        least, most = AMOUNTS[name]
        if value is not None and not (math.isfinite(value) and least <= value <= most):
            raise ServeError(f"{name}: expected {least} to {most}, got {value}")


MAX_CONCURRENCY = 1024  # clients a level: 99999 threads and connections ran for minutes without a word


def check_sweep(protocol: str, concurrencies: Sequence[int], *, batch: int, requests: int | None, seconds: float | None,
                window_s: float, max_windows: int) -> None:
    """What a sweep is given, each within bounds, before any request (``sweep`` calls it too)."""
    if protocol not in PROTOCOLS:
        raise ServeError(f"--protocol: expected http or grpc, got {protocol!r}")
    if requests is not None and seconds is not None:
        raise ServeError("bench: expected at most one of --requests and --seconds")
    check_amounts({"--requests": requests, "--seconds": seconds, "--window": window_s, "--batch": batch,
                   "--max-windows": max_windows})
    for c in concurrencies:  # each client is a thread with its own connection
        if not 1 <= c <= MAX_CONCURRENCY:
            raise ServeError(f"--concurrency: expected 1 to {MAX_CONCURRENCY} clients a level, got {c}")


def sweep(url: str, model: str, images: Sequence[bytes], *, protocol: str = "http", concurrencies: Sequence[int] = (1, 2, 4, 8, 16),
          batch: int = 1, requests: int | None = None, seconds: float | None = None, window_s: float = 2.0,
          max_windows: int = 10) -> list[Level]:
    """Every level in turn: a fixed amount when `requests` or `seconds` is given, else until stable."""
    check_sweep(protocol, concurrencies, batch=batch, requests=requests, seconds=seconds, window_s=window_s,
                max_windows=max_windows)
    try:
        config = model_config(_client(url, protocol), protocol, model)
    except InferenceServerException as exc:
        raise server_error(exc, url, protocol, model) from exc
    except (ConnectionError, OSError) as exc:
        raise unreachable(url, protocol, exc) from exc
    except Exception as exc:  # not Triton's endpoint for this protocol
        raise not_triton(url, protocol, exc) from exc
    max_batch = describe(config, model, url).max_batch_size  # a model this sweep's requests fit: encoded images in
    if batch > max_batch:
        raise ServeError(f"--batch: expected at most {max_batch} (the max_batch_size of {model!r}), got {batch}")
    levels = []
    for c in concurrencies:
        if requests is None and seconds is None:
            level = stable_level(url, protocol, model, images, concurrency=c, batch=batch, window_s=window_s,
                                 max_windows=max_windows)
        else:
            level = run_level(url, protocol, model, images, concurrency=c, batch=batch, requests=requests, seconds=seconds)
        levels.append(level)
        log.info("%s", format_level(level, model))
    return levels


def format_level(level: Level, model: str) -> str:
    parts = [f"concurrency {level.concurrency:>3}: {level.throughput:8.1f} img/s, p50 {level.p50_ms:7.1f} ms, "
             f"p90 {level.p90_ms:7.1f}, p95 {level.p95_ms:7.1f}, p99 {level.p99_ms:7.1f}"]
    for name, s in level.server.items():
        if name == model or s["mean_batch"] is None:
            continue
        parts.append(f"{name}: queue {s['queue_us'] / 1e3:.1f} ms, infer {s['compute_infer_us'] / 1e3:.1f} ms, "
                     f"batch {s['mean_batch']:.2f}")
    return " | ".join(parts)


def write_results(levels: list[Level], out_dir: Path, model: str) -> dict[str, Path]:
    """bench.json, bench.csv and bench.png (latency vs throughput) in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench.json", "csv": out_dir / "bench.csv", "png": out_dir / "bench.png"}
    atomic_write_bytes(paths["json"], (json.dumps({"model": model, "levels": [asdict(l) for l in levels]}, indent=2) + "\n").encode())
    buf = io.StringIO()
    writer = csv.writer(buf)
    fields = ["concurrency", "requests", "images", "seconds", "throughput", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "errors",
              "windows", "stable"]
    writer.writerow(fields + ["server_mean_batch"])
    for level in levels:
        batches = {m: s["mean_batch"] for m, s in level.server.items() if s["mean_batch"] is not None and m != model}
        writer.writerow([getattr(level, f) for f in fields] + [json.dumps(batches)])
    atomic_write_bytes(paths["csv"], buf.getvalue().encode())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ordered = sorted(levels, key=lambda level: level.concurrency)  # a line from the lowest load to the highest
    for q in ("p50_ms", "p95_ms", "p99_ms"):
        ax.plot([l.throughput for l in ordered], [getattr(l, q) for l in ordered], marker="o", label=q[:3])
    for l in ordered:
        ax.annotate(f"c={l.concurrency}", (l.throughput, l.p50_ms), textcoords="offset points", xytext=(5, -12), fontsize=8)
    ax.set_xlabel("throughput (images/s)")
    ax.set_ylabel("latency per request (ms)")
    ax.set_title(f"{model}: latency vs throughput, by concurrency (c)")
    ax.margins(x=0.08, y=0.12)  # room for the labels of the end points
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=100)
    plt.close(fig)
    return paths
