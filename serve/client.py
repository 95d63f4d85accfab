"""A Python client over tritonclient (HTTP or gRPC) for the ``classifier`` ensemble."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from clfpipe.dataset import IMAGE_SUFFIXES
from clfpipe.errors import ServeError

PROTOCOLS = ("http", "grpc")
# gRPC caps messages at 4 MB by default (reference section 2, #4972): keep requests below it.
MAX_REQUEST_BYTES = 3_000_000


@dataclass(frozen=True)
class Prediction:
    file: str
    label: str
    prob: float
    probs: list[float]
    top_k: list[tuple[str, float]]

    def to_json(self) -> str:
        return json.dumps({"file": self.file, "label": self.label, "prob": self.prob, "probs": self.probs})


def expand_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, directories expanded to their image files (recursively, sorted)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise ServeError(f"no such file or directory: {path}")
    if not files:
        raise ServeError(f"expected image files, got none in {', '.join(map(str, paths))}")
    return files


def _chunks(items: Sequence[bytes], max_count: int) -> list[tuple[int, int]]:
    """[start, end) ranges of at most max_count items and about MAX_REQUEST_BYTES each."""
    ranges, start, size = [], 0, 0
    for i, item in enumerate(items):
        if i > start and (i - start >= max_count or size + len(item) > MAX_REQUEST_BYTES):
            ranges.append((start, i))
            start, size = i, 0
        size += len(item)
    if start < len(items):
        ranges.append((start, len(items)))
    return ranges


class Classifier:
    """``Classifier(url, protocol, model).predict(paths, top_k)`` against a running Triton."""

    def __init__(self, url: str, protocol: str = "http", model: str = "classifier", timeout: float = 60.0) -> None:
        if protocol not in PROTOCOLS:
            raise ServeError(f"--protocol: expected http or grpc, got {protocol!r}")
        self.url, self.protocol, self.model = url, protocol, model
        self._lib = httpclient if protocol == "http" else grpcclient
        try:
            if protocol == "http":
                self._client = httpclient.InferenceServerClient(url, network_timeout=timeout, connection_timeout=timeout)
            else:
                self._client = grpcclient.InferenceServerClient(url)
            config = self._model_config()
        except InferenceServerException as exc:
            raise self._error(exc) from exc
        except (ConnectionError, OSError) as exc:
            raise ServeError(f"cannot reach Triton at {url} over {protocol}: {exc}") from exc
        params = config.get("parameters", {})
        if "classes" not in params:
            raise ServeError(f"model {model!r} on {url} has no 'classes' parameter: expected a clfpipe repository")
        self.classes: list[str] = json.loads(params["classes"]["string_value"])
        self.max_batch_size = max(1, int(config.get("max_batch_size", 1)))

    def _model_config(self) -> dict[str, Any]:
        if self.protocol == "http":
            return self._client.get_model_config(self.model)
        return self._client.get_model_config(self.model, as_json=True)["config"]

    def _error(self, exc: InferenceServerException) -> ServeError:
        message = exc.message() or str(exc)
        lowered = message.lower()
        if "connect" in lowered or "unavailable" in lowered or "refused" in lowered:
            return ServeError(f"cannot reach Triton at {self.url} over {self.protocol}: {message.splitlines()[0]}")
        if "unknown model" in lowered or "not found" in lowered:
            return ServeError(f"model {self.model!r} is not served at {self.url}: {message.splitlines()[0]}")
        return ServeError(f"server error: {message.splitlines()[0]}")

    def _infer(self, images: Sequence[bytes]) -> np.ndarray:
        data = np.array([[img] for img in images], dtype=np.object_)
        tensor = self._lib.InferInput("IMAGE", list(data.shape), "BYTES")
        if self.protocol == "http":
            tensor.set_data_from_numpy(data, binary_data=True)
            outputs = [httpclient.InferRequestedOutput("PROBS", binary_data=True)]
        else:
            tensor.set_data_from_numpy(data)
            outputs = [grpcclient.InferRequestedOutput("PROBS")]
        result = self._client.infer(self.model, [tensor], outputs=outputs)
        return result.as_numpy("PROBS")

    def probabilities(self, images: Sequence[bytes], names: Sequence[str] | None = None) -> np.ndarray:
        """(N, classes) probabilities for encoded images, batched into few requests."""
        names = names or [f"image {i}" for i in range(len(images))]
        outs = []
        for start, end in _chunks(images, self.max_batch_size):
            try:
                outs.append(self._infer(images[start:end]))
            except InferenceServerException as exc:
                err = self._error(exc)
                raise ServeError(f"{_blame(str(err), names[start:end])}") from exc
        return np.concatenate(outs)

    def predict(self, paths: Sequence[str | Path], top_k: int = 1) -> list[Prediction]:
        files = expand_inputs(paths)
        probs = self.probabilities([f.read_bytes() for f in files], [str(f) for f in files])
        return [self._prediction(str(f), p, top_k) for f, p in zip(files, probs)]

    def _prediction(self, name: str, probs: np.ndarray, top_k: int) -> Prediction:
        order = np.argsort(-probs, kind="stable")[: max(1, top_k)]
        best = int(order[0])
        return Prediction(name, self.classes[best], float(probs[best]), [float(p) for p in probs],
                          [(self.classes[int(i)], float(probs[int(i)])) for i in order])


def _blame(message: str, names: Sequence[str]) -> str:
    """Name the file the server complained about ('image 2 of 4: ...' -> the file's path)."""
    if len(names) == 1:
        return f"{names[0]}: {message}"
    for index, name in enumerate(names):
        tag = f"image {index} of {len(names)}: "
        if tag in message:
            return f"{name}: {message.replace(tag, '')}"
    return f"one of {len(names)} images ({names[0]} ...): {message}"
