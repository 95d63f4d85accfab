#!/usr/bin/env bash
# The GPU checks, for a machine with an NVIDIA GPU: one JSON line per check, within BUDGET seconds
# (default 480: the 8 minutes of issue 9), most important first; a check that would not fit is
# skipped with a line that says so.
#
#   scripts/gpu_check.sh [CHECK ...]     # all checks, or the named ones in that order (demo clean serving train graphs input_process augment decode precompute pt2 engines archs peer)
#
# Where the machine has no network, fill .whl/ beforehand (../shared/tools/gpu_wheels.sh --http:
# nvidia-pytriton, numpy<2, tritonclient and its HTTP client, python-rapidjson, tomli-w,
# polygraphy, and .whl/gpu_env.sh, which makes a venv of them first on PATH); this script sources
# it when it is there and installs this checkout into that venv. The python3 first on PATH is what
# Triton's python stub embeds: it must have numpy<2 ('serve up' checks). Results go to
# $OUT/gpu_check.jsonl (and the whole log to $OUT/gpu_check.log) when OUT is set, else to stdout.
# The peer check (issue 13) needs fastai: scripts/peer_wheels.sh fills .whl-peer (~4 MB), and the
# datasets travel as peerdata/ (benchmarks/real_datasets.py). It runs in its own venv of the image's
# python (numpy 2; fastai does not import beside numpy 1.26), so it needs neither .whl nor the
# numpy<2 venv: carry .whl-peer and peerdata only (.whl with them exceeds a 64 MiB carry).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-}
BUDGET=${BUDGET:-480}
START=$(date +%s)
RESULTS=${OUT:+$OUT/gpu_check.jsonl}
LOG=${OUT:+$OUT/gpu_check.log}
[ -n "$LOG" ] && exec > >(tee -a "$LOG") 2>&1
IMAGE_PYTHON=$(command -v python3)  # the image's own interpreter (numpy 2), before gpu_env.sh puts its venv first
cd "$ROOT" && [ -f .whl/gpu_env.sh ] && . .whl/gpu_env.sh
python3 -m pip install -q --no-index --no-deps --no-build-isolation "$ROOT" || { echo '{"check": "install", "failed": true}'; exit 2; }
# Run from outside the checkout: its clfpipe/ folder lacks the stages the installed package maps in.
WORK=/tmp/gpu_check && rm -rf "$WORK" && mkdir -p "$WORK" && cd "$WORK"
export PYTHONUNBUFFERED=1
python3 -c "import torch, numpy; assert torch.cuda.is_available(), 'no CUDA device'; print('gpu:', torch.cuda.get_device_name(), 'torch', torch.__version__, 'numpy', numpy.__version__)" || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
status=0
# what the image's python has of the peer check's needs (fastai comes from .whl-peer, into the peer venv)
PEER=$("$IMAGE_PYTHON" -c "import importlib.util as u, json; print(json.dumps({'check': 'image_packages', **{m: u.find_spec(m) is not None for m in ('fastai', 'fastcore', 'sklearn', 'skimage', 'pandas', 'matplotlib', 'scipy', 'plum')}}))")
emit() { echo "$1"; [ -n "$RESULTS" ] && echo "$1" >> "$RESULTS"; return 0; }

# check NAME SECONDS COMMAND...: run it if SECONDS still fit in the budget; its JSON lines are kept.
check() {
    local name=$1 want=$2; shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt 30 ]; then emit "{\"check\": \"$name\", \"skipped\": \"out of time ($left s left of $BUDGET)\"}"; return; fi
    local limit=$(( want < left ? want : left )) t0=$(date +%s)
    echo "== $name (limit ${limit}s): $*"
    timeout -k 10 "$limit" "$@" > "$WORK/$name.out" 2>&1; local rc=$?
    cat "$WORK/$name.out"
    grep -h '^{' "$WORK/$name.out" | while read -r line; do emit "$line"; done
    emit "{\"check\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}"
    [ "$rc" -eq 0 ] || status=1
}

