"""A Python client over tritonclient (HTTP or gRPC) for the ``classifier`` ensembles.

With no URL it talks to the server ``clfpipe serve up`` recorded (its host, ports and the
protocol asked for); a URL given explicitly wins.
"""

from __future__ import annotations

import asyncio
import csv
import http.client
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from clfpipe.contract import tensors
from clfpipe.contract.dataset import image_files
from clfpipe.contract.errors import ServeError, first_line
from clfpipe.contract.probabilities import tagged
from clfpipe.serve.server import default_state_dir, is_our_server, read_info

log = logging.getLogger(__name__)

PROTOCOLS = ("http", "grpc")
# What a dropped or refused connection raises below tritonclient (geventhttpclient's are HTTPExceptions)
TRANSPORT_ERRORS = (ConnectionError, OSError, http.client.HTTPException)
# gRPC caps messages at 4 MB by default (triton-inference-server/server#4972): keep requests below it.
MAX_REQUEST_BYTES = 3_000_000


@dataclass(frozen=True)
class Prediction:
    file: str
    label: str
    prob: float
    probs: list[float]  # every class, in the repository's order
    top_k: list[tuple[str, float]]
    classes: tuple[str, ...] = ()
    tags: list[tuple[str, float]] | None = None  # multi-label: every class above the model's threshold, most probable first

    def to_dict(self) -> dict[str, Any]:
        out = {"file": self.file, "label": self.label, "prob": self.prob, "probs": dict(zip(self.classes, self.probs)),
               "top_k": [{"label": label, "prob": prob} for label, prob in self.top_k]}
        if self.tags is not None:
            out["tags"] = [{"label": label, "prob": prob} for label, prob in self.tags]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def predictions_csv(predictions: Sequence[Prediction], classes: Sequence[str], multi_label: bool) -> bytes:
    """A submission-style table: file, the label (multi-label: the tags, space-separated as a labels
    CSV holds them), then every class's probability in the model's order."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "tags" if multi_label else "label", *classes])
    for p in predictions:
        said = " ".join(label for label, _ in p.tags or []) if multi_label else p.label
        writer.writerow([p.file, said, *(f"{prob:.6g}" for prob in p.probs)])
    return buf.getvalue().encode()


@dataclass(frozen=True)
class Failure:
    """One input the server (or the file system) refused, and why."""

    file: str
    error: str


def expand_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given, directories expanded to their image files (recursively, sorted)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += image_files(path)
        elif path.is_file():
            files.append(path)
        else:
            raise ServeError(f"no such file or directory: {path}")
    if not files:
        raise ServeError(f"expected image files, got none in {', '.join(map(str, paths))}")
    return files


def model_config(client: Any, protocol: str, model: str) -> dict[str, Any]:
    """A served model's config as JSON, over either protocol's client."""
    return client.get_model_config(model, as_json=True)["config"] if protocol == "grpc" else client.get_model_config(model)


@dataclass(frozen=True)
class Served:
    """What a clfpipe model's config says of it to a client."""

    classes: list[str]
    max_batch_size: int
    threshold: float | None = None  # multi-label: a tag is claimed above it; None: one class per image


def describe(config: dict[str, Any], model: str, url: str) -> Served:
    """A clfpipe model's config read: a model that takes encoded images (its IMAGE input), which is
    what this client sends."""
    params = config.get("parameters", {})
    inputs = [str(tensor.get("name")) for tensor in config.get("input", [])]
    if "classes" not in params or tensors.IMAGE not in inputs:
        what = f"takes {', '.join(inputs) or 'nothing'}" + ("" if "classes" in params else " and names no classes")
        raise ServeError(f"--model {model}: expected a clfpipe classifier that takes encoded images ({tensors.IMAGE}), "
                         f"such as classifier or classifier_tta; {model!r} on {url} {what}")
    value = lambda key: json.loads(params[key]["string_value"]) if key in params else None  # noqa: E731
    threshold = value("threshold") if value("multi_label") else None
    return Served(value("classes"), max(1, int(config.get("max_batch_size", 1))),
                  None if threshold is None else float(threshold))


