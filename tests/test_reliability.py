"""Faults an operator meets, reproduced: a killed stub, a swapped or edited model file, a stale pid
file, leftover shared memory, paths with spaces, remote model control, numpy 2 in the stub."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clfpipe.cli import main
from clfpipe.contract.errors import ServeError
from clfpipe.contract.integrity import HASHES_FILE
from clfpipe.contract.manifest import RunDir
from clfpipe.serve.bench import model_stats, settled_stats
from clfpipe.serve.client import AsyncClassifier, Classifier
from clfpipe.serve.server import (
    PID_FILE,
    Ports,
    check_model_control,
    check_stub_numpy,
    is_ready,
    read_info,
    server_status,
    start_server,
    stop_server,
    stub_pid,
)
from clfpipe.serve.supervisor import start_supervisor

pytestmark = pytest.mark.slow


def _ports() -> Ports:
    return Ports.free()


def _image(run: Path) -> bytes:
    return sorted(RunDir(run).data_dir(RunDir(run).read()).rglob("valid/*/*.jpg"))[0].read_bytes()


def _served_again(url: str, image: bytes, within_s: float) -> None:
    """Good requests succeed again within ``within_s`` seconds of now (the supervisor's restart)."""
    start = time.monotonic()
    while True:
        try:
            Classifier(url, "http").probabilities([image])
            return
        except ServeError:
            assert time.monotonic() - start < within_s, f"good requests did not succeed again within {within_s} s"
            time.sleep(0.2)


def test_a_killed_stub_is_reported_unhealthy_and_the_supervisor_restores_service(trained_run, tmp_path):
    repo, state = trained_run / "model_repository", tmp_path / "state"
    info = start_server(repo, state, ports=_ports(), supervise=False)
    try:
        client = Classifier(info.http_url, "http")
        image = _image(trained_run)
        assert client.probabilities([image]).shape == (1, 3)
        os.kill(stub_pid(info.pid, "preprocess"), signal.SIGKILL)
        time.sleep(0.5)
        assert is_ready(info.host, info.ports.http)  # Triton's own readiness does not notice...
        _, status = server_status(state)
        assert status.startswith("unhealthy") and "preprocess_0_0" in status  # ...clfpipe's does
        info = start_supervisor(state, info)
        _served_again(info.http_url, image, within_s=10)
        recorded = read_info(state)
        assert recorded.pid != info.pid and "preprocess_0_0" in recorded.restarts[-1]["reason"]
        assert server_status(state)[1] == "ready"
    finally:
        stop_server(state)
    assert not list(Path("/dev/shm").glob(f"clfpipe_{info.ports.http}_*"))


def test_a_swapped_or_edited_model_file_is_refused(trained_run, tmp_path, capsys):
    repo = tmp_path / "repo"
    shutil.copytree(trained_run / "model_repository", repo)
    onnx = repo / "backbone" / "1" / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one weight byte
    onnx.write_bytes(bytes(data))
    with pytest.raises(ServeError, match=r"not the repository 'clfpipe repo' wrote: changed: backbone/1/model\.onnx"):
        start_server(repo, tmp_path / "state", ports=_ports())
    shutil.copytree(trained_run / "model_repository" / "backbone", repo / "injected")
    assert main(["serve", "up", "--repo", str(repo), "--state-dir", str(tmp_path / "state")]) == 2
    err = capsys.readouterr().err
    assert "changed: backbone/1/model.onnx (and" in err and len(err.strip().splitlines()) == 1
    (repo / HASHES_FILE).unlink()
    with pytest.raises(ServeError, match=f"no readable {HASHES_FILE}"):
        start_server(repo, tmp_path / "state", ports=_ports())


def test_verify_checks_the_repository_and_the_run_files_are_copies(run_copy, capsys):
    assert main(["repo", "--run", str(run_copy)]) == 0
    served = run_copy / "model_repository" / "backbone" / "1" / "model.onnx"
    assert served.stat().st_ino != (run_copy / "model-pre.onnx").stat().st_ino  # a copy, not a hard link
    assert main(["verify", "--run", str(run_copy)]) == 0
    capsys.readouterr()
    served.write_bytes(served.read_bytes()[:-10] + b"0123456789")
    assert main(["verify", "--run", str(run_copy)]) == 1
    out = capsys.readouterr().out
    assert "repository model_repository: FAIL (changed: backbone/1/model.onnx)" in out


def test_verify_takes_a_sample_of_some_classes_and_names_a_missing_folder(run_copy, tmp_path, capsys):
    """A sample with one class was refused (every class folder was required); a folder that is not
    there was 'expected a ... folder in its parent'."""
    sample = tmp_path / "sample"
    (sample / "checker").mkdir(parents=True)
    shutil.copy(next((RunDir(run_copy).data_dir(RunDir(run_copy).read()) / "valid" / "checker").glob("*.jpg")), sample / "checker")
    assert main(["verify", "--run", str(run_copy), "--images", str(sample)]) == 0
    assert "verify: 1 images against PyTorch fp32" in capsys.readouterr().out
    (sample / "dog").mkdir()
    shutil.copy(next((sample / "checker").iterdir()), sample / "dog")
    assert main(["verify", "--run", str(run_copy), "--images", str(sample)]) == 2
    assert f"{sample}: expected class folders among ['checker', 'horizontal', 'vertical'], got ['checker', 'dog']" in capsys.readouterr().err
    assert main(["verify", "--run", str(run_copy), "--images", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.strip() == (f"clfpipe: error: --images: expected a folder laid out like DATA/valid (<class>/*.jpg), "
                                               f"got {tmp_path / 'nothing'} (no such folder)")
    (tmp_path / "a.jpg").write_bytes(b"x")
    assert main(["verify", "--run", str(run_copy), "--images", str(tmp_path / "a.jpg")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"got {tmp_path / 'a.jpg'} (a file, not a folder)")


def test_verify_reports_every_missing_or_changed_artifact_and_export_makes_them_again(run_copy, capsys):
    """The first missing or changed file stopped the whole check with one line: the other artifacts
    went unchecked, and a second damaged one was found only after the first was mended."""
    (run_copy / "model-pre.onnx").unlink()
    with open(run_copy / "model.onnx", "ab") as fh:
        fh.write(b"x")
    assert main(["verify", "--run", str(run_copy)]) == 1
    out = capsys.readouterr().out
    assert "onnx                   -                 FAIL (artifact 'onnx' changed since export wrote it" in out
    assert "onnx-pre               -                 FAIL (artifact 'onnx-pre' missing: expected file" in out
    assert re.search(r"^onnx-pre-tta +onnxruntime-cpu +1\.0000 .* pass ", out, re.MULTILINE), out
    report = json.loads((run_copy / "verify.json").read_text())
    assert not report["passed"] and sorted(report["unreadable"]) == ["onnx", "onnx-pre"]
    # export said "the served variants are exported already" of these two
    assert main(["export", "onnx", "--run", str(run_copy)]) == 0
    assert capsys.readouterr().out.strip() == "exported onnx, onnx-pre"
    assert main(["verify", "--run", str(run_copy)]) == 0


def test_exported_graphs_and_the_manifest_carry_no_build_paths(trained_run):
    for onnx in trained_run.glob("*.onnx"):
        data = onnx.read_bytes()
        for needle in (str(Path(sys.prefix)).encode(), b"site-packages", str(Path.cwd()).encode()):
            assert needle not in data, (onnx.name, needle)
    manifest = json.loads((trained_run / "manifest.json").read_text())
    assert not Path(manifest["data_dir"]).is_absolute()
    assert all(not Path(t["path"]).is_absolute() for t in manifest["stages"]["repo"]["targets"].values())
    assert str(trained_run.parent) not in json.dumps(manifest)


def test_a_stale_pid_file_never_signals_another_process(tmp_path, capsys):
    bystander = subprocess.Popen(["sleep", "60"])
    state = tmp_path / "state"
    state.mkdir()
    ports = _ports()
    (state / PID_FILE).write_text(json.dumps({"pid": bystander.pid, "host": "127.0.0.1", "ports": ports.__dict__,
                                              "repo": "/nowhere", "log": "", "started": 0.0, "process_started": 1}))
    region = Path("/dev/shm") / f"clfpipe_{ports.http}_left-behind"
    region.write_bytes(b"x" * 1024)
    try:
        assert main(["serve", "status", "--state-dir", str(state)]) == 3
        assert main(["serve", "down", "--state-dir", str(state)]) == 0
        assert bystander.poll() is None  # still running: not ours, not signalled
        assert not (state / PID_FILE).exists() and not region.exists()
    finally:
        bystander.kill()
        region.unlink(missing_ok=True)


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=200), st.recursive(st.none() | st.integers() | st.text(max_size=8),
                                                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                                                            st.sampled_from(["pid", "ports", "http", "host", "repo"]), inner,
                                                            max_size=4), max_leaves=8).map(lambda v: json.dumps(v).encode())))
