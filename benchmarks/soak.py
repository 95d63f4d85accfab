"""Soak and fault figures of the embedded server with its supervisor.

    python benchmarks/soak.py [--run RUN_DIR] [--minutes 2] [--concurrency 32] [--bad 0.3]

Serves a run (default: resnet34 at 64 px with its initial weights, so the figures are about the
server, not the model) and sends requests from `concurrency` closed-loop HTTP clients for
`minutes`: a share `bad` of them malformed (junk bytes, truncated JPEGs, a lying header, a
100000x1 PNG), the rest real JPEGs. Halfway it kills the `preprocess` python stub with SIGKILL.
Prints one JSON object:

- good_errors_outside_recovery: good requests that failed before the kill or after recovery (goal 0);
- recovery_s: from the kill to the last failed good request (goal <= 10);
- bad_outside_recovery_400: malformed requests outside the recovery window answered HTTP 400, the
  client's fault (goal: all of `bad_outside_recovery`; in the window a 500 or a refused connection);
- rss_growth: the server's and stubs' resident memory at the end of the first half over the same
  after warm-up, minus 1 (goal < 0.10); bad requests answered with an error count as answered.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import struct
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from clfpipe.contract.recipe import load_recipe
from clfpipe.demo_data import DemoSpec, write_demo_dataset
from clfpipe.pipeline import repository_for_run
from clfpipe.serve.client import REFUSED_STATUS, encoded_batch
from clfpipe.serve.server import Ports, read_info, start_server, stop_server, stub_pid
from clfpipe.train.loop import init_run


def build_run(root: Path) -> Path:
    data = root / "data"
    write_demo_dataset(data, spec=DemoSpec(train_per_class=4, valid_per_class=10, image_size=160))
    return init_run(data, root / "run", load_recipe(None, ["stages.0.size=64"]))


def bad_payloads(good: bytes) -> list[bytes]:
    lying = bytearray(good)
    sof = lying.find(b"\xff\xc0")
    lying[sof + 5 : sof + 9] = struct.pack(">HH", 7999, 7999)
    body = zlib.compress(b"".join(b"\x00" + bytes(100_000) for _ in range(1)))
    ihdr = struct.pack(">IIBBBBB", 100_000, 1, 8, 0, 0, 0, 0)
    chunk = lambda k, b: struct.pack(">I", len(b)) + k + b + struct.pack(">I", zlib.crc32(k + b))  # noqa: E731
    wide_png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    return [b"junk" * 10, good[: len(good) // 3], bytes(lying), wide_png, b""]


def group_rss_mb(pgid: int) -> float:
    """Resident memory of every process in the server's process group (server and stubs)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e6


def load(url: str, images: list[bytes], bad: list[bytes], share_bad: float, concurrency: int, until: float,
         records: list) -> None:
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        client = httpclient.InferenceServerClient(url, network_timeout=30, connection_timeout=30)
        while time.time() < until:
            is_bad = rng.random() < share_bad
            payload = bad[rng.integers(len(bad))] if is_bad else images[rng.integers(len(images))]
            tensor = httpclient.InferInput("IMAGE", [1, 1], "BYTES")
            tensor.set_data_from_numpy(encoded_batch([payload]))
            start = time.time()
            try:
                client.infer("classifier", [tensor])
                ok, status = True, "200"
            except Exception as exc:  # noqa: BLE001 - any failure of a request is a failed request here
                ok, status = False, exc.status() if isinstance(exc, InferenceServerException) else type(exc).__name__
                if not is_bad:
                    time.sleep(0.05)  # a server that is down refuses at once: do not spin
            with lock:
                records.append((start, time.time(), is_bad, ok, str(status)))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path)
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--bad", type=float, default=0.3, help="share of malformed requests")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of load before the first RSS reading")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run or build_run(Path(tmp))
        repo = repository_for_run(run_dir)
        files = sorted(Path(tmp).rglob("valid/*/*.jpg")) if args.run is None else sorted(Path(run_dir).parent.rglob("*.jpg"))[:64]
        images = [f.read_bytes() for f in files]
        if not images:
            buf = io.BytesIO()
            Image.new("RGB", (320, 240), (90, 120, 150)).save(buf, format="JPEG")
            images = [buf.getvalue()]
        state = Path(tmp) / "state"
        info = start_server(repo, state, ports=Ports.free())
        records: list = []
        try:
            half = args.minutes * 30.0
            start = time.time()
            loader = threading.Thread(target=load, args=(info.http_url, images, bad_payloads(images[0]), args.bad,
                                                         args.concurrency, start + args.warmup + 2 * half, records))
            loader.start()
            time.sleep(args.warmup)
            rss_warm = group_rss_mb(read_info(state).pid)
            time.sleep(half)
            rss_half = group_rss_mb(read_info(state).pid)
            victim = stub_pid(read_info(state).pid, "preprocess")
            killed_at = time.time()
            if victim:
                os.kill(victim, signal.SIGKILL)
            loader.join()
            restarts = read_info(state).restarts
            supervisor_log = (state / "supervisor.log").read_text()
            if os.environ.get("CLFPIPE_SUPERVISOR_DEBUG"):
                print(supervisor_log[-6000:])
        finally:
            stop_server(state)
    good_failures = [r for r in records if not r[2] and not r[3]]
    after_kill = [r for r in good_failures if r[1] >= killed_at]
    recovered_at = max((r[1] for r in after_kill), default=killed_at)
    outside = [r for r in good_failures if r[1] < killed_at or r[0] > recovered_at]
    good = [r for r in records if not r[2]]
    bad_outside = [r for r in records if r[2] and (r[1] < killed_at or r[0] > recovered_at)]
    print(json.dumps({
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "minutes": args.minutes, "concurrency": args.concurrency,
        "requests": len(records), "good": len(good), "bad": len(records) - len(good),
        "bad_answered_with_error": sum(1 for r in records if r[2] and not r[3]),
        "bad_outside_recovery": len(bad_outside), "bad_outside_recovery_400": sum(1 for r in bad_outside if r[4] in REFUSED_STATUS),
        "good_failed_status": dict(Counter(r[4] for r in good_failures)),
        "good_failed": len(good_failures), "good_errors_outside_recovery": len(outside),
        "killed": "preprocess stub" if victim else "none found", "restarts": len(restarts),
        "restart_log": [line.split(" ", 2)[1][:8] + " " + line.split(" ", 3)[3][:60] for line in supervisor_log.splitlines()
                        if "restart" in line or "serving again" in line],
        "killed_at": time.strftime("%H:%M:%S", time.localtime(killed_at)),
        "recovery_s": round(recovered_at - killed_at, 2),
        "rss_mb_after_warmup": round(rss_warm, 1), "rss_mb_before_kill": round(rss_half, 1),
        "rss_growth": round(rss_half / rss_warm - 1, 4),
        "good_img_s": round(len(good) / (args.minutes * 60 + args.warmup), 1),
    }))


if __name__ == "__main__":
    main()