def resolve_endpoint(url: str | None, protocol: str | None, state_dir: Path | None = None) -> tuple[str, str]:
    """(url, protocol): the ones given, else the server that 'clfpipe serve up' recorded."""
    if protocol is not None and protocol not in PROTOCOLS:
        raise ServeError(f"--protocol: expected http or grpc, got {protocol!r}")
    info = read_info(state_dir or default_state_dir())
    if url is not None:
        check_url(url)
        if protocol is None and info is not None and url == info.grpc_url:
            return url, "grpc"
        return url, protocol or "http"
    if info is None or not is_our_server(info):
        raise ServeError(f"no running server recorded in {state_dir or default_state_dir()}: start one with "
                         "'clfpipe serve up' or pass --url HOST:PORT")
    protocol = protocol or "http"
    return (info.http_url if protocol == "http" else info.grpc_url), protocol


# HOST:PORT as tritonclient takes it (a host name or IPv4, an IPv6 address in brackets), an HTTP base path after it
_URL = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})(/[!-~]*)?")


def check_url(url: str) -> str:
    """``url`` if it is HOST:PORT with a port in 1..65535, else one line saying so, before any client
    is made (tritonclient's HTTP client, failing in its constructor, also printed an ignored
    AttributeError traceback from its __del__)."""
    match = _URL.fullmatch(url)
    if match is None or not 1 <= int(match.group(2)) <= 65535:
        raise ServeError(f"--url: expected HOST:PORT with a port in 1..65535, without http:// or grpc://, got {url!r}")
    return url


def is_unreachable(error: ServeError) -> bool:
    """Whether an error says the server could not be reached (or was not Triton's endpoint), not
    that it refused what it was sent."""
    return str(error).startswith(("cannot reach", "no Triton"))


def unreachable(url: str, protocol: str, exc: Exception) -> ServeError:
    return ServeError(f"cannot reach Triton at {url} over {protocol}: {exc}")


def not_triton(url: str, protocol: str, exc: Exception) -> ServeError:
    """What answered was not Triton's endpoint for this protocol (the other protocol's port, say)."""
    other = "grpc" if protocol == "http" else "http"
    return ServeError(f"no Triton {protocol} endpoint at {url} ({first_line(exc)}): is that the {other} port? "
                      f"Pass the {protocol} port or --protocol {other}")


# What Triton answers a request refused for its input (its own checks and the models' alike):
# the file's fault, not the server's.
REFUSED_STATUS = ("400", "StatusCode.INVALID_ARGUMENT")


def server_error(exc: InferenceServerException, url: str, protocol: str, model: str) -> ServeError:
    """One line for what Triton or the connection said: unreachable, unknown model, an input the
    server refused, or the server's own failure."""
    text = exc.message() or str(exc)
    message = text.splitlines()[0] if text else "no message"
    lowered = message.lower()
    if "socket closed" in lowered or "http/1" in lowered:  # a gRPC client that reached an HTTP port
        return not_triton(url, protocol, exc)
    if "connect" in lowered or "unavailable" in lowered or "refused" in lowered:
        return ServeError(f"cannot reach Triton at {url} over {protocol}: {message}")
    if "unknown model" in lowered or "not found" in lowered:
        return ServeError(f"model {model!r} is not served at {url}: {message}")
    if exc.status() in REFUSED_STATUS:
        return ServeError(f"refused: {message}")
    return ServeError(f"server error: {message}")


def make_prediction(name: str, probs: np.ndarray, classes: Sequence[str], top_k: int,
                    threshold: float | None = None) -> Prediction:
    """With a threshold (multi-label), ``tags`` holds every class above it, most probable first."""
    if top_k < 1:  # more than the classes is all of them
        raise ServeError(f"--top-k: expected at least 1, got {top_k}")
    order = np.argsort(-probs, kind="stable")
    ranked = [(classes[int(i)], float(probs[int(i)])) for i in order]
    claimed = None if threshold is None else tagged(probs, threshold)
    tags = None if claimed is None else [ranked[rank] for rank, i in enumerate(order) if claimed[i]]
    return Prediction(name, ranked[0][0], ranked[0][1], [float(p) for p in probs], ranked[:top_k], tuple(classes), tags)


