#!/usr/bin/env bash
# Fill .whl-peer/ with fastai 2.8.12 and what its vision import needs beyond the GPU machines' image
# (which has torch, torchvision, scikit-learn, pandas, scipy, matplotlib): pure-Python wheels and a
# few Python 3.12 ones, ~4 MB, and tomli-w (clfpipe's recipe writer). scripts/gpu_check.sh installs
# them with this checkout into a venv of the image's own python for the `peer` check (issue 13:
# benchmarks/peer_fastai.py on the GPU). Run after ../shared/tools/gpu_wheels.sh. The
# versions are the ones `pip install -e '.[peer]'` resolved here, where the peer benchmark runs.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl-peer && mkdir -p .whl-peer
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl-peer \
    fastai==2.8.12 fastcore==2.2.41 fastprogress==1.1.6 fastdownload==0.0.8 fasttransform==0.0.5 \
    plum-dispatch==2.9.0 beartype==0.23.1 rich==15.0.0 python-fasthtml==0.14.14 starlette==1.10.0 \
    anyio==4.16.0 sniffio python-multipart==0.0.34 itsdangerous==2.2.0 cloudpickle==3.1.3 \
    requests==2.34.2 urllib3==2.8.0 idna==3.20 charset-normalizer==3.5.3 pyyaml==6.0.4 tomli-w==1.2.0 2>&1 | grep -v '^WARNING: Location' || true
du -sh .whl-peer
