#!/usr/bin/env bash
# The GPU checks, for a machine with an NVIDIA GPU; one JSON line per check, within about 8 minutes.
#
#   scripts/gpu_check.sh            # in a checkout whose environment has clfpipe and CUDA torch
#
# Where the machine has no network, put the wheels it lacks in .whl/ beforehand (nvidia-pytriton,
# numpy<2, tritonclient, python-rapidjson, tomli-w, polygraphy, PyYAML) and a .whl/gpu_env.sh that
# makes a virtual environment of them first on PATH; this script sources it when it is there. The
# python3 first on PATH is what Triton's python stub embeds: it must have numpy<2 ('serve up' checks).
set -uo pipefail
cd "$(dirname "$0")/.."
[ -f .whl/gpu_env.sh ] && . .whl/gpu_env.sh
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 2
status=0
run() { echo "== $1"; shift; timeout 420 "$@" || { echo "{\"check\": \"$1\", \"failed\": true}"; status=1; }; }
run "demo end to end on CUDA (train, export, repo, serve, predict over HTTP and gRPC, agreement)" \
    python3 -m clfpipe demo --workdir /tmp/gpu_demo --http-port 18000 --grpc-port 18001 --metrics-port 18002
run "CUDA PyTorch vs ONNX Runtime per export variant, TensorRT where it is" python3 scripts/gpu_check.py
run "verify (every variant on every runtime here)" python3 -m clfpipe verify --run /tmp/gpu_demo/run
run "engines (torch.compile vs eager fp16, ONNX Runtime fp32/int8 on the CPU)" python3 benchmarks/engines.py --rounds 5
run "serving (Triton vs the same engine in process)" python3 benchmarks/serving.py
run "train throughput at 224, batch 256 (goal e2e/synthetic >= 0.85)" \
    python3 benchmarks/train_throughput.py --size 224 --batch 256 --steps 30 --workers 16
run "precompute at 224 on 3000 images (goal >= 10x)" python3 benchmarks/precompute.py --size 224 --images 3000
exit $status