def encoded_batch(images: Sequence[bytes]) -> np.ndarray:
    """The IMAGE input: (N, 1) BYTES."""
    return np.array([[img] for img in images], dtype=np.object_)


def _chunks(sizes: Sequence[int], max_count: int) -> list[tuple[int, int]]:
    """[start, end) ranges of at most max_count items and about MAX_REQUEST_BYTES each."""
    ranges, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and (i - start >= max_count or total + size > MAX_REQUEST_BYTES):
            ranges.append((start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        ranges.append((start, len(sizes)))
    return ranges


def split_urls(url: str | Sequence[str] | None) -> list[str | None]:
    """``"a:8001,b:8001"``, a list, or None (the recorded server) -> the URLs to resolve."""
    if url is None:
        return [None]
    urls = [u.strip() for u in url.split(",")] if isinstance(url, str) else list(url)
    if not urls:
        raise ServeError("url: expected at least one HOST:PORT, got an empty list")
    return urls


def kept_servers(urls: Sequence[str], outcomes: Sequence[Served | ServeError]) -> tuple[list[int], Served]:
    """Which servers a client keeps, from what asking each for its model config gave: of several, one
    that cannot be reached is skipped (logged; requests skip it too) and only none answering is an
    error; any other error is raised; all kept must serve the same classes."""
    errors = [o for o in outcomes if isinstance(o, ServeError)]
    for error in errors:
        if len(urls) == 1 or not is_unreachable(error):
            raise error
    kept = [(i, o) for i, o in enumerate(outcomes) if isinstance(o, Served)]
    if not kept:
        raise errors[0]
    first, served = kept[0]
    for i, other in kept[1:]:
        if other.classes != served.classes:
            raise ServeError(f"{urls[i]} serves classes {other.classes}, {urls[first]} serves {served.classes}: "
                             "expected the same model")
    for error in errors:
        log.warning("%s: skipped, requests go to %s", error, ", ".join(urls[i] for i, _ in kept))
    return [i for i, _ in kept], served


class _Servers:
    """Round-robin over the kept servers, shared by both clients: a request that one server cannot
    take goes to the next."""

    urls: list[str]
    protocol: str
    model: str
    classes: list[str]
    max_batch_size: int
    threshold: float | None
    _clients: list[Any]
    _turn: int = 0

    def _keep(self, clients: Sequence[Any], outcomes: Sequence[Served | ServeError]) -> None:
        kept, served = kept_servers(self.urls, outcomes)
        self.urls, self._clients = [self.urls[i] for i in kept], [clients[i] for i in kept]
        self.classes, self.max_batch_size, self.threshold = served.classes, served.max_batch_size, served.threshold

    def _next(self) -> tuple[Any, str]:
        index, self._turn = self._turn, (self._turn + 1) % len(self._clients)
        return self._clients[index], self.urls[index]

    def _passed_on(self, exc: Exception, url: str) -> ServeError | InferenceServerException:
        """What a request one server failed leaves to report should no other server answer it. A
        refusal of the input is raised at once: every server would refuse it."""
        if isinstance(exc, InferenceServerException):
            if exc.status() in REFUSED_STATUS:
                raise exc
            error = server_error(exc, url, self.protocol, self.model)
            return error if is_unreachable(error) else exc
        return unreachable(url, self.protocol, exc)

    def _unanswered(self, exc: Exception, url: str) -> ServeError:
        """What asking a server for the model's config raised, as one line."""
        if isinstance(exc, InferenceServerException):
            return server_error(exc, url, self.protocol, self.model)
        if isinstance(exc, (ConnectionError, OSError)):
            return unreachable(url, self.protocol, exc)
        return not_triton(url, self.protocol, exc)  # an HTTP parser fed gRPC frames raises its own types

    def _prediction(self, name: str, probs: np.ndarray, top_k: int) -> Prediction:
        return make_prediction(name, probs, self.classes, top_k, self.threshold)


class Classifier(_Servers):
    """``Classifier(url, protocol, model).predict(paths, top_k)`` against a running Triton; with no
    url, the server ``clfpipe serve up`` recorded in ``state_dir``.

    ``url`` may name several servers ("a:8001,b:8001" or a list), say the pods behind a headless
    Kubernetes Service: requests go round-robin over them, and one that cannot be reached or fails
    a request (not a refusal of the input) passes it to the next (a gRPC connection otherwise stays
    on the one pod it first reached).
    """

    def __init__(self, url: str | Sequence[str] | None = None, protocol: str | None = None, model: str = "classifier",
                 timeout: float = 60.0, state_dir: Path | None = None) -> None:
        endpoints = [resolve_endpoint(u, protocol, state_dir) for u in split_urls(url)]
        self.urls, self.protocol, self.model = [u for u, _ in endpoints], endpoints[0][1], model
        self._lib = httpclient if self.protocol == "http" else grpcclient
        clients: list[Any] = []
        outcomes: list[Served | ServeError] = []
        for u in self.urls:
            client = None
            try:
                client = self._connect(u, timeout)
                outcomes.append(describe(self._model_config(client), self.model, u))
            except ServeError as exc:
                outcomes.append(exc)
            clients.append(client)
        self._keep(clients, outcomes)
        self.url, self._client = self.urls[0], self._clients[0]

    def _connect(self, url: str, timeout: float) -> Any:
        try:
            if self.protocol == "http":
                client = httpclient.InferenceServerClient(url, network_timeout=timeout, connection_timeout=timeout)
            else:
                client = grpcclient.InferenceServerClient(url)
            self._model_config(client)
        except Exception as exc:  # noqa: BLE001 - every failure here is one line (_unanswered)
            raise self._unanswered(exc, url) from exc
        return client

    def _model_config(self, client: Any) -> dict[str, Any]:
        return model_config(client, self.protocol, self.model)

    def config(self, model: str) -> dict[str, Any]:
        """Another model's config on the first server, as JSON (``model_config``)."""
        try:
            return model_config(self._clients[0], self.protocol, model)
        except InferenceServerException as exc:
            raise server_error(exc, self.urls[0], self.protocol, model) from exc

    def serves(self, model: str) -> bool:
        """Whether the first server has `model` loaded and ready."""
        try:
            return bool(self._clients[0].is_model_ready(model))
        except InferenceServerException:
            return False

    def _error(self, exc: InferenceServerException) -> ServeError:
        return server_error(exc, self.url, self.protocol, self.model)

    def _request(self, name: str, data: np.ndarray, datatype: str) -> tuple[list, list]:
        tensor = self._lib.InferInput(name, list(data.shape), datatype)
        if self.protocol == "http":
            tensor.set_data_from_numpy(data, binary_data=True)
            return [tensor], [httpclient.InferRequestedOutput(tensors.SCORES, binary_data=True)]
        tensor.set_data_from_numpy(data)
        return [tensor], [grpcclient.InferRequestedOutput(tensors.SCORES)]

    def _send(self, model: str, inputs: list, outputs: list) -> np.ndarray:
        """One request to the next server in turn, passed on while servers fail it (``_passed_on``).
        When every server failed, the last failure is raised: a ServeError for an unreachable one,
        else Triton's InferenceServerException for the caller to blame on an input."""
        last: ServeError | InferenceServerException | None = None
        for _ in range(len(self._clients)):
            self._client, self.url = self._next()
            try:
                return self._client.infer(model, inputs, outputs=outputs).as_numpy(tensors.SCORES)
            except (InferenceServerException, *TRANSPORT_ERRORS) as exc:
                last = self._passed_on(exc, self.url)
        assert last is not None
        raise last

    def _infer(self, images: Sequence[bytes]) -> np.ndarray:
        inputs, outputs = self._request(tensors.IMAGE, encoded_batch(images), "BYTES")
        return self._send(self.model, inputs, outputs)

    def _infer_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Decoded uint8 HWC RGB images of one shape -> the <model>_pixels ensemble (no re-encoding)."""
        inputs, outputs = self._request(tensors.IMAGE_PIXELS, pixels, "UINT8")
        return self._send(f"{self.model}_pixels", inputs, outputs)

    def probabilities(self, images: Sequence[bytes], names: Sequence[str] | None = None) -> np.ndarray:
        """(N, classes) probabilities for encoded images, batched into few requests."""
        names = names or [f"image {i}" for i in range(len(images))]
        outs = []
        for start, end in _chunks([len(i) for i in images], self.max_batch_size):
            try:
                outs.append(self._infer(images[start:end]))
            except InferenceServerException as exc:
                err = self._error(exc)
                raise ServeError(f"{_blame(str(err), names[start:end])}") from exc
        return np.concatenate(outs)

    def predict_each(self, paths: Sequence[str | Path], top_k: int = 1) -> Iterator[Prediction | Failure]:
        """Files and directories, a Prediction or a Failure per image, in order: a bad image is
        reported alone (its batch is retried one image at a time) and the rest still answered."""
        files = expand_inputs(paths)
        for start, end in _chunks([f.stat().st_size for f in files], self.max_batch_size):
            yield from self._predict_chunk(files[start:end], top_k)

    def _predict_chunk(self, files: Sequence[Path], top_k: int) -> Iterator[Prediction | Failure]:
        try:
            images = [f.read_bytes() for f in files]
            probs = self._infer(images)
        except (OSError, InferenceServerException):
            for f in files:  # find the bad one(s)
                try:
                    yield self._prediction(str(f), self._infer([f.read_bytes()])[0], top_k)
                except OSError as exc:
                    yield Failure(str(f), f"cannot read: {exc.strerror or exc}")
                except InferenceServerException as exc:
                    yield Failure(str(f), str(self._error(exc)))
            return
        for f, p in zip(files, probs):
            yield self._prediction(str(f), p, top_k)

    def predict(self, items: Sequence[str | Path | np.ndarray], top_k: int = 1) -> list[Prediction]:
        """Files, directories (their images) or decoded uint8 HWC RGB arrays."""
        arrays = [i for i in items if isinstance(i, np.ndarray)]
        if arrays and len(arrays) != len(items):
            raise ServeError("predict: expected either paths or arrays, got both")
        if arrays:
            return [self._prediction(f"array {i}", p, top_k) for i, p in enumerate(self.pixel_probabilities(arrays))]
        files = expand_inputs(items)
        probs = self.probabilities([f.read_bytes() for f in files], [str(f) for f in files])
        return [self._prediction(str(f), p, top_k) for f, p in zip(files, probs)]

    def pixel_probabilities(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """Arrays of one shape go together, up to max_batch_size per request."""
        for i, a in enumerate(arrays):
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] != 3:
                raise ServeError(f"array {i}: expected uint8 pixels of shape (H, W, 3), got {a.dtype} {a.shape}")
        out: list[np.ndarray | None] = [None] * len(arrays)
        groups: dict[tuple, list[int]] = {}
        for i, a in enumerate(arrays):
            groups.setdefault(a.shape, []).append(i)
        for indices in groups.values():
            for start in range(0, len(indices), self.max_batch_size):
                chunk = indices[start : start + self.max_batch_size]
                try:
                    probs = self._infer_pixels(np.stack([arrays[i] for i in chunk]))
                except InferenceServerException as exc:
                    raise ServeError(f"array {chunk[0]}: {self._error(exc)}") from exc
                for i, p in zip(chunk, probs):
                    out[i] = p
        return np.stack(out)  # type: ignore[arg-type]

def _blame(message: str, names: Sequence[str]) -> str:
    """Name the file the server complained about ('image 2 of 4: ...' -> the file's path)."""
    if len(names) == 1:
        return f"{names[0]}: {message}"
    for index, name in enumerate(names):
        tag = f"image {index} of {len(names)}: "
        if tag in message:
            return f"{name}: {message.replace(tag, '')}"
    return f"one of {len(names)} images ({names[0]} ...): {message}"


class AsyncClassifier(_Servers):
    """The asyncio variant: ``async with AsyncClassifier(url, protocol, model) as c: await c.predict(paths)``.

    Requests for many files go out concurrently (up to ``max_batch_size`` images each), so the
    server's dynamic batcher sees them together. ``url`` may name several servers, as for
    ``Classifier``: the requests go round-robin over them and one that a server cannot take goes to
    the next.
    """

    def __init__(self, url: str | Sequence[str] | None = None, protocol: str | None = None, model: str = "classifier",
                 timeout: float = 60.0, state_dir: Path | None = None) -> None:
        endpoints = [resolve_endpoint(u, protocol, state_dir) for u in split_urls(url)]
        self.urls, self.protocol, self.model = [u for u, _ in endpoints], endpoints[0][1], model
        self.timeout = timeout
        self._clients = []  # made in the event loop that uses them (aiohttp's session belongs to one)
        self.classes = []

    def _aio(self) -> tuple[Any, tuple[type[BaseException], ...]]:
        """tritonclient's asyncio module for the protocol, and what its transport raises below it."""
        if self.protocol == "http":
            import aiohttp
            import tritonclient.http.aio as aio

            return aio, (*TRANSPORT_ERRORS, aiohttp.ClientError, asyncio.TimeoutError)
        import tritonclient.grpc.aio as aio

        return aio, (*TRANSPORT_ERRORS, asyncio.TimeoutError)

    async def _describe(self, client: Any, url: str) -> Served | ServeError:
        try:
            if self.protocol == "grpc":
                config = (await client.get_model_config(self.model, as_json=True))["config"]
            else:
                config = await client.get_model_config(self.model)
        except Exception as exc:  # noqa: BLE001 - every failure here is one line (_unanswered)
            return self._unanswered(exc, url)
        try:
            return describe(config, self.model, url)
        except ServeError as exc:
            return exc

    async def _setup(self) -> None:
        if self._clients:
            return
        aio, self._transport = self._aio()
        if self.protocol == "http":
            clients = [aio.InferenceServerClient(u, conn_timeout=self.timeout) for u in self.urls]
        else:
            clients = [aio.InferenceServerClient(u) for u in self.urls]
        self._lib = aio
        outcomes = await asyncio.gather(*(self._describe(c, u) for c, u in zip(clients, self.urls)))
        try:
            self._keep(clients, outcomes)
        except ServeError:
            await asyncio.gather(*(c.close() for c in clients))
            raise
        await asyncio.gather(*(c.close() for c, o in zip(clients, outcomes) if isinstance(o, ServeError)))

    async def _send(self, images: Sequence[bytes]) -> np.ndarray:
        data = encoded_batch(images)
        tensor = self._lib.InferInput(tensors.IMAGE, list(data.shape), "BYTES")
        tensor.set_data_from_numpy(data)
        outputs = [self._lib.InferRequestedOutput(tensors.SCORES)]
        last: ServeError | InferenceServerException | None = None
        for _ in range(len(self._clients)):
            client, url = self._next()
            try:
                return (await client.infer(self.model, [tensor], outputs=outputs)).as_numpy(tensors.SCORES)
            except (InferenceServerException, *self._transport) as exc:
                last = self._passed_on(exc, url)
        assert last is not None
        raise last

    async def _chunk(self, images: Sequence[bytes], names: Sequence[str]) -> np.ndarray:
        try:
            return await self._send(images)
        except InferenceServerException as exc:
            raise ServeError(_blame(str(server_error(exc, ", ".join(self.urls), self.protocol, self.model)), names)) from exc

    async def predict(self, paths: Sequence[str | Path], top_k: int = 1) -> list[Prediction]:
        """Files and directories (their images); a refused file is named in the ServeError."""
        await self._setup()
        files = expand_inputs(paths)
        images = [f.read_bytes() for f in files]
        names = [str(f) for f in files]
        ranges = _chunks([len(i) for i in images], self.max_batch_size)
        # every request is let finish (none is left running past a failure), then the first failure in file order raised
        parts = await asyncio.gather(*(self._chunk(images[a:b], names[a:b]) for a, b in ranges), return_exceptions=True)
        for part in parts:
            if isinstance(part, BaseException):
                raise part
        return [self._prediction(name, p, top_k) for name, p in zip(names, np.concatenate(parts))]

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._clients))
        self._clients = []

    async def __aenter__(self) -> AsyncClassifier:
        await self._setup()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