def test_any_pid_file_names_a_server_or_none(tmp_path, content):
    """A pid file that was not UTF-8 (a torn write, a disk error) made every serve command a
    UnicodeDecodeError traceback."""
    (tmp_path / PID_FILE).write_bytes(content)
    info = read_info(tmp_path)
    assert info is None or isinstance(info.ports, Ports)


def test_paths_with_spaces_and_non_ascii_serve(trained_run, tmp_path):
    home = tmp_path / "my runs" / "ünïcödé"
    repo = home / "model repository"
    shutil.copytree(trained_run / "model_repository", repo)
    state = home / "state dir"
    info = start_server(repo, state, ports=_ports(), supervise=False)
    try:
        assert Classifier(info.http_url, "http").probabilities([_image(trained_run)]).shape == (1, 3)
        assert " " not in info.served_repo and info.repo == str(repo.resolve())
    finally:
        stop_server(state)


def test_remote_model_control_needs_to_be_asked_for():
    check_model_control("explicit", "127.0.0.1", allow_remote=False)
    check_model_control("none", "0.0.0.0", allow_remote=False)
    with pytest.raises(ServeError, match="bind 127.0.0.1, or pass --allow-remote-model-control"):
        check_model_control("explicit", "0.0.0.0", allow_remote=False)
    check_model_control("poll", "0.0.0.0", allow_remote=True)


