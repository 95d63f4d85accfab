"""The README's command list, run in order as a new user would, on the demo data (with this test's
own folders, ports and shorter training)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from clfpipe.cli import main
from clfpipe.contract.manifest import RunDir
from clfpipe.serve.client import Classifier
from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow

FAST = ["--set", "stages.*.size=32", "--set", "stages.*.epochs=1", "--set", "lr_find.num_it=30",
        "--set", "evaluate.tta=[\"deterministic\"]", "--set", "stages.*.cycle_mult=1"]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- readme-commands -->", 1)[1].split("```", 2)[1]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.startswith("clfpipe ")]


def test_the_readme_lists_the_whole_journey():
    verbs = [shlex.split(c)[1] for c in readme_commands()]
    for verb in ("data", "train", "lr-find", "export", "verify", "repo", "serve", "predict", "bench", "run"):
        assert verb in verbs


def test_readme_commands_run_in_order(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLFPIPE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.chdir(ROOT)
    ports = ["--http-port", str(free_port()), "--grpc-port", str(free_port()), "--metrics-port", str(free_port())]
    try:
        for command in readme_commands():
            argv = [re.sub(r"^runs/", f"{tmp_path}/", arg) for arg in shlex.split(command)[1:]]
            if argv[0] in ("train", "run"):
                argv += FAST
            if argv[:2] == ["serve", "up"]:
                argv += ports
            if argv[0] == "bench":
                argv += ["--window", "0.5", "--max-windows", "4", "--out", str(tmp_path / "bench")]
            code = main(argv)
            out = capsys.readouterr()
            assert code == 0, f"{command}: exit {code}\n{out.err[-2000:]}"
            if argv[0] == "predict" and "--json" in argv:
                assert len(out.out.splitlines()) == 30  # the folder's images, each answered
    finally:
        main(["serve", "down"])
    manifest = RunDir(tmp_path / "r1").read()
    assert {"onnx", "onnx-pre", "onnx-pre-tta", "onnx-int8"} <= set(manifest.data["artifacts"])
    assert (tmp_path / "r1" / "lr_find_stage2.png").is_file() and (tmp_path / "r1" / "model_repository_container").is_dir()
    assert (tmp_path / "bench" / "bench.png").is_file()
    assert len((tmp_path / "submission.csv").read_text().splitlines()) == 1 + 90  # the header, then every valid image
    assert set(RunDir(tmp_path / "r2").read().data["stages"]) == {"train", "export", "repo"}
    assert Path(tmp_path / "r2" / "model_repository" / "classifier_tta" / "config.pbtxt").is_file()


def readme_client() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("<!-- readme-client -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]


def test_readme_client_block_talks_to_a_real_server_without_clfpipe(trained_run, demo_data, server):
    """The README's plain-tritonclient example, run as written (in a child with no clfpipe import)
    against the session's server: the answers it prints are the ones clfpipe's client gets."""
    image = demo_data / "valid" / "vertical" / "vertical_0000.jpg"
    code = readme_client()
    assert "clfpipe" not in code
    code = re.sub(r'open\("[^"]+"', f"open({str(image)!r}", code)
    code = code.replace("127.0.0.1:8000", server.http_url).replace("127.0.0.1:8001", server.grpc_url)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    plain, tta = done.stdout.splitlines()
    expected = Classifier(server.http_url, "http").predict([image], top_k=2)[0]
    expected_tta = Classifier(server.grpc_url, "grpc", model="classifier_tta").predict([image])[0]
    labels = " ".join(f"b'{label}:{prob:.6f}'" for label, prob in expected.top_k)
    assert plain == f"{expected.label} {round(expected.prob, 3)} [{labels}]"
    assert tta == f"{expected_tta.label} {round(expected_tta.prob, 3)}"
