"""What an exported artifact is, as data: engines, precisions (each with its agreement gate),
input forms and variants.

A variant is one engine x one precision x folded preprocessing (uint8 NHWC pixels in, the spec's
normalisation in the graph) x folded TTA (the deterministic views and the probability average in
the graph). Its artifact name, file name, input dtype and layout, output tensor and activation all
follow from these four fields, here and nowhere else. Adding a precision or an engine is one entry
in the tables below plus the code that builds or runs it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from clfpipe.contract import tensors
from clfpipe.contract.errors import ExportError
from clfpipe.contract.preprocess import PreprocessSpec, normalize
from clfpipe.contract.probabilities import activation_for


@dataclass(frozen=True)
class Gate:
    """How close a precision must stay to PyTorch fp32 on the validation images (a pass rule as
    data, after Polygraphy's ``CompareFunc.simple``). Every condition set must hold."""

    exact: bool = False  # every top-1 equal and max|diff| <= rtol * max|ref| + atol
    min_top1: float = 0.0  # fraction of images whose top-1 agrees
    min_cosine: float = 0.0  # the worst image's cosine of probabilities
    max_metric_drop: float | None = None  # accuracy (F2 for multi-label) at most this far below fp32


@dataclass(frozen=True)
class Precision:
    name: str
    gate: Gate
    onnx_form: str = "fp32"  # how the fp32 ONNX graph becomes this one: fp32, fp16, int8 (QDQ), "" (no ONNX form)
    symmetric_activations: bool = False  # int8 for TensorRT: symmetric int8 activations (S8S8)
    trt_flag: str | None = None  # TensorRT 10's BuilderFlag; TensorRT 11 reads precision from the graph


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", Gate(exact=True)),
    Precision("fp16", Gate(min_top1=0.995, min_cosine=0.999), onnx_form="fp16", trt_flag="FP16"),
    # MLPerf accepts int8 at >= 99% of fp32 accuracy; on a small validation set, 1 point
    Precision("int8", Gate(max_metric_drop=0.01), onnx_form="int8", trt_flag="INT8"),
    Precision("int8-trt", Gate(max_metric_drop=0.01), onnx_form="int8", symmetric_activations=True, trt_flag="INT8"),
    Precision("bf16", Gate(min_top1=0.995, min_cosine=0.999), onnx_form=""),  # torch engines on CUDA
)}


