"""Generate a Triton model repository for a run (configs are generated, never hand-written).

Two targets from the same run:

- ``embedded`` (the nvidia-pytriton binary, which has only the python backend):
  ``preprocess`` (python: bytes -> uint8 pixels), ``backbone`` (python: ONNX Runtime on the
  run's folded-preprocessing variant -> PROBS), ensemble ``classifier`` (IMAGE -> PROBS); with a
  folded-TTA variant also ``backbone_tta`` and ensemble ``classifier_tta``. With decode=nvjpeg
  and a torch engine, the IMAGE ensembles run one fused step instead (``backbone_image``: nvJPEG
  decode and the backbone on the GPU, pixels never back on the host).
- ``container`` (NVIDIA's Triton image): the same python ``preprocess``, the backbones as
  ``onnxruntime_onnx`` models (optionally with TensorRT inside the ORT backend) on KIND_GPU, and
  a ``tensorrt_plan`` model where an engine was built.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import shlex
import shutil
import struct
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import onnx
from google.protobuf import text_format
from PIL import Image
from tritonclient.grpc import model_config_pb2 as mc

import clfpipe.contract.preprocess as preprocess_module
import clfpipe.contract.probabilities as probabilities_module
import clfpipe.serve.probe as probe_module
from clfpipe.contract import tensors
from clfpipe.contract.engines import ENGINES, SERVED, Served, Variant
from clfpipe.contract.errors import ManifestError, ServeError
from clfpipe.contract.integrity import HASHES_FILE, tree_problems, write_tree_hashes
from clfpipe.contract.lock import holding_run
from clfpipe.contract.manifest import Manifest, RunDir, relative_to_run
from clfpipe.contract.probabilities import NONE, SIGMOID, SOFTMAX
from clfpipe.contract.recipe import CONTAINER_SETUP
from clfpipe.model_repository import TEMPLATES

log = logging.getLogger(__name__)
TARGETS = ("embedded", "container")
LABELS_FILE = "labels.txt"
INPUT = tensors.INPUT  # the backbone's input: uint8 NHWC pixels (folded preprocessing)
IMAGE, IMAGE_PIXELS, PIXELS, PROBS, LABELS = tensors.IMAGE, tensors.IMAGE_PIXELS, tensors.PIXELS, tensors.SCORES, tensors.LABELS


@dataclass(frozen=True)
class Backbone:
    served: Served  # Triton model and ensemble names
    variant: Variant
    artifact: Path  # the run's file it serves (an ONNX graph, or a torch package for the aoti/torch engines)

    @property
    def served_file(self) -> str:
        """Its name in the model's version folder: model.onnx, model.pt2 or model.ep.pt2."""
        return "model" + ENGINES[self.variant.engine].suffix

    @property
    def model(self) -> str:
        return self.served.model

    @property
    def ensemble(self) -> str:
        return self.served.ensemble


def _tensor(name: str, dtype: int, dims: list[int], label_filename: str = "") -> dict:
    return dict(name=name, data_type=dtype, dims=dims, **({"label_filename": label_filename} if label_filename else {}))


def _base(name: str, manifest: Manifest, *, kind: int, instances: int, inputs: list, outputs: list) -> mc.ModelConfig:
    serve = manifest.recipe.serve
    config = mc.ModelConfig(name=name, max_batch_size=serve.max_batch_size)
    config.input.extend(mc.ModelInput(**t) for t in inputs)
    config.output.extend(mc.ModelOutput(**t) for t in outputs)
    config.dynamic_batching.max_queue_delay_microseconds = serve.max_queue_delay_us
    config.instance_group.append(mc.ModelInstanceGroup(kind=kind, count=instances))
    return config


def _pixels_dims(manifest: Manifest) -> list[int]:
    crop = manifest.preprocess.crop
    return [crop, crop, 3]


WARMUP_IMAGE = "warmup_image"


