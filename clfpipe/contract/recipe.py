"""The training recipe as data: frozen dataclasses, one per section, loaded from TOML.

A recipe is read like fastai's ``fine_tune``: a list of stages, each saying what is
trainable, which learning rates, how many epochs, which schedule and which image size.
Unknown keys are an error that lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import tomli_w

from clfpipe.contract.archs import arch_names
from clfpipe.contract.augment import AUGMENTS
from clfpipe.contract.engines import PRECISIONS
from clfpipe.contract.errors import RecipeError
from clfpipe.contract.preprocess import PreprocessSpec

TRAINABLE = ("head", "all")
SCHEDULES = ("constant", "cosine", "sgdr", "onecycle")
SUGGESTIONS = ("valley", "steep", "minimum")
TTA_POLICIES = ("fastai", "deterministic")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
OPTIMIZERS = ("sgd", "adamw")


def _check_choice(where: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise RecipeError(f"{where}: expected one of {', '.join(choices)}, got {value!r}")


def _check_positive(where: str, value: int) -> None:
    if value <= 0:
        raise RecipeError(f"{where}: expected a positive number, got {value}")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet34"
    weights: str = "none"  # "imagenet", "none" or the path of a torchvision state dict
    hidden: int = 512  # fastai head: concat-pool -> BN -> dropout -> Linear(hidden) -> ...
    dropout: tuple[float, float] = (0.25, 0.5)

    def __post_init__(self) -> None:
        _check_choice("model.arch", self.arch, arch_names())
        if len(self.dropout) != 2:
            raise RecipeError(f"model.dropout: expected 2 values, got {list(self.dropout)}")


@dataclass(frozen=True)
class DataConfig:
    batch_size: int = 32
    num_workers: int = 0
    resize_scale: float = 1.0  # resize = round(size * resize_scale), then centre crop size
    device: str = "auto"  # "auto", "cpu" or "cuda"
    cache_dir: str = ""  # precomputed activations; "" = $XDG_CACHE_HOME/clfpipe/features
    labels_csv: str = ""  # multi-label (Planet style): DATA/<labels_csv> with image,tags; "" = class folders
    decode: str = "auto"  # training images: "pil" in loader workers, "tensor" batched on the device; auto = tensor on CUDA

    def __post_init__(self) -> None:
        _check_positive("data.batch_size", self.batch_size)
        if self.resize_scale < 1.0:
            raise RecipeError(f"data.resize_scale: expected >= 1.0, got {self.resize_scale}")
        _check_choice("data.device", self.device, ("auto", "cpu", "cuda"))
        _check_choice("data.decode", self.decode, ("auto", "pil", "tensor"))


@dataclass(frozen=True)
class StageConfig:
    name: str = "fit"
    trainable: str = "all"  # "head" (body frozen, BN in eval) or "all"
    epochs: int = 3
    lr: tuple[float, ...] = (1e-3,)  # one value, or one per layer group (body-early, body-late, head)
    schedule: str = "cosine"
    cycle_len: int = 1  # sgdr: epochs in the first cycle
    cycle_mult: int = 1  # sgdr: each cycle is cycle_mult times longer than the last
    size: int = 64
    augment: str = "side_on"
    optimizer: str = "sgd"  # fastai 0.7: SGD with momentum 0.9; "adamw" as an option
    weight_decay: float = 1e-4
    momentum: float = 0.9
    precompute: bool = False  # train the head on cached activations of the frozen body
    lr_find: bool = False  # run lr_find first and take the peak lr from its suggestion
    warmup: float = 0.0  # fraction of the first cycle held at lr/100 (fastai 0.7 used 1/20)

    def __post_init__(self) -> None:
        where = f"stage {self.name!r}"
        _check_choice(f"{where} trainable", self.trainable, TRAINABLE)
        _check_choice(f"{where} schedule", self.schedule, SCHEDULES)
        _check_choice(f"{where} augment", self.augment, AUGMENTS)
        _check_choice(f"{where} optimizer", self.optimizer, OPTIMIZERS)
        _check_positive(f"{where} epochs", self.epochs)
        _check_positive(f"{where} size", self.size)
        if self.precompute and self.trainable != "head":
            raise RecipeError(f"{where}: precompute needs trainable = \"head\" (a trainable body changes its activations), got {self.trainable!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise RecipeError(f"{where} warmup: expected a fraction in [0, 1), got {self.warmup}")
        if len(self.lr) not in (1, 3) or min(self.lr) <= 0:
            raise RecipeError(f"{where} lr: expected one positive value or 3 (one per layer group), got {list(self.lr)}")


@dataclass(frozen=True)
class LrFindConfig:
    start: float = 1e-5
    end: float = 10.0
    num_it: int = 100  # at most this many batches (fastai: one epoch)
    suggestion: str = "valley"

    def __post_init__(self) -> None:
        _check_choice("lr_find.suggestion", self.suggestion, SUGGESTIONS)
        if not 0 < self.start < self.end:
            raise RecipeError(f"lr_find: expected 0 < start < end, got start={self.start} end={self.end}")


@dataclass(frozen=True)
class EvaluateConfig:
    tta: tuple[str, ...] = TTA_POLICIES  # which TTA policies to report next to the plain accuracy
    n_aug: int = 4  # fastai policy: augmented passes besides the plain one
    report: bool = True  # the data-cleaning report (index.html in the run directory)
    report_images: int = 8  # images per grid

    def __post_init__(self) -> None:
        for policy in self.tta:
            _check_choice("evaluate.tta", policy, TTA_POLICIES)


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 20
    # Agreement gate: max|diff| of logits <= rtol * max|logit| + atol, and equal top-1.
    rtol: float = 1e-4
    atol: float = 1e-5
    # int8: a seeded sample of training images; percentile (99.99) clips the rare outliers that
    # MinMax lets stretch the int8 range (measured: fewer flipped images on the demo run).
    calibration_images: int = 64
    calibration_method: str = "percentile"

    def __post_init__(self) -> None:
        _check_choice("export.calibration_method", self.calibration_method, CALIBRATION_METHODS)
        _check_positive("export.calibration_images", self.calibration_images)


@dataclass(frozen=True)
class ServeConfig:
    max_batch_size: int = 32
    # 0: no added wait at low load; under load the batcher still groups what queued while the
    # model ran (measured here: mean batch 6.4 at concurrency 16, and 2 ms less latency at 1)
    max_queue_delay_us: int = 0
    preprocess_instances: int = 1
    model_instances: int = 1
    ort_threads: int = 0  # 0: ONNX Runtime's default (all cores)
    # ORT's idle threads spin by default; on a small CPU host the spinning backbone steals the
    # cores the preprocessing step needs, so the server lets them sleep.
    ort_spin: bool = False
    precision: str = "fp32"  # which exported variant the backbone serves: fp32, fp16, int8, int8-trt
    top_k: int = 3  # LABELS: 'label:prob' strings per image unless the request says {"top_k": k}
    warmup: bool = True  # model_warmup on every step: the first real request is as fast as the rest
    # pil: pixels identical to training evaluation's; nvjpeg: batched GPU decode where CUDA and
    # torch are in the server's environment (a few levels of pixel difference from Pillow)
    decode: str = "pil"
    # container target (NVIDIA's Triton image): GPU instances, and TensorRT inside the ORT backend
    container_image: str = "nvcr.io/nvidia/tritonserver:24.10-py3"  # Triton 2.51, as the embedded binary
    container_gpu_instances: int = 1
    container_ort_tensorrt: bool = False
    container_trt_precision: str = "FP16"

    def __post_init__(self) -> None:
        _check_positive("serve.max_batch_size", self.max_batch_size)
        _check_choice("serve.precision", self.precision, list(PRECISIONS))
        _check_choice("serve.decode", self.decode, ("pil", "nvjpeg"))
        _check_choice("serve.container_trt_precision", self.container_trt_precision, ("FP32", "FP16"))


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: tuple[StageConfig, ...] = (StageConfig(),)
    lr_find: LrFindConfig = field(default_factory=LrFindConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def __post_init__(self) -> None:
        if not self.stages:
            raise RecipeError("stages: expected at least one stage, got none")

    @property
    def multi_label(self) -> bool:
        return bool(self.data.labels_csv)

    def final_size(self) -> int:
        return self.stages[-1].size

    def preprocess_spec(self, stage: int = -1) -> PreprocessSpec:
        """A stage's evaluation pixels (fastai's sz); the last stage's is what inference uses."""
        return PreprocessSpec.for_size(self.stages[stage].size, self.data.resize_scale)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _coerce(where: str, hint: Any, value: Any) -> Any:
    """Check one TOML value against a field's type hint."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        item_type = typing.get_args(hint)[0]
        return tuple(_coerce(where, item_type, v) for v in items)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise RecipeError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where or 'recipe'}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise RecipeError(
            f"unknown key '{where}{unknown[0]}' in recipe: valid keys are {', '.join(valid)}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint, key = hints[name], f"{where}{name}"
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{key}.")
        elif name == "stages":
            if not isinstance(value, list):
                raise RecipeError(f"stages: expected a list of tables, got {value!r}")
            kwargs[name] = tuple(_build(StageConfig, s, f"stages.{i}.") for i, s in enumerate(value))
        else:
            kwargs[name] = _coerce(key, hint, value)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{where or 'recipe'}: {exc}") from exc


def recipe_from_dict(data: Mapping[str, Any]) -> Recipe:
    return _build(Recipe, data, "")


def parse_override(text: str) -> tuple[list[str], Any]:
    """'stages.0.epochs=2' -> (['stages', '0', 'epochs'], 2). Values are TOML; bare words are strings."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set: expected key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply --set overrides to a recipe dict; 'stages.*.key' sets the key in every stage."""
    for text in overrides:
        path, value = parse_override(text)
        _set_path(data, path, value, text)
    return data


def _set_path(node: Any, path: list[str], value: Any, text: str) -> None:
    head, rest = path[0], path[1:]
    if isinstance(node, list):
        if head == "*":
            targets = node
        elif head.isdigit() and int(head) < len(node):
            targets = [node[int(head)]]
        else:
            raise RecipeError(f"--set {text}: expected a stage index below {len(node)} or '*', got {head!r}")
        for target in targets:
            _set_path(target, rest, value, text)
        return
    if not rest:
        node[head] = value
        return
    if head == "stages":
        node.setdefault("stages", [dataclasses.asdict(StageConfig())])
    else:
        node.setdefault(head, {})
    _set_path(node[head], rest, value, text)


def load_recipe(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe TOML (or the defaults when path is None) and apply --set overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError as exc:
            raise RecipeError(f"recipe file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise RecipeError(f"{path}: not valid TOML: {exc}") from exc
    return recipe_from_dict(apply_overrides(data, overrides))


def dump_recipe(recipe: Recipe) -> str:
    return tomli_w.dumps(recipe.to_dict())
