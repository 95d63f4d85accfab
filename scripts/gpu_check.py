"""GPU checks (run by scripts/gpu_check.sh on a GPU machine): the demo recipe trained on CUDA
(AMP, channels_last, nvJPEG decode), every export variant gated against PyTorch run on CUDA, and
TensorRT engines where TensorRT exists. Prints one JSON object per check."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clfpipe.contract.engines import Variant
from clfpipe.contract.manifest import RunDir
from clfpipe.contract.preprocess import load_pixels
from clfpipe.contract.recipe import load_recipe
from clfpipe.demo_data import write_demo_dataset
from clfpipe.export.onnx_export import export_onnx, gate_variant, validation_split
from clfpipe.export.tensorrt import build_engine
from clfpipe.nn.folded import Folded
from clfpipe.nn.reference import load_run_model
from clfpipe.runtime.ort import make_session, run_graph
from clfpipe.runtime.tensorrt import trt_status
from clfpipe.train.loop import train_run

VARIANTS = [Variant(), Variant("fp16"), Variant("int8"), Variant("int8-trt"), Variant("fp32", True, True)]


def main() -> int:
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        data, run_dir = Path(tmp) / "data", Path(tmp) / "run"
        write_demo_dataset(data)
        start = time.perf_counter()
        manifest = train_run(data, run_dir, load_recipe(Path(__file__).parent.parent / "recipes" / "demo.toml"))
        print(json.dumps({"check": "train_cuda", "device": manifest.stage("train")["device"],
                          "accuracy": manifest.stage("train")["accuracy"], "seconds": round(time.perf_counter() - start, 1)}))
        run = RunDir(run_dir)
        model = load_run_model(run, manifest).cuda()
        split = validation_split(run, manifest, None)
        pixels = load_pixels(split.files, manifest.preprocess)
        for variant in VARIANTS:
            manifest = export_onnx(run_dir, variant=variant)
            inputs = variant.input_form.prepare(pixels, manifest.preprocess)
            with torch.inference_mode():
                folded = Folded(model, manifest.preprocess, variant, manifest.recipe.multi_label).cuda()
                reference = folded(torch.from_numpy(inputs).cuda()).float().cpu().numpy()
            test = run_graph(make_session(run_dir / variant.file_name), inputs)
            result = gate_variant(variant, manifest, reference, test, np.asarray(split.labels))
            ok &= result.passed
            print(json.dumps({"check": "cuda_torch_vs_ort", "variant": variant.name, **result.to_dict()}))
        available, why = trt_status()
        if not available:
            print(json.dumps({"check": "tensorrt", "skipped": why}))
        else:
            from clfpipe.export.verify import verify_run

            for name in ("onnx", "onnx-fp16", "onnx-int8-trt"):
                build_engine(run_dir, name)
            verification = verify_run(run_dir)
            rows, passed = verification.rows, verification.passed
            ok &= passed
            print(json.dumps({"check": "tensorrt", "passed": passed,
                              "rows": [{"artifact": r.artifact, "runtime": r.runtime, "passed": r.result.passed} for r in rows]}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