DEMO=$WORK/demo
PEER_VENV=/tmp/peervenv
run_demo() {
  # train, export, repo (engine and decode auto: the exported program on CUDA, nvJPEG fused), serve,
  # predict over HTTP and gRPC, served vs PyTorch by the decoder's gate. DEMO_SET: recipe overrides,
  # space-separated (DEMO_SET=data.input_process=true: the training input in its own process)
  local overrides=() item
  for item in ${DEMO_SET:-}; do overrides+=(--set "$item"); done
  check demo 240 python3 -m clfpipe -v demo --workdir "$DEMO" --recipe "$ROOT/recipes/demo.toml" \
      --http-port 18000 --grpc-port 18001 --metrics-port 18002 "${overrides[@]}"
}
run_clean() {
  # data clean on CUDA: every image of the demo run's data ranked by its loss (the table and its page)
  [ -d "$DEMO/run" ] || { emit '{"check": "clean", "skipped": "needs the demo run first"}'; return; }
  check clean 60 python3 -m clfpipe data clean --run "$DEMO/run" --out "$WORK/clean"
  cp "$WORK/clean/cleaning.csv" "$OUT/cleaning.csv" 2>/dev/null
}
run_serving() {
  # SERVING_INSTANCES: stub processes of the fused step (each has its own nvJPEG decoder, which takes one batch at a time)
  check serving 150 python3 "$ROOT/benchmarks/serving_gpu.py" --seconds ${SERVING_SECONDS:-4} --rounds ${SERVING_ROUNDS:-3} \
      --instances ${SERVING_INSTANCES:-2}
}
run_train() {
  check train 300 python3 "$ROOT/benchmarks/train_throughput.py" --size 224 --batch 256 --steps ${TRAIN_STEPS:-20} --workers 14 \
      --profile ${TRAIN_PROFILE_STEPS:-0}
}
run_augment() {
  # the augmentation's share of the GPU: its crops' products in half precision (the default on CUDA), then in float32
  check augment 60 python3 "$ROOT/benchmarks/augment_cost.py" --batch 256 --size 224
  check augment_fp32 60 python3 "$ROOT/benchmarks/augment_cost.py" --batch 256 --size 224 --resample-dtype float32
}
run_input_process() {
  # data.input_process against the threads, batch for batch, at the benchmark's size: the IPC hand-over gives whole batches
  check input_process 120 python3 "$ROOT/benchmarks/input_process_check.py" --batch 256 --size 224 --epochs 1 --workers 14
  # the child's end: torch's words when it exits with shared memory not yet freed (stop 24 printed both)
  local clean=true
  grep -q -e "driver shutting down" -e "Producer process has been terminated" "$WORK/input_process.out" && clean=false
  emit "{\"check\": \"input_process_exit\", \"clean\": $clean}"
}
run_decode() {
  # the training decode step on nvJPEG against Pillow: every format a folder may hold, damaged JPEGs nvJPEG refuses (decoded on the host), a cut file named
  check decode 60 python3 "$ROOT/benchmarks/decode_check.py" --damaged 400
}
run_precompute() {
  check precompute 90 python3 "$ROOT/benchmarks/precompute.py" --size 224 --images ${PRECOMPUTE_IMAGES:-3000} --batch 64 --workers 14
}
run_pt2() {
  # the AOTInductor package on the GPU (load-checked in a child: it has crashed its loader here), then every row
  [ -d "$DEMO/run" ] || { emit '{"check": "pt2", "skipped": "needs the demo run first"}'; return; }
  check pt2 200 python3 -m clfpipe export pt2 --run "$DEMO/run" --precision fp16
  check verify 90 python3 -m clfpipe verify --run "$DEMO/run"
}
run_graphs() {
  # model.cuda_graphs: the graphed step against the eager one, weight for weight (tests/test_train_step.py,
  # skipped without CUDA; pytest from the image or .whl: pip download --no-deps -d .whl pytest pluggy
  # iniconfig), then the demo recipe trained with it, both ways; the log says whether each stage's
  # step was captured. importlib: the tests import the installed clfpipe, not the checkout's folder
  if python3 -c "import pytest" 2>/dev/null; then
    check graphs_equal 120 python3 -m pytest -q -p no:cacheprovider --import-mode=importlib "$ROOT/tests/test_train_step.py" -k graphed -rs
  else
    emit '{"check": "graphs_equal", "skipped": "no pytest in this python (add it to .whl)"}'
  fi
  [ -d "$WORK/graphs_data" ] || python3 -m clfpipe data demo "$WORK/graphs_data" > /dev/null
  local graphs
  for graphs in true false; do
    check "graphs_train_$graphs" 120 python3 -m clfpipe -v train --data "$WORK/graphs_data" --run "$WORK/graphs_run_$graphs" \
        --recipe "$ROOT/recipes/demo.toml" --set model.cuda_graphs=$graphs
  done
}
run_engines() {
  check engines 200 python3 "$ROOT/benchmarks/engines.py" --rounds 5
}
run_archs() {
  # resnext50 against resnet34 on the GPU: the seed notes' "twice as long, 2-3x the memory", at the recipes' batch
  check archs 90 python3 "$ROOT/benchmarks/archs.py" --size 224 --batch 64 --steps 10
}
peer_env() {
  # A venv of the image's python (its numpy 2, torch, scikit-learn through a .pth) with fastai and this
  # checkout: in the numpy<2 venv the server needs, fastai's import fails (AttributeError: numpy has no
  # attribute 'long', from an image package written for numpy 2; H200, 2026-11-27).
  [ -x "$PEER_VENV/bin/python3" ] && return 0
  "$IMAGE_PYTHON" -m venv --without-pip "$PEER_VENV" || return 1  # pip and setuptools: the image's, through the .pth
  local image_site venv_site
  image_site=$("$IMAGE_PYTHON" -c 'import site; print(site.getsitepackages()[0])')
  venv_site=$("$PEER_VENV/bin/python3" -c 'import site; print(site.getsitepackages()[0])')
  echo "$image_site" > "$venv_site/zz_image.pth"
  "$PEER_VENV/bin/python3" -m pip install -q --no-index --no-deps --no-build-isolation "$ROOT" "$ROOT"/.whl-peer/*.whl
}
run_peer() {
  # issue 13: fastai's standard path against recipes/peer.toml on real datasets (fastai from .whl-peer,
  # the datasets from peerdata/ when carried, else written here: faces needs scikit-image)
  local why py=$PEER_VENV/bin/python3
  [ -d "$ROOT/.whl-peer" ] || { emit '{"check": "peer", "skipped": "no .whl-peer (scripts/peer_wheels.sh fills it)"}'; return; }
  peer_env || { emit '{"check": "peer", "skipped": "the peer venv could not be made"}'; return; }
  if ! why=$("$py" -c "import fastai.vision.all, clfpipe.train.loop" 2>&1); then  # the import's last line says what is missing
    emit "$(python3 -c 'import json, sys; print(json.dumps({"check": "peer", "skipped": "fastai does not import (scripts/peer_wheels.sh fills .whl-peer): " + sys.argv[1]}))' "$(echo "$why" | tail -1)")"
    return
  fi
  for name in ${PEER_DATASETS:-digits faces}; do
    local data=$ROOT/peerdata/$name
    [ -d "$data" ] || { data=$WORK/$name; "$py" "$ROOT/benchmarks/real_datasets.py" "$name" "$data" || continue; }
    # PEER_SEEDS=0,1,2: each seed on both sides, then their means (one seed's top-1 moves by a point or two).
    # On the H200 a seed took ~45 s (digits) and ~55 s (faces) for both sides together.
    local seeds=${PEER_SEEDS:-0}
    check "peer_$name" "${PEER_SECONDS:-$((40 + 70 * $(echo "$seeds" | tr ',' ' ' | wc -w)))}" \
        "$py" "$ROOT/benchmarks/peer_fastai.py" --data "$data" --size 64 --seeds "$seeds"
    # PEER_PROFILE=N: one more clfpipe run under cProfile, its N costliest functions (where the GPU run's time goes)
    [ -n "${PEER_PROFILE:-}" ] && check "peer_profile_$name" 90 \
        "$py" "$ROOT/benchmarks/peer_fastai.py" --data "$data" --size 64 --only clfpipe --profile "$PEER_PROFILE"
  done
}
CHECKS=("$@")
[ "${#CHECKS[@]}" -eq 0 ] && CHECKS=(demo clean serving train graphs input_process augment decode precompute pt2 engines archs peer)
emit "$PEER"
# what the figures were measured with: the GPU, its driver, the CUDA torch was built for, the host's CPUs
emit "$(python3 -c "import json, os, torch, torchvision, numpy; print(json.dumps({'check': 'env', 'gpu': torch.cuda.get_device_name(), 'torch': torch.__version__, 'torchvision': torchvision.__version__, 'cuda': torch.version.cuda, 'cudnn': torch.backends.cudnn.version(), 'numpy': numpy.__version__, 'cpus': os.cpu_count(), 'driver': os.popen('nvidia-smi --query-gpu=driver_version --format=csv,noheader').read().strip()}))")"
for name in "${CHECKS[@]}"; do
  case $name in
    demo|clean|serving|train|graphs|input_process|augment|decode|precompute|pt2|engines|archs|peer) "run_$name" ;;
    *) emit "{\"check\": \"$name\", \"skipped\": \"unknown check (demo clean serving train graphs input_process augment decode precompute pt2 engines archs peer)\"}" ;;
  esac
done
if [ -n "$OUT" ]; then  # what explains a failure: the server's log, the verify report
  cp "$DEMO/server/server.log" "$OUT/demo_server.log" 2>/dev/null
  cp "$DEMO/run/verify.json" "$OUT/verify.json" 2>/dev/null
fi
emit "{\"check\": \"total\", \"seconds\": $(( $(date +%s) - START )), \"status\": $status}"
exit $status
