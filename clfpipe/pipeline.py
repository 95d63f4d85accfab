"""Stages chained, at the top of the layers: ``run`` (train, export, repo) and the ``demo`` that
serves the result and checks Triton's answers against PyTorch's.

Stages hand over through the run directory only; this module calls each stage's library function
in turn and reads the manifest between them.
"""

from __future__ import annotations

import functools
import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from clfpipe.contract.dataset import Split, scan_split
from clfpipe.contract.engines import DECODE_GATES, ENGINES, FLOAT_NCHW, SERVED, Gate, Variant, chunks, served_variants
from clfpipe.contract.errors import ManifestError, ServeError
from clfpipe.contract.gates import GateResult, judge
from clfpipe.contract.lock import run_lock
from clfpipe.contract.manifest import MANIFEST_NAME, Manifest, RunDir, check_out_folder
from clfpipe.contract.preprocess import load_image, load_pixels
from clfpipe.contract.probabilities import probabilities
from clfpipe.contract.recipe import Recipe
from clfpipe.demo_data import check_seed, write_demo_dataset
from clfpipe.export.onnx_export import export_variants, validation_split
from clfpipe.export.pt2_export import export_pt2
from clfpipe.export.verify import Row, Verification, profile, profile_batch_size, verify_run
from clfpipe.nn.models import Classifier
from clfpipe.nn.reference import load_run_model, torch_logits
from clfpipe.serve.client import Classifier as Client
from clfpipe.serve.deploy import Deployment, inference_service, k8s_manifests, write_manifests
from clfpipe.serve.repository import build_repository
from clfpipe.serve.server import Ports, start_server, stop_server
from clfpipe.train.evaluate import deterministic_tta
from clfpipe.train.loop import RECIPE_FILE, train_run
from clfpipe.train.state import STATE_FILE

log = logging.getLogger(__name__)


