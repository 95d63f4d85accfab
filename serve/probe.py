"""Readiness that means a real request works: a tiny image through every served ensemble.

Triton's own ``/v2/health/ready`` keeps answering 200 after a python stub dies, while every request
through that stub fails (triton-inference-server/server#8604). This probe sends a generated 32x24
PNG through each ensemble that takes encoded images and a 24x32 pixel array through each that
takes pixels, and checks the probabilities that come back.

Standard library only (urllib, json, zlib): the container target ships this file beside its models
for the Kubernetes readiness probe (``python3 /models/clfpipe_probe.py --url localhost:8000``).
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

IMAGE, IMAGE_PIXELS, PROBS = "IMAGE", "IMAGE_PIXELS", "PROBS"  # the served tensors (clfpipe.contract.tensors)
WIDTH, HEIGHT = 32, 24


def probe_pixels() -> list[int]:
    """A 24x32 RGB gradient, row-major HWC."""
    return [v for y in range(HEIGHT) for x in range(WIDTH) for v in (x * 8, y * 10, (x + y) * 4)]


def probe_png() -> bytes:
    """The same gradient as an 8-bit RGB PNG, encoded with zlib."""
    pixels = probe_pixels()
    rows = b"".join(b"\x00" + bytes(pixels[y * WIDTH * 3 : (y + 1) * WIDTH * 3]) for y in range(HEIGHT))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", WIDTH, HEIGHT, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> dict:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except ValueError:
            pass
        raise RuntimeError(f"HTTP {exc.code}: {detail}") from exc


def _get(url: str, timeout: float) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def infer_image(url: str, model: str, data: bytes, timeout: float) -> list[float]:
    """One encoded image through `model` (binary tensor extension for the BYTES input)."""
    element = struct.pack("<I", len(data)) + data
    header = json.dumps({"inputs": [{"name": IMAGE, "shape": [1, 1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(element)}}],
                         "outputs": [{"name": PROBS, "parameters": {"binary_data": False}}]}).encode()
    reply = _post(f"http://{url}/v2/models/{model}/infer", header + element,
                  {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}, timeout)
    return _probs(reply)


def infer_pixels(url: str, model: str, timeout: float) -> list[float]:
    body = json.dumps({"inputs": [{"name": IMAGE_PIXELS, "shape": [1, HEIGHT, WIDTH, 3], "datatype": "UINT8",
                                   "data": probe_pixels()}],
                       "outputs": [{"name": PROBS, "parameters": {"binary_data": False}}]}).encode()
    return _probs(_post(f"http://{url}/v2/models/{model}/infer", body, {"Content-Type": "application/json"}, timeout))


def _probs(reply: dict) -> list[float]:
    for output in reply.get("outputs", []):
        if output.get("name") == PROBS:
            return [float(v) for v in output.get("data", [])]
    raise RuntimeError(f"no {PROBS} output in the reply")


def check_probs(probs: list[float], multi_label: bool) -> str | None:
    """What is wrong with a probability vector, or None."""
    if not probs:
        return "empty probabilities"
    if any(not math.isfinite(p) or p < 0 or p > 1 for p in probs):
        return f"probabilities outside [0, 1]: {probs[:5]}"
    if not multi_label and abs(sum(probs) - 1.0) > 1e-3:
        return f"probabilities sum to {sum(probs):.4f}, not 1"
    return None


def ensembles(url: str, timeout: float) -> dict[str, tuple[str, bool]]:
    """Every served ensemble: name -> (its input tensor, multi_label)."""
    found = {}
    for entry in _post(f"http://{url}/v2/repository/index", b"{}", {"Content-Type": "application/json"}, timeout):
        if entry.get("state", "READY") != "READY":
            continue
        config = _get(f"http://{url}/v2/models/{entry['name']}/config", timeout)
        if config.get("platform") == "ensemble":
            multi = config.get("parameters", {}).get("multi_label", {}).get("string_value", "false") == "true"
            found[entry["name"]] = (config["input"][0]["name"], multi)
    return found


@dataclass
class ProbeResult:
    ok: bool
    failures: dict[str, str] = field(default_factory=dict)  # ensemble -> why it failed

    def summary(self) -> str:
        return "every ensemble answers" if self.ok else "; ".join(f"{m}: {why}" for m, why in self.failures.items())


def _check(url: str, model: str, tensor: str, multi_label: bool, timeout: float) -> str | None:
    try:
        probs = infer_image(url, model, probe_png(), timeout) if tensor == IMAGE else infer_pixels(url, model, timeout)
        return check_probs(probs, multi_label)
    except (OSError, RuntimeError, ValueError) as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def probe(url: str, timeout: float = 5.0, served: dict[str, tuple[str, bool]] | None = None) -> ProbeResult:
    """A real request through every ensemble the server at url (HOST:HTTP_PORT) serves (`served`:
    the ensembles, when already listed), all at once: the probe takes as long as the slowest."""
    if served is None:
        try:
            served = ensembles(url, timeout)
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            return ProbeResult(False, {"server": f"cannot list its models: {exc}"})
    if not served:
        return ProbeResult(False, {"server": "serves no ensemble"})
    with ThreadPoolExecutor(max_workers=len(served)) as pool:
        answers = {m: pool.submit(_check, url, m, tensor, multi, timeout) for m, (tensor, multi) in served.items()}
        failures = {m: why for m, future in answers.items() if (why := future.result()) is not None}
    return ProbeResult(not failures, failures)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="exit 0 when every ensemble answers a real request (readiness probe)")
    parser.add_argument("--url", default="localhost:8000", help="HOST:PORT of Triton's HTTP endpoint")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per request")
    args = parser.parse_args(argv)
    result = probe(args.url, args.timeout)
    print(result.summary(), file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