def test_serve_up_refuses_numpy_2_in_the_stubs_python(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text("#!/bin/sh\necho 2.1.3\n")
    (fake / "python3").chmod(0o755)
    with pytest.raises(ServeError, match=r"has numpy 2\.1\.3: Triton 2\.51's python backend corrupts every tensor.*numpy<2"):
        check_stub_numpy({**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"})
    assert check_stub_numpy(dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")).startswith("1.")


def _classified(url: str) -> dict[str, dict]:
    """The classifier ensemble's statistics on one server, in the form ``settled_stats`` reads."""
    with grpcclient.InferenceServerClient(url) as client:
        return {"classifier": model_stats(client, "grpc", "classifier")}


def _async_labels(urls: list[str], paths: list[Path]) -> list[tuple[str, str]]:
    async def go() -> list[tuple[str, str]]:
        async with AsyncClassifier(urls, "grpc") as client:
            return [(p.file, p.label) for p in await client.predict(paths)]

    return asyncio.run(go())


def test_a_client_of_several_servers_spreads_requests_and_skips_one_that_fails_or_is_gone(trained_run, server, tmp_path):
    state = tmp_path / "second"
    second = start_server(trained_run / "model_repository", state, ports=_ports(), supervise=False)
    image = _image(trained_run)
    try:
        client = Classifier(f"{server.grpc_url},{second.grpc_url}", "grpc")
        used = []
        for _ in range(4):
            probs = client.probabilities([image])
            used.append(client.url)
        assert used == [server.grpc_url, second.grpc_url] * 2  # round-robin, one request each
        with pytest.raises(ServeError, match="refused: .*not an image"):
            client.probabilities([b"junk"])
        assert client.url == server.grpc_url  # refused by its turn's server, not sent on to the next
        folder = sorted(RunDir(trained_run).data_dir(RunDir(trained_run).read()).glob("valid/*"))[0]
        both = [server.grpc_url, second.grpc_url]
        before = _classified(second.grpc_url)
        answers = _async_labels(both, [folder, folder])  # 2 x 30 images: a request of 32, then one of 28
        assert settled_stats(lambda: _classified(second.grpc_url), before, 28)["classifier"]["inference_count"] \
            == before["classifier"]["inference_count"] + 28  # the second request went to the second server
        os.kill(stub_pid(second.pid, "preprocess"), signal.SIGKILL)  # the second now fails every request (500)
        time.sleep(0.5)
        for _ in range(3):  # a request whose turn is the second's is answered by the first
            assert (client.probabilities([image]) == probs).all() and client.url == server.grpc_url
        assert _async_labels(both, [folder, folder]) == answers  # and so by the asyncio client
        stop_server(state)
        for _ in range(3):  # the stopped one is skipped, the answers keep coming
            assert (client.probabilities([image]) == probs).all()
        assert _async_labels(both, [folder, folder]) == answers
        with pytest.raises(ServeError, match=f"cannot reach Triton at {second.grpc_url}"):
            _async_labels([second.grpc_url], [folder])
        # one already down when the client is made is skipped too: it refused to start at all
        late = Classifier(f"{second.grpc_url},{server.grpc_url}", "grpc")
        assert late.urls == [server.grpc_url] and (late.probabilities([image]) == probs).all()
        with pytest.raises(ServeError, match=f"cannot reach Triton at {second.grpc_url}"):
            Classifier(second.grpc_url, "grpc")
    finally:
        stop_server(state)


def test_a_json_request_declaring_a_huge_tensor_costs_a_restart_over_http_and_nothing_over_grpc(trained_run, tmp_path):
    """Triton 2.51's HTTP frontend sizes a JSON input by its declared shape before any check: one
    request of 30 GB declared (12 bytes sent) aborts tritonserver (std::bad_alloc). clfpipe cannot
    mend the binary; its supervisor brings service back, and gRPC refuses the same request."""
    import urllib.error
    import urllib.request

    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    state = tmp_path / "state"
    info = start_server(trained_run / "model_repository", state, ports=_ports())
    huge = [1, 100_000, 100_000, 3]
    try:
        pixels = grpcclient.InferInput("IMAGE_PIXELS", [1, 2, 2, 3], "UINT8")
        pixels.set_data_from_numpy(np.zeros((1, 2, 2, 3), np.uint8))
        pixels._input.shape[:] = huge  # the declared shape, as a hostile client sends it
        with pytest.raises(InferenceServerException, match="input byte size mismatch"):
            grpcclient.InferenceServerClient(info.grpc_url).infer("classifier_pixels", [pixels])
        assert read_info(state).pid == info.pid and not read_info(state).restarts

        body = json.dumps({"inputs": [{"name": "IMAGE_PIXELS", "shape": huge, "datatype": "UINT8", "data": []}]}).encode()
        request = urllib.request.Request(f"http://{info.http_url}/v2/models/classifier_pixels/infer", body, method="POST")
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # no answer: the process is gone
            urllib.request.urlopen(request, timeout=30)
        _served_again(info.http_url, _image(trained_run), within_s=15)
        recorded = read_info(state)
        assert recorded.pid != info.pid and "is gone" in recorded.restarts[-1]["reason"]
    finally:
        stop_server(state)
