#!/usr/bin/env bash
# GPU-only checks, run on a lent GPU machine within 8 minutes (no network there: the wheels it
# lacks - tomli-w, onnxscript, onnx-ir, polygraphy, tritonclient, python-rapidjson - travel in
# .whl/, see the device tool's README). Prints one JSON line per check.
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 2
status=0
echo "== CUDA training, CUDA PyTorch vs ONNX Runtime per export variant, TensorRT if present"
python3 scripts/gpu_check.py || status=1
echo "== train throughput (goal: ratio >= 0.85)"
python3 benchmarks/train_throughput.py --size 224 --batch 256 --steps 40 --workers 16 || status=1
echo "== precompute speedup"
python3 benchmarks/precompute.py --size 224 || status=1
exit $status