def _warmup(config: mc.ModelConfig, inputs: dict[str, tuple[int, list[int], str]], batch_sizes: list[int]) -> None:
    """model_warmup samples: a data file (relative to <model>/warmup/) or zeros per input."""
    for batch in sorted(set(batch_sizes)):
        sample = config.model_warmup.add(name=f"warmup_batch_{batch}", batch_size=batch, count=2)
        for name, (dtype, dims, data_file) in inputs.items():
            spec = sample.inputs[name]
            spec.data_type, spec.dims[:] = dtype, dims
            if data_file:
                spec.input_data_file = data_file
            else:
                spec.zero_data = True


def preprocess_config(manifest: Manifest, decode: str) -> mc.ModelConfig:
    serve = manifest.recipe.serve
    config = _base("preprocess", manifest, kind=mc.ModelInstanceGroup.KIND_CPU, instances=serve.preprocess_instances,
                   inputs=[_tensor(IMAGE, mc.TYPE_STRING, [1])], outputs=[_tensor(PIXELS, mc.TYPE_UINT8, _pixels_dims(manifest))])
    config.backend = "python"
    config.parameters["preprocess"].string_value = json.dumps(manifest.preprocess.to_dict())
    config.parameters["decode"].string_value = decode
    if serve.warmup:
        _warmup(config, {IMAGE: (mc.TYPE_STRING, [1], WARMUP_IMAGE)}, [1, serve.max_batch_size])
    return config


def preprocess_pixels_config(manifest: Manifest) -> mc.ModelConfig:
    """The second input form: decoded uint8 HWC images of any size."""
    serve = manifest.recipe.serve
    config = _base("preprocess_pixels", manifest, kind=mc.ModelInstanceGroup.KIND_CPU, instances=serve.preprocess_instances,
                   inputs=[_tensor(IMAGE_PIXELS, mc.TYPE_UINT8, [-1, -1, 3])],
                   outputs=[_tensor(PIXELS, mc.TYPE_UINT8, _pixels_dims(manifest))])
    config.backend = "python"
    config.parameters["preprocess"].string_value = json.dumps(manifest.preprocess.to_dict())
    if serve.warmup:
        _warmup(config, {IMAGE_PIXELS: (mc.TYPE_UINT8, _pixels_dims(manifest), "")}, [1])
    return config


def labels_config(manifest: Manifest) -> mc.ModelConfig:
    """Container target: PROBS -> LABELS as a python step after the ORT backbone."""
    config = _base("labels", manifest, kind=mc.ModelInstanceGroup.KIND_CPU, instances=manifest.recipe.serve.preprocess_instances,
                   inputs=[_tensor(PROBS, mc.TYPE_FP32, [len(manifest.classes)])], outputs=[_tensor(LABELS, mc.TYPE_STRING, [-1])])
    config.backend = "python"
    _label_parameters(config, manifest)
    return config


def _label_parameters(config: mc.ModelConfig, manifest: Manifest) -> None:
    """What the step that writes LABELS names: top-k classes, or a multi-label run's tags above its threshold."""
    config.parameters["classes"].string_value = json.dumps(manifest.classes)
    config.parameters["top_k"].string_value = str(manifest.recipe.serve.top_k)
    if manifest.recipe.multi_label:
        config.parameters["threshold"].string_value = _threshold(manifest)


def _threshold(manifest: Manifest) -> str:
    """A multi-label run's tags: those above training's F2-best threshold."""
    return json.dumps(manifest.threshold)