@dataclass
class StageTimer:
    """Wall-clock seconds per named stage, in order."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - start

    def table(self) -> str:
        rows = [f"  {name:<10} {secs:7.1f} s" for name, secs in self.seconds.items()]
        return "\n".join(rows + [f"  {'total':<10} {sum(self.seconds.values()):7.1f} s"])


def missing_exports(run_dir: Path) -> list[Variant]:
    """The served variants (at the recipe's serving precision) the run has not exported yet, or whose
    file is gone or differs from its recorded sha256 (it said "exported already" of those)."""
    run = RunDir(run_dir)
    manifest = run.read()
    return [v for v in served_variants(manifest.recipe.serve.precision) if not _intact(run, manifest, v.name)]


def _intact(run: RunDir, manifest: Manifest, name: str) -> bool:
    if name not in manifest.data["artifacts"]:
        return False
    try:
        run.artifact_path(manifest, name)
    except ManifestError as exc:
        log.warning("export: %s: exporting it again", exc)
        return False
    return True


def export_served(run_dir: Path, data_dir: Path | None = None) -> list[Variant]:
    """Export what the repository needs and the run lacks: the ONNX set always (the reference, and
    what the container serves); the torch packages too when serve.engine names a torch engine, and
    on a CUDA host under serve.engine = auto the exported programs (seconds to make; 'clfpipe
    export pt2' adds the AOTInductor packages, minutes to compile); returns what was exported."""
    missing = missing_exports(run_dir)
    if missing:
        export_variants(run_dir, missing, data_dir)
    manifest = RunDir(run_dir).read()
    if not missing and data_dir is not None:  # unused now, but a folder the user named is checked all the same (it went unsaid)
        validation_split(RunDir(run_dir), manifest, data_dir)
    serve = manifest.recipe.serve
    on_gpu = serve.engine == "auto" and torch.cuda.is_available() and serve.precision in ENGINES["torch"].precisions
    if serve.engine in ("aoti", "torch") or on_gpu:
        for served in SERVED:
            wanted = [served.variant(serve.precision, e).name for e in ("aoti", "torch")]
            if not any(name in manifest.data["artifacts"] for name in wanted):
                manifest = export_pt2(run_dir, precision=serve.precision, fold_tta=served.fold_tta, data_dir=data_dir,
                                      aoti=serve.engine == "aoti")
                missing.append(Variant.parse(next(n for n in wanted if n in manifest.data["artifacts"])))  # the package or its fallback
    return missing


def choose_decode(run_dir: Path) -> str:
    """How the served steps decode JPEGs: serve.decode, or for "auto" nvJPEG where this host has CUDA."""
    decode = RunDir(run_dir).read().recipe.serve.decode
    if decode == "auto":
        decode = "nvjpeg" if torch.cuda.is_available() else "pil"
    return decode


def choose_engines(run_dir: Path) -> dict[str, str]:
    """The engine each embedded backbone runs on: serve.engine, or for "auto" the fastest of the
    variants exported for it (ONNX, AOTInductor package, exported program) by a short profile on
    this host, on one batch of the validation images. The choice and the figures go in the log."""
    run = RunDir(run_dir)
    manifest = run.read()
    serve, artifacts = manifest.recipe.serve, manifest.data["artifacts"]
    wanted = ("onnx", "aoti", "torch") if serve.engine == "auto" else (serve.engine,)
    pixels = None
    chosen = {}
    for served in SERVED:
        candidates = [served.variant(serve.precision, e) for e in wanted if serve.precision in ENGINES[e].precisions]
        candidates = [v for v in candidates if v.name in artifacts]
        if not candidates:
            raise ManifestError(f"serve.engine = {serve.engine!r} at {serve.precision}: no exported {served.model} for it "
                                f"(expected {served.variant(serve.precision, wanted[0]).name}; 'clfpipe export pt2' makes the torch ones)")
        if len(candidates) > 1:
            if pixels is None:
                split = validation_split(run, manifest, None, option=None)
                batch = profile_batch_size(manifest)
                pixels = np.resize(load_pixels(split.files[:batch], manifest.preprocess), (batch, *[manifest.preprocess.crop] * 2, 3))
            timings = {v.name: profile(run, manifest, v.name, v.input_form.prepare(pixels, manifest.preprocess)) for v in candidates}
            candidates.sort(key=lambda v: timings[v.name] if timings[v.name] is not None else float("inf"))
            log.info("repo: %s on %s (ms per batch of %d here: %s)", served.model, candidates[0].engine, len(pixels),
                     ", ".join(f"{k} {v * 1000:.1f}" for k, v in timings.items() if v is not None))
        chosen[served.model] = candidates[0].engine
    return chosen


def repository_for_run(run_dir: Path, out: Path | None = None, target: str = "embedded") -> Path:
    """``clfpipe repo``: the exports the repository needs (made if missing), then the repository,
    its backbones on the engines `choose_engines` picks (the container target serves ONNX)."""
    made = export_served(run_dir)
    if made:
        log.info("repo: exported %s first (the repository serves them)", ", ".join(v.name for v in made))
    if target == "container":  # NVIDIA's image serves the ONNX graphs, decoding with Pillow
        return build_repository(run_dir, out, target, decode="pil")
    return build_repository(run_dir, out, target, choose_engines(run_dir), decode=choose_decode(run_dir))


def deploy_run(run_dir: Path, target: str, deployment: Deployment, out: Path | None = None) -> list[Path]:
    """``clfpipe deploy``: the container repository (made if missing), then the manifests that serve
    it: Kubernetes (Deployment, Services, autoscaler, adapter rule, disruption budget, probe) or
    KServe's InferenceService. Written to RUN/deploy/<target>/ unless `out` says otherwise."""
    run = RunDir(run_dir)
    manifest = run.read()
    out = Path(out) if out else Path(run_dir) / "deploy" / target
    check_out_folder(out, "deploy")  # this and the manifests come before the repository it may export first
    docs = k8s_manifests(deployment, manifest) if target == "k8s" else [inference_service(deployment, manifest)]
    if "container" not in manifest.data["stages"].get("repo", {}).get("targets", {}):
        repository_for_run(run_dir, target="container")
    paths = write_manifests(docs, out)
    log.info("deploy: %s manifests -> %s", target, paths[-1].parent)
    return paths


def run_pipeline(data_dir: Path, run_dir: Path, recipe: Recipe, timer: StageTimer | None = None) -> Path:
    """Train, export (with its agreement gates) and build the Triton repository."""
    timer = timer or StageTimer()
    with timer.stage("train"):
        train_run(data_dir, run_dir, recipe)
    with timer.stage("export"):
        export_variants(run_dir, served_variants(recipe.serve.precision), data_dir)
    with timer.stage("repo"):
        export_served(run_dir, data_dir)  # the torch packages, when serve.engine asks for them
        return build_repository(run_dir, engines=choose_engines(run_dir), decode=choose_decode(run_dir))


def reference_pixels(files: list[Path], manifest: Manifest, decode: str = "pil") -> np.ndarray:
    """The spec's pixels of the files as the server decodes them: Pillow's, or nvJPEG's on this
    host's device (torchvision's CPU decoder without CUDA)."""
    if decode == "pil":
        return load_pixels(files, manifest.preprocess)
    from clfpipe.runtime.nvjpeg import DevicePreprocessor
    from clfpipe.runtime.torch_engine import device_here

    decoder = DevicePreprocessor(manifest.preprocess, device_here())
    results = decoder.batch([np.array([[f.read_bytes()]], dtype=object) for f in files])
    for file, result in zip(files, results):
        if isinstance(result, ValueError):
            raise ServeError(f"{file}: {result}")
    return np.concatenate(results)  # type: ignore[arg-type]


def _probabilities(model: Classifier, manifest: Manifest, pixels: np.ndarray) -> np.ndarray:
    logits = torch_logits(model, pixels, prepare=FLOAT_NCHW.preparer(manifest.preprocess))
    return probabilities(logits, manifest.recipe.multi_label)


def _truth(run: RunDir, manifest: Manifest, files: list[Path]) -> Split:
    """The files with their labels from the run's validation split (the same file by any path)."""
    split = validation_split(run, manifest, None, option=None)
    by_file = {Path(f).resolve(): label for f, label in zip(split.files, split.labels)}
    keys = [Path(f).resolve() for f in files]
    missing = [str(f) for f, k in zip(files, keys) if k not in by_file]
    if missing:
        raise ServeError(f"{missing[0]}: expected a file of the run's validation split {run.data_dir(manifest) / 'valid'}")
    return Split(tuple(files), tuple(by_file[k] for k in keys), split.classes)


class Reference:
    """PyTorch fp32's probabilities on one labelled split, each kind computed once, when first
    asked for: on a decoder's pixels (``on``) and with the deterministic TTA views (``tta``). Every
    served check judges against one of these; several checks of one server share them.

    `images`: a labelled Split, or files of the run's validation split (labelled from it)."""

    def __init__(self, run_dir: Path, images: list[Path] | Split) -> None:
        run = RunDir(run_dir)
        self.manifest = run.read()
        self.split = images if isinstance(images, Split) else _truth(run, self.manifest, images)
        self.model = load_run_model(run, self.manifest)
        self._on: dict[str, np.ndarray] = {}

    def on(self, decode: str) -> np.ndarray:
        """On the pixels of `decode` ('pil', or the server's nvJPEG: ``reference_pixels``)."""
        if decode not in self._on:
            pixels = reference_pixels(list(self.split.files), self.manifest, decode)
            self._on[decode] = _probabilities(self.model, self.manifest, pixels)
        return self._on[decode]

    @functools.cached_property
    def tta(self) -> np.ndarray:
        """The training side's deterministic TTA (Pillow's pixels), with the split's own labels
        choosing the activation (a multi-label run's sigmoids)."""
        return deterministic_tta(self.model, self.split, spec=self.manifest.preprocess, batch_size=32,
                                 device=torch.device("cpu"))

    def judge(self, expected: np.ndarray, test: np.ndarray, gate: Gate | None) -> GateResult:
        """Probabilities against `expected` by `gate` (default: the serving precision's)."""
        probs_out = Variant(self.manifest.recipe.serve.precision, fold_preprocess=True, fold_tta=True)  # probabilities
        return judge(probs_out, expected, test, np.asarray(self.split.labels), multi_label=self.manifest.recipe.multi_label,
                     rtol=self.manifest.recipe.export.rtol, atol=self.manifest.recipe.export.atol, gate=gate)


def _served(client: Client, split: Split) -> np.ndarray:
    """The client's model on the split's encoded files, read a chunk at a time."""
    return np.concatenate([client.probabilities([Path(f).read_bytes() for f in part], [str(f) for f in part])
                           for _, part in chunks(list(split.files))])


def _served_pixels(client: Client, split: Split) -> np.ndarray:
    """The client's ``_pixels`` ensemble on Pillow's decoded images (what a client that has pixels
    sends; the server resizes and crops them), full-size, decoded a chunk at a time."""
    return np.concatenate([client.pixel_probabilities([np.asarray(load_image(f)) for f in part])
                           for _, part in chunks(list(split.files))])


def _classifier_check(ref: Reference, client: Client, decode: str) -> GateResult:
    return ref.judge(ref.on(decode), _served(client, ref.split), None)


def _tta_check(ref: Reference, client: Client, decode: str) -> GateResult:
    return ref.judge(ref.tta, _served(client, ref.split), DECODE_GATES[decode])


def _decoder_check(ref: Reference, decode: str) -> GateResult:
    return ref.judge(ref.on("pil"), ref.on(decode), DECODE_GATES[decode])


def served_agreement(run_dir: Path, client: Client, images: list[Path] | Split, decode: str = "pil") -> GateResult:
    """Triton's probabilities vs PyTorch fp32's on the same pixels (those of the server's decoder),
    by the serving precision's gate: the served engine's answers, with the decoder held equal."""
    return _classifier_check(Reference(run_dir, images), client, decode)


def decoder_agreement(run_dir: Path, images: list[Path] | Split, decode: str) -> GateResult:
    """PyTorch fp32 on the decoder's pixels vs on Pillow's (training evaluation's), by the
    decoder's gate (``DECODE_GATES``): what decoding on the GPU changes."""
    return _decoder_check(Reference(run_dir, images), decode)


def served_decode(client: Client) -> str:
    """The decoder behind the served ensemble: its first step's ``decode`` parameter (the
    preprocess model's, or the fused GPU step's); 'pil' where it names none."""
    config = client.config(client.model)
    steps = config.get("ensemble_scheduling", {}).get("step", [])
    source = client.config(steps[0]["model_name"]) if steps else config
    decode = source.get("parameters", {}).get("decode", {}).get("string_value", "pil")
    if decode not in DECODE_GATES:
        raise ServeError(f"the server at {client.url} decodes with {decode!r}: expected one of {', '.join(DECODE_GATES)}")
    return decode


def _probe_files(split: Split, size: int) -> list[Path]:
    """`size` files for a served row's profile, repeated where the split has fewer (as verify's
    profile batch is): a round trip through Triton, beside the engines' in-process figures."""
    return [Path(split.files[i % len(split.files)]) for i in range(size)]


def served_rows(ref: Reference, url: str | None = None, protocol: str | None = None, state_dir: Path | None = None,
                profile: bool = True) -> list[Row]:
    """The running server (``url``, else the one 'serve up' recorded) against `ref`, a row each as
    verify's, named by the served model: ``classifier`` on the server decoder's pixels,
    ``classifier_tta``, and their ``_pixels`` ensembles given decoded images, each where it is
    served; with a decoder other than Pillow, what that decoder changes. The served rows carry
    their ms/batch unless not `profile`."""
    from clfpipe.runtime.torch_engine import seconds_per_batch

    client = Client(url, protocol, "classifier", state_dir=state_dir)
    if client.classes != list(ref.manifest.classes):
        raise ServeError(f"the server at {client.url} serves classes {client.classes}, expected this run's "
                         f"{list(ref.manifest.classes)}: is it serving another run?")
    decode = served_decode(client)
    log.info("served: %s over %s, decoding with %s", client.url, client.protocol, decode)
    if decode == "nvjpeg" and not torch.cuda.is_available():
        log.warning("served: the server decodes with nvJPEG and this host has no CUDA: the reference decodes with "
                    "torchvision's CPU decoder, whose pixels may differ by a few levels (run verify on the server's host)")
    runtime = f"triton-{client.protocol}"
    probe = _probe_files(ref.split, profile_batch_size(ref.manifest)) if profile else []
    encoded = [f.read_bytes() for f in probe]
    decoded = [np.asarray(load_image(f)) for f in probe]

    def timed(send: Callable[[list], np.ndarray], batch: list) -> float | None:
        return seconds_per_batch(send, batch) if profile else None

    rows = [Row(client.model, runtime, _classifier_check(ref, client, decode), timed(client.probabilities, encoded))]
    if client.serves(f"{client.model}_pixels"):
        rows.append(Row(f"{client.model}_pixels", runtime, ref.judge(ref.on("pil"), _served_pixels(client, ref.split), None),
                        timed(client.pixel_probabilities, decoded)))
    if client.serves("classifier_tta"):
        tta = Client(client.url, client.protocol, "classifier_tta", state_dir=state_dir)
        rows.append(Row(tta.model, runtime, _tta_check(ref, tta, decode), timed(tta.probabilities, encoded)))
        if tta.serves(f"{tta.model}_pixels"):
            rows.append(Row(f"{tta.model}_pixels", runtime, ref.judge(ref.tta, _served_pixels(tta, ref.split), None),
                            timed(tta.pixel_probabilities, decoded)))
    if decode != "pil":
        rows.append(Row(f"{decode} vs Pillow", "torch", _decoder_check(ref, decode)))
    return rows


def verify_with_server(run_dir: Path, images: Path | None = None, url: str | None = None, protocol: str | None = None,
                       state_dir: Path | None = None) -> Verification:
    """``clfpipe verify --served``: the running server's rows first, on verify's own split (it may
    be unreachable: said before minutes of checking variants), then every exported variant's."""
    return verify_run(run_dir, images, served=lambda split: served_rows(Reference(run_dir, split), url, protocol, state_dir))


def _sample(files: list[Path], labels: list[int], per_class: int) -> list[Path]:
    picked: list[Path] = []
    for label in sorted(set(labels)):
        picked += [f for f, lab in zip(files, labels) if lab == label][:per_class]
    return picked


def _predict_and_check(info, run_dir: Path, valid: Split) -> None:
    """A few predictions over each protocol, then ``served_rows`` (what ``verify --served`` checks):
    the demo fails on the first row outside its gate."""
    reference = Reference(run_dir, valid)  # PyTorch's side computed once for both protocols
    for protocol, url in (("http", info.http_url), ("grpc", info.grpc_url)):
        client = Client(url, protocol)
        log.info("\npredict over %s (%s):", protocol, url)
        for p in client.predict(_sample(list(valid.files), list(valid.labels), 2), top_k=1):
            log.info("  %-28s -> %-11s %.3f", Path(p.file).parent.name + "/" + Path(p.file).name, p.label, p.prob)
        for row in served_rows(reference, url, protocol, profile=False):
            log.info("  %s vs PyTorch fp32: %s", row.artifact, row.result.summary())
            if not row.result.passed:
                raise ServeError(f"{row.artifact} over {protocol} disagrees with PyTorch: {row.result.summary()}")


def _clear_demo_run(run_dir: Path) -> None:
    """The demo starts from a clean WORKDIR/run: one an earlier demo (or any clfpipe run) left is
    removed; anything else there is refused, not deleted (--workdir may name a folder of the user's)."""
    if not run_dir.exists():
        return
    marks = (MANIFEST_NAME, RECIPE_FILE, STATE_FILE)
    if not run_dir.is_dir() or not any((run_dir / mark).is_file() for mark in marks):
        raise ManifestError(f"--workdir: {run_dir} exists and is no clfpipe run (none of {', '.join(marks)} in it): "
                            "expected a new folder or one an earlier demo used; it is left as it was")
    with run_lock(run_dir, "demo"):  # not from under a demo that still runs there
        shutil.rmtree(run_dir)


def run_demo(workdir: Path, recipe: Recipe, ports: Ports = Ports(), seed: int = 0) -> dict[str, float]:
    """The whole product on the demo data; returns the seconds per stage."""
    timer = StageTimer()
    data_dir, run_dir = workdir / "data", workdir / "run"
    check_seed(seed)  # before the last demo run is cleared
    _clear_demo_run(run_dir)
    with timer.stage("data"):
        counts = write_demo_dataset(data_dir, seed)
        log.info("data: %d train / %d valid JPEGs -> %s", counts["train"], counts["valid"], data_dir)
    repo = run_pipeline(data_dir, run_dir, recipe, timer)
    valid = scan_split(data_dir, "valid")
    state_dir = workdir / "server"
    with timer.stage("serve up"):
        info = start_server(repo, state_dir, ports=ports)
        log.info("serve: tritonserver pid %d ready, http %s, grpc %s", info.pid, info.http_url, info.grpc_url)
    try:
        with timer.stage("predict"):
            _predict_and_check(info, run_dir, valid)
    finally:
        with timer.stage("serve down"):
            stop_server(state_dir)
    manifest = RunDir(run_dir).read()
    onnx_agreement = manifest.stage("export")["agreement"]
    scores = manifest.stage("train")["accuracy"]
    log.info("\nvalid accuracy (PyTorch): %s", ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    log.info("PyTorch vs ONNX Runtime: top-1 agreement %.4f, max |logit diff| %.3g (tolerance %.3g)",
             onnx_agreement["top1_agreement"], onnx_agreement["max_abs_diff"], onnx_agreement["tolerance"])
    log.info("\nstage times:\n%s", timer.table())
    return timer.seconds
