"""The training recipe as data: frozen dataclasses, one per section, loaded from TOML.

A recipe is read like fastai's ``fine_tune``: a list of stages, each saying what is
trainable, which learning rates, how many epochs, which schedule and which image size.
Unknown keys are an error that lists the valid ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Sequence

import tomli_w

from clfpipe.contract.archs import arch_names
from clfpipe.contract.augment import AUGMENTS
from clfpipe.contract.engines import PRECISIONS, SERVED_DECODES, SERVED_ENGINES
from clfpipe.contract.errors import RecipeError
from clfpipe.contract.preprocess import PreprocessSpec

TRAINABLE = ("head", "all")
SCHEDULES = ("constant", "cosine", "sgdr", "onecycle")
UNTIL = ("epochs", "overfit")  # a stage runs its epochs, or stops at the first SGDR cycle end that over-fits
SUGGESTIONS = ("valley", "steep", "minimum")
TTA_POLICIES = ("fastai", "deterministic")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
OPTIMIZERS = ("sgd", "adamw")


def _check_choice(where: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise RecipeError(f"{where}: expected one of {', '.join(choices)}, got {value!r}")


def ranged(default: Any, lo: float, hi: float) -> Any:
    """A field whose value (each value, for a tuple) must be finite and within [lo, hi]."""
    return field(default=default, metadata={"range": (lo, hi)})


def _check_ranges(section: str, config: Any) -> None:
    """Every ranged field of a section: finite and within its declared bounds, else one line."""
    for f in dataclasses.fields(config):
        if "range" not in f.metadata:
            continue
        lo, hi = f.metadata["range"]
        value = getattr(config, f.name)
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, str):  # a word the section checks itself ("auto")
                continue
            if (isinstance(v, float) and not math.isfinite(v)) or not lo <= v <= hi:
                raise RecipeError(f"{section}{f.name}: expected a finite number in [{lo:g}, {hi:g}], got {v!r}")


_BIG = 1_000_000  # upper bound for counts that have no natural one


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet34"
    weights: str = "none"  # "imagenet", "none" or the path of a torchvision state dict
    hidden: int = ranged(512, 1, 65536)  # fastai head: concat-pool -> BN -> dropout -> Linear(hidden) -> ...
    dropout: tuple[float, float] = ranged((0.25, 0.5), 0.0, 0.99)
    # training and validation under bf16 autocast: auto = on CUDA (where bf16 is supported); bf16 =
    # on the CPU too (1.5x a resnet34 step on an AVX-512 BF16 CPU; slower where the CPU lacks it); off
    amp: str = "auto"
    # the training step's forward, loss and backward captured once a stage as a CUDA graph and
    # replayed (train/step.py): a few host calls a step instead of hundreds, each of which waits for
    # the GIL beside the input threads. CUDA, one process (not under torchrun); off until a GPU run
    # shows it pays (benchmarks/train_throughput.py: ratio_graphed)
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        _check_choice("model.arch", self.arch, arch_names())
        _check_choice("model.amp", self.amp, AMP_MODES)
        _check_ranges("model.", self)
        if len(self.dropout) != 2:
            raise RecipeError(f"model.dropout: expected 2 values, got {list(self.dropout)}")
        if not self.weights:
            raise RecipeError("model.weights: expected 'imagenet', 'none' or the path of a state-dict file, got ''")


AMP_MODES = ("auto", "bf16", "off")


@dataclass(frozen=True)
class DataConfig:
    batch_size: int = ranged(32, 2, 65536)  # BatchNorm trains on 2 or more (1 was torch's ValueError traceback)
    # loader worker processes; "auto" = fastai's default, one per CPU this process may use, at most 16,
    # and no more than the loader's batches an epoch
    num_workers: int | str = ranged(0, 0, 1024)
    resize_scale: float = ranged(1.0, 1.0, 4.0)  # resize = round(size * resize_scale), then centre crop size
    device: str = "auto"  # "auto", "cpu" or "cuda"
    cache_dir: str = ""  # precomputed activations; "" = $XDG_CACHE_HOME/clfpipe/features
    labels_csv: str = ""  # multi-label (Planet style): DATA/<labels_csv> with image,tags; "" = class folders
    # training images: "pil" in loader workers, "tensor" batched on the device; auto = tensor on CUDA
    # when the images are JPEGs (nvJPEG decodes a batch at once; PNGs would be decoded one by one)
    decode: str = "auto"
    # GiB of training images kept decoded on the device between epochs (the device decode path):
    # "auto" = a quarter of a CUDA device's memory free when the run starts, none on the CPU; 0 = decode
    # every epoch (kept images hold that memory for the run: set 0 where the training itself needs it)
    decoded_cache_gib: float | str = ranged("auto", 0.0, 65536.0)
    # the device decode path's input (loader workers, decode, augmentation) in a process of its own,
    # its batches handed to the steps through CUDA IPC: no GIL shared with the steps. Off until a GPU
    # run shows it pays (benchmarks/train_throughput.py: ratio_input_process)
    input_process: bool = False

    def __post_init__(self) -> None:
        _check_ranges("data.", self)
        for name in ("num_workers", "decoded_cache_gib"):
            value = getattr(self, name)
            if isinstance(value, str) and value != "auto":
                raise RecipeError(f"data.{name}: expected a number or 'auto', got {value!r}")
        _check_choice("data.device", self.device, ("auto", "cpu", "cuda"))
        _check_choice("data.decode", self.decode, ("auto", "pil", "tensor"))

    def workers(self, cpus: int | None = None, batches: int | None = None) -> int:
        """num_workers as a count: "auto" is one per CPU (``cpus``, else those this process may run
        on), at most AUTO_WORKERS_MAX, and no more than the loader's ``batches`` an epoch (a worker
        builds whole batches: one without a batch to build only costs its start-up)."""
        if isinstance(self.num_workers, int):
            return self.num_workers
        limit = AUTO_WORKERS_MAX if batches is None else batches
        return max(1, min(AUTO_WORKERS_MAX, cpus if cpus is not None else usable_cpus(), limit))

    def decoded_cache_bytes(self, device_free: int | None) -> int:
        """decoded_cache_gib in bytes: "auto" is a quarter of ``device_free`` (a CUDA device's free
        memory; None on the CPU: nothing kept)."""
        if isinstance(self.decoded_cache_gib, float):
            return int(self.decoded_cache_gib * 2**30)
        return device_free // 4 if device_free else 0


AUTO_WORKERS_MAX = 16  # fastai's defaults.cpus: past this, workers mostly add start-up time and memory


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as a container's cpuset sets it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class DistributedConfig:
    """Under torchrun (several processes): data.batch_size is the global batch, split over the ranks."""

    sync_batchnorm: bool = False  # BatchNorm statistics over the whole batch, not each rank's share (CUDA only)


@dataclass(frozen=True)
class StageConfig:
    name: str = "fit"
    trainable: str = "all"  # "head" (body frozen, BN in eval) or "all"
    epochs: int = ranged(3, 1, 100_000)
    lr: tuple[float, ...] = ranged((1e-3,), 1e-12, 100.0)  # one value, or one per layer group (body-early, body-late, head)
    schedule: str = "cosine"
    cycle_len: int = ranged(1, 1, 100_000)  # sgdr: epochs in the first cycle
    cycle_mult: int = ranged(1, 1, 100)  # sgdr: each cycle is cycle_mult times longer than the last
    size: int = ranged(64, 32, 4096)  # the crop; smaller than 32 leaves resnet's last stage nothing to pool
    augment: str = "side_on"
    optimizer: str = "sgd"  # fastai 0.7: SGD with momentum 0.9; "adamw" as an option
    weight_decay: float = ranged(1e-4, 0.0, 1.0)
    momentum: float = ranged(0.9, 0.0, 0.999)
    precompute: bool = False  # train the head on cached activations of the frozen body
    lr_find: bool = False  # run lr_find first and take the peak lr from its suggestion
    warmup: float = ranged(0.0, 0.0, 0.99)  # fraction of the first cycle held at lr/100 (fastai 0.7 used 1/20)
    # "overfit": the lesson's "train with cycle_mult=2 until over-fitting" (train/overfit.py). The first
    # SGDR cycle end that raises neither the metric above the best cycle end's nor the validation loss
    # below the lowest ends the stage, with the best's weights. `epochs` is then the most it runs.
    until: str = "epochs"

    def __post_init__(self) -> None:
        where = f"stage {self.name!r}"
        if not self.name.strip():
            raise RecipeError("stage name: expected a non-empty name, got ''")
        _check_choice(f"{where} trainable", self.trainable, TRAINABLE)
        _check_choice(f"{where} schedule", self.schedule, SCHEDULES)
        _check_choice(f"{where} augment", self.augment, list(AUGMENTS))
        _check_choice(f"{where} optimizer", self.optimizer, OPTIMIZERS)
        _check_choice(f"{where} until", self.until, UNTIL)
        _check_ranges(f"{where} ", self)
        if self.until == "overfit" and self.schedule != "sgdr":
            raise RecipeError(f"{where} until: \"overfit\" stops at the end of an SGDR cycle: expected schedule = \"sgdr\", "
                              f"got {self.schedule!r}")
        if self.precompute and self.trainable != "head":
            raise RecipeError(f"{where}: precompute needs trainable = \"head\" (a trainable body changes its activations), got {self.trainable!r}")
        if len(self.lr) not in (1, 3):
            raise RecipeError(f"{where} lr: expected one positive value or 3 (one per layer group), got {list(self.lr)}")
        if self.schedule == "sgdr":
            check_sgdr(where, self.epochs, self.cycle_len, self.cycle_mult)


def check_sgdr(where: str, epochs: int, cycle_len: int, cycle_mult: int) -> list[int]:
    """Cycle lengths in epochs (cycle_len, cycle_len*mult, ...) that must sum exactly to epochs."""
    cycles, length, total = [], cycle_len, 0
    while total < epochs:  # terminates: cycle_len >= 1, so total grows every turn
        cycles.append(length)
        total += length
        length *= cycle_mult
    if total != epochs:
        raise RecipeError(f"{where}: expected epochs to be a whole number of SGDR cycles {cycles[:-1]} + ..., "
                          f"got epochs={epochs} with cycle_len={cycle_len}, cycle_mult={cycle_mult}")
    return cycles


@dataclass(frozen=True)
class LrFindConfig:
    start: float = ranged(1e-5, 1e-12, 100.0)
    end: float = ranged(10.0, 1e-12, 1000.0)
    num_it: int = ranged(100, 5, _BIG)  # at most this many batches (fastai: one epoch)
    suggestion: str = "valley"

    def __post_init__(self) -> None:
        _check_ranges("lr_find.", self)
        _check_choice("lr_find.suggestion", self.suggestion, SUGGESTIONS)
        if not self.start < self.end:
            raise RecipeError(f"lr_find: expected start < end, got start={self.start} end={self.end}")


@dataclass(frozen=True)
class EvaluateConfig:
    tta: tuple[str, ...] = TTA_POLICIES  # which TTA policies to report next to the plain accuracy
    n_aug: int = ranged(4, 1, 64)  # fastai policy: augmented passes besides the plain one
    report: bool = True  # the data-cleaning report (index.html in the run directory)
    report_images: int = ranged(8, 1, 100)  # images per grid

    def __post_init__(self) -> None:
        _check_ranges("evaluate.", self)
        for policy in self.tta:
            _check_choice("evaluate.tta", policy, TTA_POLICIES)


@dataclass(frozen=True)
class ExportConfig:
    opset: int = ranged(20, 18, 23)  # what torch's dynamo exporter emits
    # Agreement gate: max|diff| of logits <= rtol * max|logit| + atol, and equal top-1.
    rtol: float = ranged(1e-4, 0.0, 1.0)
    atol: float = ranged(1e-5, 0.0, 1.0)
    # int8: a seeded sample of training images; percentile (99.99) clips the rare outliers that
    # MinMax lets stretch the int8 range (measured: fewer flipped images on the demo run).
    calibration_images: int = ranged(64, 1, 100_000)
    calibration_method: str = "percentile"

    def __post_init__(self) -> None:
        _check_ranges("export.", self)
        _check_choice("export.calibration_method", self.calibration_method, CALIBRATION_METHODS)


MAX_BATCH_SIZE = 4096  # images a served batch may hold (bench --batch and a TensorRT profile share it)
MAX_SEED = 2**32 - 1  # numpy's and torch's seeds (the demo data's --seed shares it)

# What NVIDIA's image needs before its tritonserver serves a clfpipe repository: Pillow for the
# preprocessing step, and numpy<2 for the python backend's stub (numpy 2 corrupts every tensor).
CONTAINER_SETUP = 'pip install --quiet pillow "numpy<2"'


@dataclass(frozen=True)
class ServeConfig:
    max_batch_size: int = ranged(32, 1, MAX_BATCH_SIZE)
    # 0: no added wait at low load; under load the batcher still groups what queued while the
    # model ran (measured here: mean batch 6.4 at concurrency 16, and 2 ms less latency at 1)
    max_queue_delay_us: int = ranged(0, 0, 10_000_000)
    preprocess_instances: int = ranged(1, 1, 64)
    model_instances: int = ranged(1, 1, 64)
    ort_threads: int = ranged(0, 0, 1024)  # 0: ONNX Runtime's default (all cores)
    # ORT's idle threads spin by default; on a small CPU host the spinning backbone steals the
    # cores the preprocessing step needs, so the server lets them sleep.
    ort_spin: bool = False
    precision: str = "fp32"  # which exported variant the backbone serves: fp32, fp16, int8, int8-trt (bf16: torch engines)
    # which engine runs the embedded backbones: onnx (ONNX Runtime), aoti or torch (clfpipe export pt2),
    # or auto: the fastest of those exported for this precision, by a short profile on this host
    engine: str = "auto"
    # LABELS: 'label:prob' strings per image unless the request says {"top_k": k}; multi-label: every tag above the threshold
    top_k: int = ranged(3, 1, 1000)
    warmup: bool = True  # model_warmup on every step: the first real request is as fast as the rest
    # pil: pixels identical to training evaluation's; nvjpeg: batched GPU decode, in the backbone's
    # step when it runs on a torch engine (a few levels of pixel difference from Pillow);
    # auto: nvjpeg where 'clfpipe repo' finds CUDA, else pil
    decode: str = "auto"
    # container target (NVIDIA's Triton image): GPU instances, and TensorRT inside the ORT backend
    container_image: str = "nvcr.io/nvidia/tritonserver:24.10-py3"  # Triton 2.51, as the embedded binary
    container_gpu_instances: int = ranged(1, 1, 64)
    container_ort_tensorrt: bool = False
    container_trt_precision: str = "FP16"

    def __post_init__(self) -> None:
        _check_ranges("serve.", self)
        _check_choice("serve.precision", self.precision, list(PRECISIONS))
        _check_choice("serve.decode", self.decode, SERVED_DECODES)
        _check_choice("serve.engine", self.engine, SERVED_ENGINES)
        _check_choice("serve.container_trt_precision", self.container_trt_precision, ("FP32", "FP16"))
        if not self.container_image.strip():
            raise RecipeError("serve.container_image: expected an image name, got ''")


@dataclass(frozen=True)
class Recipe:
    seed: int = ranged(0, 0, MAX_SEED)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    stages: tuple[StageConfig, ...] = (StageConfig(),)
    lr_find: LrFindConfig = field(default_factory=LrFindConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def __post_init__(self) -> None:
        _check_ranges("", self)
        if not self.stages or len(self.stages) > 100:
            raise RecipeError(f"stages: expected 1 to 100 stages, got {len(self.stages)}")

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
    if origin in (typing.Union, types.UnionType):  # the first type the value is
        for arm in typing.get_args(hint):
            with contextlib.suppress(RecipeError):
                return _coerce(where, arm, value)
        names = " or ".join(getattr(arm, "__name__", str(arm)) for arm in typing.get_args(hint))
        raise RecipeError(f"{where}: expected {names}, got {value!r}")
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
            # repr: a key is the user's text, and its newlines or quotes must not break the one-line error
            f"unknown key {where + unknown[0]!r} in recipe: valid keys are {', '.join(valid)}"
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


def _shown(text: str) -> str:
    """The user's text in a one-line error: as typed, or escaped (repr) where it holds a newline or
    another character that does not print."""
    return text if text.isprintable() else repr(text)


def _set_path(node: Any, path: list[str], value: Any, text: str) -> None:
    head, rest = path[0], path[1:]
    if isinstance(node, list):
        if head == "*":
            indices = list(range(len(node)))
        elif head.isdigit() and int(head) < len(node):
            indices = [int(head)]
        else:
            raise RecipeError(f"--set {_shown(text)}: expected a stage index below {len(node)} or '*', got {head!r}")
        for i in indices:
            if rest:
                _set_path(node[i], rest, value, text)
            else:
                node[i] = value  # a whole stage: the recipe check says what a stage must be
        return
    if not isinstance(node, dict):
        raise RecipeError(f"--set {_shown(text)}: expected a table to hold {head!r}, got the value {node!r}")
    if not rest:
        node[head] = value
        return
    if head == "stages":
        node.setdefault("stages", [dataclasses.asdict(StageConfig())])
    else:
        node.setdefault(head, {})
    _set_path(node[head], rest, value, text)


def shipped_recipes() -> dict[str, Path]:
    """The recipes that ship with clfpipe (``clfpipe.recipes``), by name."""
    folder = Path(str(resources.files("clfpipe.recipes")))
    return {p.stem: p for p in sorted(folder.glob("*.toml"))}


def recipe_path(path: str | Path) -> Path:
    """A recipe file: the path given where it is one, else the shipped recipe of that name ("demo"),
    also beside a folder of that name (``clfpipe demo --workdir demo`` makes one)."""
    shipped = shipped_recipes()
    if not Path(path).is_file() and str(path) in shipped:
        return shipped[str(path)]
    return Path(path)


def load_recipe(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Recipe:
    """Read a recipe TOML (a path, or a shipped recipe's name; the defaults when path is None) and
    apply --set overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(recipe_path(path).read_text())
        except FileNotFoundError as exc:
            raise RecipeError(f"recipe file not found: {path} (expected a TOML file, or one of the recipes that ship "
                              f"with clfpipe: {', '.join(shipped_recipes())})") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise RecipeError(f"{path}: not valid TOML: {exc}") from exc
        except OSError as exc:
            raise RecipeError(f"cannot read the recipe {path}: {exc.strerror or exc}") from exc
    return recipe_from_dict(apply_overrides(data, overrides))


def dump_recipe(recipe: Recipe) -> str:
    return tomli_w.dumps(recipe.to_dict())