def backbone_config(manifest: Manifest, backbone: Backbone, target: str, fused: bool = False) -> mc.ModelConfig:
    """`fused`: the embedded backbone that takes encoded IMAGE bytes and decodes them with nvJPEG."""
    serve = manifest.recipe.serve
    inputs = [_tensor(IMAGE, mc.TYPE_STRING, [1]) if fused else _tensor(INPUT, mc.TYPE_UINT8, _pixels_dims(manifest))]
    outputs = [_tensor(PROBS, mc.TYPE_FP32, [len(manifest.classes)], LABELS_FILE)]
    if target == "embedded":
        outputs.append(_tensor(LABELS, mc.TYPE_STRING, [-1]))
        name = backbone.served.fused_model if fused else backbone.model
        config = _base(name, manifest, kind=mc.ModelInstanceGroup.KIND_CPU, instances=serve.model_instances,
                       inputs=inputs, outputs=outputs)
        config.backend = "python"
        config.parameters["engine"].string_value = backbone.variant.engine
        config.parameters["model_file"].string_value = backbone.served_file
        config.parameters["ort_threads"].string_value = str(serve.ort_threads)
        config.parameters["ort_spin"].string_value = json.dumps(serve.ort_spin)
        config.parameters["activation"].string_value = backbone.variant.activation(manifest.recipe.multi_label)
        _label_parameters(config, manifest)
        if fused:
            config.parameters["preprocess"].string_value = json.dumps(manifest.preprocess.to_dict())
            config.parameters["decode"].string_value = "nvjpeg"
    else:
        config = _base(backbone.model, manifest, kind=mc.ModelInstanceGroup.KIND_GPU, instances=serve.container_gpu_instances,
                       inputs=inputs, outputs=outputs)
        config.platform = "onnxruntime_onnx"
    if serve.warmup and fused:
        _warmup(config, {IMAGE: (mc.TYPE_STRING, [1], WARMUP_IMAGE)}, [1, serve.max_batch_size])
    elif serve.warmup:
        _warmup(config, {INPUT: (mc.TYPE_UINT8, _pixels_dims(manifest), "")}, [1, serve.max_batch_size])
    if target == "embedded":
        return config
    if serve.container_ort_tensorrt:
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        accelerator.parameters["precision_mode"] = serve.container_trt_precision
        accelerator.parameters["max_workspace_size_bytes"] = str(4 << 30)
        accelerator.parameters["trt_engine_cache_enable"] = "1"
        accelerator.parameters["trt_engine_cache_path"] = f"/models/{backbone.model}/trt_cache"
    return config


def ensemble_config(manifest: Manifest, backbone: Backbone, target: str = "embedded", pixels: bool = False,
                    fused: bool = False) -> mc.ModelConfig:
    """IMAGE (encoded bytes) or IMAGE_PIXELS (decoded uint8 HWC) -> PROBS and LABELS; `fused`: IMAGE
    straight into the one step that decodes on the GPU and runs the backbone."""
    name = backbone.ensemble + ("_pixels" if pixels else "")
    config = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=manifest.recipe.serve.max_batch_size)
    image, pre = ((IMAGE_PIXELS, "preprocess_pixels") if pixels else (IMAGE, "preprocess"))
    dims = [-1, -1, 3] if pixels else [1]
    config.input.append(mc.ModelInput(**_tensor(image, mc.TYPE_UINT8 if pixels else mc.TYPE_STRING, dims)))
    config.output.append(mc.ModelOutput(**_tensor(PROBS, mc.TYPE_FP32, [len(manifest.classes)], LABELS_FILE)))
    config.output.append(mc.ModelOutput(**_tensor(LABELS, mc.TYPE_STRING, [-1])))
    steps = config.ensemble_scheduling.step
    # input_map/output_map: key = the step model's tensor, value = the ensemble's tensor.
    if fused:
        steps.add(model_name=backbone.served.fused_model, model_version=-1, input_map={IMAGE: IMAGE},
                  output_map={PROBS: PROBS, LABELS: LABELS})
        return _describe(config, manifest)
    steps.add(model_name=pre, model_version=-1, input_map={image: image}, output_map={PIXELS: "pixels"})
    if target == "embedded":  # the python backbone also writes LABELS: one step fewer
        steps.add(model_name=backbone.model, model_version=-1, input_map={INPUT: "pixels"},
                  output_map={PROBS: PROBS, LABELS: LABELS})
    else:
        steps.add(model_name=backbone.model, model_version=-1, input_map={INPUT: "pixels"}, output_map={PROBS: PROBS})
        steps.add(model_name="labels", model_version=-1, input_map={PROBS: PROBS}, output_map={LABELS: LABELS})
    return _describe(config, manifest)