@dataclass(frozen=True)
class InputForm:
    dtype: str  # numpy dtype name
    layout: str  # NCHW or NHWC

    def shape(self, crop: int) -> list[Any]:
        return ["batch", 3, crop, crop] if self.layout == "NCHW" else ["batch", crop, crop, 3]

    def prepare(self, pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
        """uint8 NHWC pixels from the spec -> this form."""
        return normalize(pixels, spec) if self.layout == "NCHW" else np.ascontiguousarray(pixels)

    def preparer(self, spec: PreprocessSpec) -> Prepare:
        """``prepare`` with the spec bound: what ``in_chunks`` applies chunk by chunk."""
        return functools.partial(self.prepare, spec=spec)


Prepare = Callable[[np.ndarray], np.ndarray]
CHUNK = 64  # images a runner takes at once where a whole set is run


def unchanged(chunk: np.ndarray) -> np.ndarray:
    return chunk


def chunks(batch: Any, size: int = CHUNK) -> Iterator[tuple[int, Any]]:
    """(start, slice) of `batch` (an array, whose slices are views, or a list), `size` images at a
    time. Callers prepare each slice where they use it, so a set's float32 input (4x its uint8
    pixels, 600 KB an image at 224) exists one chunk at a time (a prepared chunk held here would
    live on beside the next one)."""
    for start in range(0, len(batch), size):
        yield start, batch[start : start + size]


def in_chunks(run: Callable[[np.ndarray], Any], batch: np.ndarray, size: int = CHUNK,
              prepare: Prepare | None = None) -> np.ndarray:
    """`run` over `batch`'s ``chunks``, each through `prepare` first, its outputs concatenated: every
    runner that takes a whole set goes through here."""
    prepare = prepare or unchanged
    return np.concatenate([np.asarray(run(prepare(chunk))) for _, chunk in chunks(batch, size)])


FLOAT_NCHW = InputForm("float32", "NCHW")  # normalised, as the PyTorch model takes it
PIXELS_NHWC = InputForm("uint8", "NHWC")  # the spec's resized and cropped pixels, 4x fewer bytes


@dataclass(frozen=True)
class Engine:
    name: str  # the artifact name's prefix
    suffix: str  # file suffix
    precisions: tuple[str, ...]
    built_from: str | None = None  # an engine compiled from another engine's artifact
    torch_dtype: dict[str, str] | None = None  # torch engines: precision -> the dtype the graph computes in
    device_input: bool = False  # takes pixels already on the device: the fused nvJPEG step can feed it


_ONNX_PRECISIONS = ("fp32", "fp16", "int8", "int8-trt")
_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
ENGINES: dict[str, Engine] = {e.name: e for e in (
    Engine("onnx", ".onnx", _ONNX_PRECISIONS),
    Engine("trt", ".plan", _ONNX_PRECISIONS, built_from="onnx"),
    # torch.export + AOTInductor: one package per variant, compiled for this host's device
    Engine("aoti", ".pt2", tuple(_TORCH_DTYPES), torch_dtype=_TORCH_DTYPES, device_input=True),
    # the exported program itself (torch.export.save), run by torch: where an AOTInductor package will not load
    Engine("torch", ".ep.pt2", tuple(_TORCH_DTYPES), torch_dtype=_TORCH_DTYPES, device_input=True),
)}


def _check_choice(what: str, value: str, table: Mapping[str, Any]) -> None:
    if value not in table:
        raise ExportError(f"{what}: expected one of {', '.join(table)}, got {value!r}")


@dataclass(frozen=True)
class Variant:
    precision: str = "fp32"
    fold_preprocess: bool = False  # uint8 NHWC input; normalisation in the graph
    fold_tta: bool = False  # the deterministic TTA views and the probability average in the graph
    engine: str = "onnx"

    def __post_init__(self) -> None:
        _check_choice("engine", self.engine, ENGINES)
        _check_choice("--precision", self.precision, {p: PRECISIONS[p] for p in ENGINES[self.engine].precisions})

    @property
    def _parts(self) -> list[str]:
        return ([] if self.precision == "fp32" else [self.precision]) + (["pre"] if self.fold_preprocess else []) \
            + (["tta"] if self.fold_tta else [])

    @property
    def name(self) -> str:
        """The manifest's artifact name: 'onnx' for the plain fp32 graph, else e.g. 'onnx-int8-pre-tta'."""
        return "-".join([self.engine, *self._parts])

    @property
    def file_name(self) -> str:
        """model.onnx, model-fp16-pre.onnx, model-pre.plan, ..."""
        return "-".join(["model", *self._parts]) + ENGINES[self.engine].suffix

    @property
    def input_form(self) -> InputForm:
        return PIXELS_NHWC if self.fold_preprocess else FLOAT_NCHW

    @property
    def output_name(self) -> str:
        return tensors.PROBS if self.fold_tta else tensors.LOGITS

    @property
    def gate(self) -> Gate:
        return PRECISIONS[self.precision].gate

    def activation(self, multi_label: bool) -> str:
        """What turns this variant's output into probabilities."""
        return activation_for(multi_label, probs_in_graph=self.fold_tta)

    def on(self, engine: str) -> "Variant":
        """The same graph on another engine (a TensorRT plan built from this ONNX)."""
        return Variant(self.precision, self.fold_preprocess, self.fold_tta, engine)

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "fold_preprocess": self.fold_preprocess, "fold_tta": self.fold_tta,
                "engine": self.engine}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Variant":
        return cls(data.get("precision", "fp32"), bool(data.get("fold_preprocess")), bool(data.get("fold_tta")),
                   data.get("engine", "onnx"))

    @classmethod
    def parse(cls, name: str) -> "Variant":
        """An artifact name back to its variant: 'onnx-fp16-pre' -> Variant('fp16', True, False)."""
        for variant in all_variants():
            if variant.name == name:
                return variant
        raise ExportError(f"expected an artifact name like onnx, onnx-fp16 or onnx-int8-pre-tta, got {name!r}")


def all_variants() -> list[Variant]:
    return [Variant(p, pre, tta, e) for e, engine in ENGINES.items() for p in engine.precisions
            for pre in (False, True) for tta in (False, True)]


@dataclass(frozen=True)
class Served:
    """One served backbone: the Triton model that runs a folded variant, and its ensembles."""

    model: str
    ensemble: str
    fold_tta: bool

    def variant(self, precision: str, engine: str = "onnx") -> Variant:
        return Variant(precision, fold_preprocess=True, fold_tta=self.fold_tta, engine=engine)

    @property
    def fused_model(self) -> str:
        """The model that decodes encoded images on the GPU and runs the backbone in one step."""
        return f"{self.model}_image"


SERVED: tuple[Served, ...] = (Served("backbone", "classifier", False), Served("backbone_tta", "classifier_tta", True))


# What the embedded server's python backbone can run; "auto" picks among the exported ones by profile.
SERVED_ENGINES = ("auto", "onnx", "aoti", "torch")
# How the served steps decode JPEGs: Pillow on the CPU, or nvJPEG on the GPU (fused with the
# backbone step when its engine takes device input); auto: nvjpeg where CUDA and torch are.
SERVED_DECODES = ("auto", "pil", "nvjpeg")
# What decoding with another decoder may change, judged as PyTorch fp32 on its pixels against on
# Pillow's (the served engine itself is judged on the decoder's own pixels by the precision's
# gate). nvJPEG's pixels differ by a few levels (another IDCT and chroma upsampling), which moves
# borderline images far (demo model on an H200: 3 of 90 top-1 flipped, min cosine 0.92, accuracy
# 0.9111 vs 0.8778): like int8, it is judged on accuracy, not on digits.
DECODE_GATES: dict[str, Gate | None] = {"pil": None, "nvjpeg": Gate(max_metric_drop=0.01)}


def served_variants(precision: str, engine: str = "onnx") -> list[Variant]:
    """What a repository needs: the plain fp32 graph (the reference export), then what the server
    runs, uint8 pixels in, without and with TTA, at the serving precision."""
    return [Variant(), *(served.variant(precision, engine) for served in SERVED)]