def _describe(config: mc.ModelConfig, manifest: Manifest) -> mc.ModelConfig:
    """Clients read the class names in order from the model config: the repository describes itself."""
    config.parameters["classes"].string_value = json.dumps(manifest.classes)
    config.parameters["multi_label"].string_value = json.dumps(manifest.recipe.multi_label)
    if manifest.recipe.multi_label:  # the tags a client names
        config.parameters["threshold"].string_value = _threshold(manifest)
    return config


def plan_config(manifest: Manifest, name: str, entry: dict) -> mc.ModelConfig:
    """A tensorrt_plan model for an engine built from a folded-preprocessing variant."""
    (out_name, _), = entry["outputs"].items()
    config = _base("backbone_trt", manifest, kind=mc.ModelInstanceGroup.KIND_GPU,
                   instances=manifest.recipe.serve.container_gpu_instances,
                   inputs=[_tensor(INPUT, mc.TYPE_UINT8, _pixels_dims(manifest))],
                   outputs=[_tensor(out_name, mc.TYPE_FP32, [len(manifest.classes)], LABELS_FILE)])
    config.platform = "tensorrt_plan"
    config.max_batch_size = min(manifest.recipe.serve.max_batch_size, entry["profile"]["max"])
    return config


def config_text(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def backbones(run: RunDir, manifest: Manifest, engines: Mapping[str, str] | None = None) -> list[Backbone]:
    """The variants served: the recipe's serve.precision, folded preprocessing, with and without TTA,
    on the engine chosen per served model (ONNX Runtime unless `engines` says otherwise)."""
    precision = manifest.recipe.serve.precision
    found = []
    for served in SERVED:
        variant = served.variant(precision, (engines or {}).get(served.model, "onnx"))
        if variant.name in manifest.data["artifacts"]:
            found.append(Backbone(served, variant, run.artifact_path(manifest, variant.name)))
        elif not served.fold_tta:
            flag = "" if precision == "fp32" else f" --precision {precision}"
            raise ManifestError(f"manifest has no artifact {variant.name!r}: the server takes uint8 pixels; run "
                                f"'clfpipe export onnx --run {run.path} --fold-preprocess{flag}' first")
    return found


# The activation appended to a graph for the container target's ORT and TensorRT backends
ONNX_ACTIVATIONS = {SOFTMAX: ("Softmax", {"axis": -1}), SIGMOID: ("Sigmoid", {})}


def with_probs_output(source: Path, target: Path, activation: str) -> None:
    """The ONNX for ORT/TensorRT backends: the activation appended, the output named PROBS."""
    model = onnx.load(str(source))
    graph = model.graph
    (out,) = graph.output
    if activation == NONE:
        for node in graph.node:
            node.output[:] = [PROBS if o == out.name else o for o in node.output]
    else:
        op, attrs = ONNX_ACTIVATIONS[activation]
        graph.node.append(onnx.helper.make_node(op, [out.name], [PROBS], **attrs))
    out.name = PROBS
    onnx.checker.check_model(model)
    onnx.save_model(model, str(target))


def _copy(source: Path, target: Path) -> None:
    """A copy, never a hard link: an edit to the run's file must not change what is served."""
    shutil.copyfile(source, target)


def _write_model(root: Path, config: mc.ModelConfig, labels: str | None = None) -> Path:
    model_dir = root / config.name
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(config_text(config))
    if labels is not None:
        (model_dir / LABELS_FILE).write_text(labels)
    if any(i.input_data_file for w in config.model_warmup for i in w.inputs.values()):
        (model_dir / "warmup").mkdir()
        (model_dir / "warmup" / WARMUP_IMAGE).write_bytes(warmup_image_bytes())
    return model_dir


def warmup_image_bytes() -> bytes:
    """One BYTES element as Triton reads it from a warmup file: 4-byte length, then a JPEG."""
    buf = io.BytesIO()
    Image.new("RGB", (320, 240), (127, 127, 127)).save(buf, format="JPEG")
    return struct.pack("<I", len(buf.getvalue())) + buf.getvalue()


def _python_model(staging: Path, config: mc.ModelConfig, template: str, *, target: str, modules: tuple = ()) -> None:
    model_dir = _write_model(staging, config)
    shutil.copy2(TEMPLATES / template / "model.py", model_dir / "1" / "model.py")
    if target == "container":  # NVIDIA's image lacks clfpipe: ship the standalone modules it imports
        for module in modules:
            shutil.copy2(module.__file__, model_dir / "1" / f"clfpipe_{Path(module.__file__).stem}.py")


def _fuses(backbone: Backbone, target: str, decode: str) -> bool:
    """Whether the IMAGE ensemble of this backbone runs as the one fused GPU step."""
    return target == "embedded" and decode == "nvjpeg" and ENGINES[backbone.variant.engine].device_input


def _embedded_backbone(staging: Path, manifest: Manifest, backbone: Backbone, labels: str, fused: bool) -> str:
    """The python backbone model and its copy of the artifact; returns its served file's path."""
    model_dir = _write_model(staging, backbone_config(manifest, backbone, "embedded", fused), labels)
    shutil.copy2(TEMPLATES / "backbone" / "model.py", model_dir / "1" / "model.py")
    _copy(backbone.artifact, model_dir / "1" / backbone.served_file)
    return f"{model_dir.name}/1/{backbone.served_file}"


def _assemble(staging: Path, run: RunDir, manifest: Manifest, target: str,
              served: list[Backbone], decode: str) -> tuple[list[str], dict[str, dict]]:
    """Write every model into staging; returns the model names and, per served model file, the
    run artifact it was made from (name and sha256)."""
    labels = "\n".join(manifest.classes) + "\n"
    _python_model(staging, preprocess_config(manifest, decode), "preprocess", target=target, modules=(preprocess_module,))
    _python_model(staging, preprocess_pixels_config(manifest), "preprocess_pixels", target=target, modules=(preprocess_module,))
    names, sources = ["preprocess", "preprocess_pixels"], {}
    if target == "container":
        _python_model(staging, labels_config(manifest), "labels", target=target, modules=(probabilities_module,))
        names.append("labels")
    for backbone in served:
        source = {"artifact": backbone.variant.name, "sha256": manifest.artifact(backbone.variant.name)["sha256"]}
        fused = _fuses(backbone, target, decode)
        if target == "embedded":
            sources[_embedded_backbone(staging, manifest, backbone, labels, fused=False)] = source
            if fused:
                sources[_embedded_backbone(staging, manifest, backbone, labels, fused=True)] = source
                names.append(backbone.served.fused_model)
        else:
            model_dir = _write_model(staging, backbone_config(manifest, backbone, target), labels)
            with_probs_output(backbone.artifact, model_dir / "1" / "model.onnx", backbone.variant.activation(manifest.recipe.multi_label))
            sources[f"{backbone.model}/1/model.onnx"] = source
        for pixels in (False, True):
            ensemble = ensemble_config(manifest, backbone, target, pixels, fused=fused and not pixels)
            _write_model(staging, ensemble, labels)
            names.append(ensemble.name)
        names.append(backbone.model)
    if target == "container":
        for name, entry in manifest.data["artifacts"].items():
            variant = Variant.from_dict(entry.get("variant", {}))
            if "variant" in entry and variant.engine == "trt" and variant.fold_preprocess:
                model_dir = _write_model(staging, plan_config(manifest, name, entry), labels)
                _copy(run.artifact_path(manifest, name), model_dir / "1" / "model.plan")
                names.append("backbone_trt")
                sources["backbone_trt/1/model.plan"] = {"artifact": name, "sha256": entry["sha256"]}
                break
    return names, sources


def docker_command(out: Path, image: str) -> str:
    """How to serve a container repository with NVIDIA's image (as 'clfpipe deploy' does: Pillow
    and numpy<2 first; the line had Pillow only, so an image with numpy 2 served garbage)."""
    server = shlex.quote(f"{CONTAINER_SETUP} && exec tritonserver --model-repository=/models")
    return (f"docker run --gpus all --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 -v {shlex.quote(str(out.resolve()))}:/models "
            f"{image} bash -c {server}")


def archive_repository(root: Path) -> Path:
    """ROOT.tar.gz beside the repository, its model folders at the top (what KServe's storage
    initializer unpacks); entries sorted and timestamps fixed, so the same repository gives the same bytes."""
    out = root.parent / f"{root.name}.tar.gz"
    tmp = out.with_suffix(".partial")

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        return info

    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for path in sorted(root.rglob("*")):
            if "__pycache__" not in path.parts:
                tar.add(path, arcname=path.relative_to(root).as_posix(), recursive=False, filter=clean)
    tmp.replace(out)
    return out


def verify_repository(root: Path) -> None:
    """Refuse a repository whose files differ from what 'clfpipe repo' wrote, in one line."""
    problems = tree_problems(root)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ServeError(f"{root} is not the repository 'clfpipe repo' wrote: {problems[0]}{more}; "
                         "rebuild it with 'clfpipe repo --run RUN_DIR'")


def _check_replaceable(out: Path) -> None:
    """OUT is replaced only when it is a repository 'clfpipe repo' wrote (its hashes file at the
    root) or an empty folder: ``--out`` naming any other folder must not delete it."""
    if out.is_dir() and ((out / HASHES_FILE).is_file() or not any(out.iterdir())):
        return
    raise ServeError(f"--out {out}: expected a new folder or a repository 'clfpipe repo' wrote (no {HASHES_FILE} there): "
                     "it is left as it was")


@holding_run("repo")
def build_repository(run_dir: Path, out: Path | None = None, target: str = "embedded",
                     engines: Mapping[str, str] | None = None, decode: str | None = None) -> Path:
    """Assemble OUT atomically (default RUN_DIR/model_repository[_container]) and record it.
    `decode`: pil or nvjpeg (default: the recipe's serve.decode, with auto meaning pil: the caller
    that can see the serving host's GPU resolves auto, as ``clfpipe.pipeline.choose_decode`` does)."""
    if target not in TARGETS:
        raise ManifestError(f"--target: expected one of {', '.join(TARGETS)}, got {target!r}")
    run = RunDir(run_dir)
    manifest = run.read()
    default = "model_repository" if target == "embedded" else "model_repository_container"
    out = Path(out) if out else run_dir / default
    if out.exists():
        _check_replaceable(out)
    try:  # the staging folder is the repository's sibling, so the rename at the end is atomic
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    except OSError as exc:
        raise ServeError(f"cannot write the repository {out}: {exc.strerror or exc}") from exc
    try:
        served = backbones(run, manifest, engines if target == "embedded" else None)  # the container serves ONNX
        decode = decode or manifest.recipe.serve.decode
        decode = "pil" if decode == "auto" else decode
        names, sources = _assemble(staging, run, manifest, target, served, decode)
        if target == "container":  # the readiness probe its Kubernetes deployment runs (a real request)
            shutil.copyfile(probe_module.__file__, staging / "clfpipe_probe.py")
        write_tree_hashes(staging, {"target": target, "models": names, "engines": {b.model: b.variant.engine for b in served},
                                    "decode": decode, "fused": [b.served.fused_model for b in served if _fuses(b, target, decode)],
                                    "sources": sources})
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    repos = dict(manifest.data["stages"].get("repo", {}).get("targets", {}))
    repos[target] = {"path": relative_to_run(out, run.path), "models": names}
    run.write(manifest.with_stage("repo", {"targets": repos, "path": repos.get("embedded", repos[target])["path"]}))
    log.info("repo: %s repository with models %s -> %s", target, ", ".join(names), out)
    if target == "container":
        log.info("repo: serve it with\n  %s", docker_command(out, manifest.recipe.serve.container_image))
    return out
