"""Bad input to the CLI: exit code 2 and one line naming the problem, no traceback."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from clfpipe.cli import main
from clfpipe.contract.dataset import image_files, scan_split
from clfpipe.contract.manifest import RunDir
from clfpipe.demo_data import DemoSpec, write_demo_dataset


@pytest.fixture
def tiny_data(tmp_path):
    root = tmp_path / "data"
    write_demo_dataset(root, spec=DemoSpec(train_per_class=3, valid_per_class=2, image_size=32))
    return root


def _one_line_error(capsys, argv, expected):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("clfpipe: error: ") and expected in err, err
    return err


def test_missing_data_folder(tmp_path, capsys):
    _one_line_error(capsys, ["train", "--data", str(tmp_path / "nope"), "--run", str(tmp_path / "run")], "data folder not found")
    assert not (tmp_path / "run").exists()


def test_a_class_folders_subfolders_are_read_and_hidden_files_are_not(tiny_data, tmp_path, capsys):
    """Images in a class folder's subfolders were dropped unsaid (torchvision's ImageFolder and
    fastai read them), and macOS's ._name.jpg resource forks stopped a run as unusable images."""
    folder = tiny_data / "train" / "checker"
    (folder / "2019").mkdir()
    moved = [f.rename(folder / "2019" / f.name) for f in sorted(folder.glob("*.jpg"))[:2]]
    (folder / "._copy.jpg").write_bytes(b"\0\5\26\7Mac OS X")
    split = scan_split(tiny_data, "train")
    assert set(moved) <= set(split.files) and len(split) == 9 and split.classes == ("checker", "horizontal", "vertical")
    shutil.rmtree(folder / "2019")
    for f in folder.glob("*.jpg"):
        f.unlink()
    _one_line_error(capsys, ["train", "--data", str(tiny_data), "--run", str(tmp_path / "run")], "class folder has no images")
    assert not (tmp_path / "run").exists()


def test_symlinked_subfolders_are_read_once_and_a_loop_ends(tiny_data, tmp_path):
    """A class folder's symlinked subfolder is read as ImageFolder reads it (os.walk followlinks),
    and a link back up the tree is walked once instead of forever."""
    folder = tiny_data / "train" / "checker"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = [f.rename(elsewhere / f.name) for f in sorted(folder.glob("*.jpg"))[:2]]
    (folder / "linked").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "up").symlink_to(folder, target_is_directory=True)  # checker/linked/up -> checker
    (folder / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    files = image_files(folder)
    assert [f.relative_to(folder).as_posix() for f in files if f.parent != folder] == [f"linked/{m.name}" for m in moved]
    assert len(files) == len(set(f.resolve() for f in files)) == 3
    assert len(scan_split(tiny_data, "train")) == 9


def test_corrupt_image_file_is_named(tiny_data, tmp_path, capsys):
    bad = tiny_data / "train" / "vertical" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    err = _one_line_error(capsys, ["train", "--data", str(tiny_data), "--run", str(tmp_path / "run")], "unusable image file")
    assert f"{bad}: not a decodable image" in err


def test_valid_classes_must_match_train(tiny_data, tmp_path, capsys):
    shutil.rmtree(tiny_data / "valid" / "checker")
    _one_line_error(capsys, ["train", "--data", str(tiny_data), "--run", str(tmp_path / "run")], "expected class folders")


def test_unknown_recipe_key_from_the_command_line(tiny_data, tmp_path, capsys):
    _one_line_error(capsys, ["train", "--data", str(tiny_data), "--run", str(tmp_path / "r"), "--set", "model.depth=3"],
                    "valid keys are arch, weights")


def test_run_directory_without_manifest_or_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, ["export", "onnx", "--run", str(tmp_path / "empty")], "has no manifest.json")
    _one_line_error(capsys, ["repo", "--run", str(tmp_path / "missing")], "run directory not found")


def test_corrupt_manifest(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text('{"schema_version": 1, "recipe": ')
    _one_line_error(capsys, ["export", "onnx", "--run", str(tmp_path)], "corrupt manifest")


def test_serve_up_without_a_repository(tmp_path, capsys):
    _one_line_error(capsys, ["serve", "up", "--repo", str(tmp_path), "--state-dir", str(tmp_path / "s")],
                    "expected a model repository")


def test_predict_without_a_server(tmp_path, capsys):
    _one_line_error(capsys, ["predict", "--url", "127.0.0.1:1", str(tmp_path / "x.jpg")], "cannot reach Triton")
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    _one_line_error(capsys, ["predict", "--url", "127.0.0.1:1", "--protocol", "grpc", str(img)], "cannot reach Triton")


def test_predict_csv_that_cannot_be_written_is_one_line_before_any_request(tmp_path, capsys):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    # port 1: were a request sent first, this would say "cannot reach Triton"
    _one_line_error(capsys, ["predict", "--url", "127.0.0.1:1", "--csv", str(tmp_path), str(img)],
                    f"--csv {tmp_path}: expected a file name, got a folder")
    _one_line_error(capsys, ["predict", "--url", "127.0.0.1:1", "--csv", str(img / "out.csv"), str(img)],
                    f"--csv {img / 'out.csv'}: expected a place predict can write to")


def test_data_demo_command(tmp_path, capsys):
    assert main(["data", "demo", str(tmp_path / "d"), "--seed", "1"]) == 0
    assert "wrote 360 train and 90 valid images" in capsys.readouterr().out


def test_imagenet_weights_without_a_network_name_the_offline_option(monkeypatch):
    import urllib.error

    import torchvision

    from clfpipe.contract.errors import RecipeError
    from clfpipe.contract.recipe import ModelConfig
    from clfpipe.nn.models import build_model

    def offline(*args, **kwargs):
        if kwargs.get("weights") == "DEFAULT":
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        return original(*args, **kwargs)

    original = torchvision.models.get_model
    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(RecipeError) as err:
        build_model(ModelConfig(weights="imagenet"), 3)
    message = str(err.value)
    assert "cannot fetch the resnet34 weights" in message and "path of a torchvision state-dict file" in message
    assert "\n" not in message


@pytest.mark.parametrize("nproc", ["0", "-3", "1025"])
def test_nproc_out_of_range_is_one_line_before_anything_starts(tiny_data, tmp_path, capsys, nproc):
    """--nproc 0 and -3 trained in one process, as if nothing were wrong."""
    _one_line_error(capsys, ["train", "--data", str(tiny_data), "--run", str(tmp_path / "run"), "--nproc", nproc],
                    f"--nproc: expected 1 to 1024 processes, got {nproc}")
    assert not (tmp_path / "run").exists()


def test_resume_with_a_changed_recipe_or_data_is_refused(tmp_path, capsys):
    """The overrides were silently ignored: a run resumed with --set stages.0.epochs=2 trained 30."""
    for extra, named in ((["--set", "stages.0.epochs=2"], "--set"), (["--data", "d", "--recipe", "r.toml"], "--data, --recipe")):
        _one_line_error(capsys, ["train", "--resume", str(tmp_path), *extra],
                        "train --resume continues a run with its own recipe and data (recipe.resolved.toml): expected "
                        f"no --data, --run, --recipe or --set with it, got {named}")


@pytest.mark.parametrize(("content", "expected"), [
    (b"garbage\n", "(not one clfpipe wrote: torch's weights-only loader refuses what it holds)"),  # it advised weights_only=False
    (b"PK\x03\x04" + bytes(200), "unreadable training state (PytorchStreamReader failed"),  # a torn zip: torch wrote paragraphs
])
def test_an_unreadable_training_state_is_one_line(tmp_path, capsys, content, expected):
    (tmp_path / "train_state.pt").write_bytes(content)
    _one_line_error(capsys, ["train", "--resume", str(tmp_path)], expected)


def test_a_demo_seed_out_of_range_is_one_line_before_anything_is_written(tmp_path, capsys):
    """-1 was numpy's ValueError traceback, after the last demo run was cleared."""
    _one_line_error(capsys, ["data", "demo", str(tmp_path / "d"), "--seed", "-1"], "--seed: expected 0 to 4294967295, got -1")
    _one_line_error(capsys, ["demo", "--workdir", str(tmp_path / "w"), "--seed", str(2**32)], "--seed: expected 0 to 4294967295")
    assert not (tmp_path / "d").exists() and not (tmp_path / "w").exists()


def test_a_run_directory_that_cannot_be_made_is_one_line(tiny_data, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    _one_line_error(capsys, ["train", "--data", str(tiny_data), "--run", str(blocker / "run"), "--set", "stages.0.size=32"],
                    "cannot create the run directory")


@pytest.mark.slow
def test_data_and_run_paths_with_spaces_and_non_ascii_train(tiny_data, tmp_path):
    data = tmp_path / "my data ünï"
    shutil.copytree(tiny_data, data)
    run = tmp_path / "runs with space" / "ü run"
    assert main(["train", "--data", str(data), "--run", str(run), "--set", "stages.0.size=32", "--set", "stages.0.epochs=1",
                 "--set", "evaluate.tta=[]"]) == 0
    assert RunDir(run).data_dir(RunDir(run).read()) == data.resolve()


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "127.0.0.1:99999", ":::", "127.0.0.1"])
def test_a_malformed_url_is_one_line_before_any_client_is_made(tiny_data, capsys, url):
    image = next((tiny_data / "valid" / "vertical").glob("*.jpg"))
    for verb in (["predict", str(image)], ["bench", "--images", str(image)]):
        _one_line_error(capsys, [verb[0], "--url", url, *verb[1:]], "--url: expected HOST:PORT with a port in 1..65535")


@pytest.mark.parametrize(("flags", "expected"), [
    (["--seconds", "nan"], "--seconds: expected 0.001 to 3600.0, got nan"),  # measured forever
    (["--seconds", "inf"], "--seconds: expected 0.001 to 3600.0, got inf"),
    (["--window", "1e9"], "--window: expected 0.001 to 600.0, got 1000000000.0"),
    (["--requests", "0"], "--requests: expected 1 to 10000000, got 0"),
    (["--batch", "5000"], "--batch: expected 1 to 4096, got 5000"),
    (["--max-images", "0"], "--max-images: expected 1 to 1000000, got 0"),
])
def test_bench_amounts_are_finite_and_bounded_before_any_request(tiny_data, tmp_path, capsys, flags, expected):
    image = next((tiny_data / "valid" / "vertical").glob("*.jpg"))
    _one_line_error(capsys, ["bench", "--url", "127.0.0.1:1", "--images", str(image), "--out", str(tmp_path / "b"), *flags], expected)
    assert not (tmp_path / "b").exists()  # nothing made for a sweep that never runs


def test_bench_out_is_checked_before_the_sweep(tiny_data, tmp_path, capsys):
    """A file or an unwritable place as --out failed after the whole sweep ('File exists'), its
    figures lost; no server here, so the sweep was never reached."""
    image = next((tiny_data / "valid" / "vertical").glob("*.jpg"))
    (tmp_path / "file").write_text("x")
    argv = ["bench", "--url", "127.0.0.1:1", "--images", str(image), "--out"]
    _one_line_error(capsys, [*argv, str(tmp_path / "file")], f"--out {tmp_path / 'file'}: expected a folder, got a file")
    _one_line_error(capsys, [*argv, str(tmp_path / "file" / "sub")], f"--out {tmp_path / 'file' / 'sub'}: expected a folder bench can write to")


def test_verify_takes_a_server_only_with_served(tmp_path, capsys):
    for flags in (["--url", "127.0.0.1:8000"], ["--protocol", "grpc"], ["--state-dir", str(tmp_path)]):
        _one_line_error(capsys, ["verify", "--run", str(tmp_path), *flags], "expected --served with them")


def test_bench_reads_the_statistics_once_they_count_every_answer():
    """Triton records a step's statistics after its response has gone out: a read at once counted
    61 of 64 answered images under load. The read is repeated until each model counts them all."""
    from clfpipe.serve.bench import settled_stats

    before = {"classifier": {"inference_count": 10.0}, "backbone": {"inference_count": 4.0}}
    reads = iter([{"classifier": {"inference_count": 74.0}, "backbone": {"inference_count": 61.0}},
                  {"classifier": {"inference_count": 74.0}, "backbone": {"inference_count": 66.0}},
                  {"classifier": {"inference_count": 74.0}, "backbone": {"inference_count": 68.0}}])
    assert settled_stats(lambda: next(reads), before, 64)["backbone"]["inference_count"] == 68.0
    lagging = {"classifier": {"inference_count": 70.0}, "backbone": {"inference_count": 60.0}}
    assert settled_stats(lambda: lagging, before, 64, timeout=0.05) is lagging  # never settles: what is there


def test_bench_sends_an_even_sample_of_a_big_folder():
    """bench decoded every image of the folder to check it and held them all in memory before the
    first request: minutes and gigabytes for a whole validation set."""
    from pathlib import Path

    from clfpipe.serve.bench import sample_evenly

    files = [Path(f"{c}/{i}.jpg") for c in "abcd" for i in range(250)]
    chosen = sample_evenly(files, 8)
    assert chosen == [Path("a/0.jpg"), Path("a/125.jpg"), Path("b/0.jpg"), Path("b/125.jpg"), Path("c/0.jpg"),
                      Path("c/125.jpg"), Path("d/0.jpg"), Path("d/125.jpg")]
    assert sample_evenly(files, 1000) == files and sample_evenly(files, 5000) == files
    assert len(set(sample_evenly(files, 999))) == 999


def test_top_k_below_one_is_an_error():
    from clfpipe.contract.errors import ServeError
    from clfpipe.serve.client import make_prediction

    assert [label for label, _ in make_prediction("x", np.array([0.2, 0.5, 0.3]), ["a", "b", "c"], 9).top_k] == ["b", "c", "a"]
    with pytest.raises(ServeError, match="--top-k: expected at least 1, got 0"):
        make_prediction("x", np.array([0.2, 0.5, 0.3]), ["a", "b", "c"], 0)


def test_one_port_for_two_endpoints_is_an_error():
    from clfpipe.contract.errors import ServeError
    from clfpipe.serve.server import Ports

    with pytest.raises(ServeError, match="--grpc-port: expected a port other than --http-port's, got 8300 for both"):
        Ports(8300, 8300, 8302)
    with pytest.raises(ServeError, match="--metrics-port: expected a port other than --http-port's, got 8300 for both"):
        Ports(8300, 8301, 8300)


@pytest.mark.parametrize("multi_label", [[], ["--multi-label"]])
def test_demo_data_into_a_folder_that_cannot_be_written_is_one_line(tmp_path, capsys, multi_label):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    _one_line_error(capsys, ["data", "demo", str(blocker / "data"), *multi_label], f"cannot write the demo dataset to {blocker / 'data'}")


def test_a_repository_that_cannot_be_written_is_one_line_naming_it(run_copy, tmp_path, capsys):
    """Named as --out gave it, not as the hidden staging folder made beside it: under a file, and
    in a folder nobody may write into (/proc, which root cannot write either)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for out in (blocker / "repo", Path("/proc/clfpipe-repo")):
        err = _one_line_error(capsys, ["repo", "--run", str(run_copy), "--out", str(out)],
                              f"clfpipe: error: cannot write the repository {out}: ")
        assert f".{out.name}." not in err


def test_export_data_with_other_classes_is_one_line_about_data(run_copy, tmp_path, capsys):
    other = tmp_path / "other"
    write_demo_dataset(other, spec=DemoSpec(train_per_class=2, valid_per_class=2, image_size=32))
    shutil.move(other / "valid" / "vertical", other / "valid" / "dog")
    _one_line_error(capsys, ["export", "onnx", "--run", str(run_copy), "--precision", "fp32", "--data", str(other)],
                    "expected class folders ['checker', 'horizontal', 'vertical'], got ['checker', 'dog', 'horizontal'] "
                    "(--data: expected a folder with the run's classes)")
    # nothing left to export: the folder named is checked all the same (it was "exported already", unsaid)
    assert main(["-q", "export", "onnx", "--run", str(run_copy)]) == 0
    capsys.readouterr()
    _one_line_error(capsys, ["export", "onnx", "--run", str(run_copy), "--data", str(other)],
                    "(--data: expected a folder with the run's classes)")


def test_repo_out_naming_a_folder_of_other_files_leaves_it_as_it_was(run_copy, tmp_path, capsys):
    """--out was deleted and replaced, whatever it held."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    _one_line_error(capsys, ["repo", "--run", str(run_copy), "--out", str(mine)],
                    f"--out {mine}: expected a new folder or a repository 'clfpipe repo' wrote (no clfpipe_repository.json "
                    "there): it is left as it was")
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"] and not list(tmp_path.glob(".mine.*"))
    assert main(["repo", "--run", str(run_copy), "--out", str(tmp_path / "repo")]) == 0
    assert main(["repo", "--run", str(run_copy), "--out", str(tmp_path / "repo")]) == 0  # its own: replaced


def test_demo_workdir_with_a_run_folder_of_other_files_leaves_it_as_it_was(tmp_path, capsys):
    """The demo removed WORKDIR/run, whatever it held, before writing its own."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    _one_line_error(capsys, ["demo", "--workdir", str(tmp_path)],
                    f"--workdir: {tmp_path / 'run'} exists and is no clfpipe run (none of manifest.json, recipe.resolved.toml, "
                    "train_state.pt in it): expected a new folder or one an earlier demo used; it is left as it was")
    assert [p.name for p in tmp_path.iterdir()] == ["run"] and (tmp_path / "run" / "notes.txt").read_text() == "mine"


def test_a_run_moved_from_its_data_names_the_option_that_gives_another(run_copy, tmp_path, capsys):
    """verify said 'pass --data', an option it lacks; lr-find had none."""
    moved = tmp_path / "a" / "b" / "run"
    shutil.copytree(run_copy, moved)  # the data folder is recorded relative to the run: not beside it here
    _one_line_error(capsys, ["verify", "--run", str(moved)], "(pass --images, a folder with the run's classes)")
    _one_line_error(capsys, ["lr-find", "--run", str(moved)], "(the folder training read; pass --data)")
    data = RunDir(run_copy).data_dir(RunDir(run_copy).read())
    assert main(["lr-find", "--run", str(moved), "--data", str(data)]) == 0
    assert "valley\t" in capsys.readouterr().out


def test_serving_the_container_repository_here_is_one_line_naming_the_embedded_one(run_copy, tmp_path, capsys):
    """Triton started, failed to find its onnxruntime backend, and exited."""
    assert main(["-q", "repo", "--run", str(run_copy), "--target", "container"]) == 0
    repo = run_copy / "model_repository_container"
    _one_line_error(capsys, ["serve", "up", "--repo", str(repo), "--state-dir", str(tmp_path / "state")],
                    f"{repo.resolve()} is the repository for NVIDIA's Triton container ('clfpipe repo --target container'): "
                    "expected the embedded one, which 'clfpipe repo --run RUN_DIR' makes")
    assert not list((tmp_path / "state").glob("*"))  # nothing started: no pid file, no copied backend


def test_manifests_that_cannot_be_written_are_one_line_naming_the_folder_before_any_work(run_copy, tmp_path, capsys):
    """It said 'cannot write .../a_file/k8s/configmap-...yaml', after exporting the container
    repository; a file as --out was 'File exists'."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    argv = ["-q", "deploy", "k8s", "--run", str(run_copy), "--pvc", "models", "--out"]
    targets = lambda: RunDir(run_copy).read().data["stages"].get("repo", {}).get("targets", {})  # noqa: E731
    before = targets()  # the session's run may have a container repository already (another test builds one)
    _one_line_error(capsys, [*argv, str(blocker / "k8s")], f"--out {blocker / 'k8s'}: expected a folder deploy can write to (")
    _one_line_error(capsys, [*argv, str(blocker)], f"--out {blocker}: expected a folder, got a file")
    assert targets() == before  # no container repository exported for manifests that cannot be written


@pytest.mark.parametrize("host, why", [("999.1.1.1", "Name or service not known"), ("", "empty"),
                                       ("8.8.8.8", "Cannot assign requested address"), ("a" * 70, "label too long")])
def test_a_host_serve_up_cannot_listen_on_is_one_line_before_any_repository_is_made(run_copy, capsys, host, why):
    """It was 'http port 8000 on 999.1.1.1 is in use', after the repository for --run was built."""
    repository = run_copy / "model_repository"
    shutil.rmtree(repository, ignore_errors=True)
    err = _one_line_error(capsys, ["serve", "up", "--run", str(run_copy), "--host", host],
                          f"--host: expected an address of this machine (0.0.0.0: every interface), got {host!r} (")
    assert why in err and not repository.exists()


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), 0.0, -1.0])
def test_serve_up_timeout_is_finite_and_positive(timeout):
    """nan passed 'timeout <= 0' and then waited on a deadline no clock reaches."""
    from clfpipe.contract.errors import ServeError
    from clfpipe.serve.server import check_start

    check_start("127.0.0.1", 180.0, "none", False)
    with pytest.raises(ServeError, match=r"--timeout: expected seconds in \(0, 86400.0\], got "):
        check_start("127.0.0.1", timeout, "none", False)


def test_a_port_in_use_on_a_good_host_is_named_with_its_option():
    import socket

    from clfpipe.contract.errors import ServeError
    from clfpipe.serve.server import check_host, check_port_free

    check_host("127.0.0.1")
    check_host("0.0.0.0")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(ServeError, match=f"^grpc port {port} on 127.0.0.1 is in use: expected a free port \\(pass --grpc-port\\)$"):
            check_port_free("127.0.0.1", "grpc", port)
    check_port_free("127.0.0.1", "grpc", port)  # let go: free again


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=40), st.builds(lambda h, p: f"{h}:{p}", st.text(max_size=12), st.integers(-10, 10**6))))
def test_any_url_is_accepted_as_host_port_or_one_servererror(url):
    from clfpipe.contract.errors import ServeError
    from clfpipe.serve.client import check_url

    try:
        assert check_url(url) == url
    except ServeError as exc:
        assert str(exc).startswith("--url: expected HOST:PORT") and "\n" not in str(exc)
        return
    host, port = url.rsplit(":", 1)[0], int(url.rsplit(":", 1)[1].split("/")[0])
    assert host and 1 <= port <= 65535


def test_a_client_keeps_the_servers_that_answer_and_serve_one_model(caplog):
    from clfpipe.contract.errors import ServeError
    from clfpipe.serve.client import Served, kept_servers, split_urls

    cats, dogs = Served(["cat", "dog"], 32), Served(["dog", "cat"], 32)
    gone = ServeError("cannot reach Triton at b:8001 over grpc: connection refused")
    unknown = ServeError("model 'classifier' is not served at c:8001: unknown model")
    assert kept_servers(["a:8001", "b:8001", "c:8001"], [gone, cats, cats]) == ([1, 2], cats)
    assert "cannot reach Triton at b:8001 over grpc: connection refused: skipped, requests go to b:8001, c:8001" in caplog.text
    for urls, outcomes, raised in ((["b:8001"], [gone], gone),  # one server: whatever it says is the error
                                   (["a:8001", "b:8001"], [gone, gone], gone),  # none answers
                                   (["a:8001", "c:8001"], [cats, unknown], unknown)):  # answers, but not as asked
        with pytest.raises(ServeError) as error:
            kept_servers(urls, outcomes)
        assert error.value is raised
    with pytest.raises(ServeError, match=r"^b:8001 serves classes \['dog', 'cat'\], a:8001 serves \['cat', 'dog'\]: "
                                         "expected the same model$"):
        kept_servers(["a:8001", "b:8001"], [cats, dogs])
    assert split_urls(" a:8001,b:8001") == ["a:8001", "b:8001"] and split_urls(None) == [None]  # None: the recorded server
    with pytest.raises(ServeError, match="^url: expected at least one HOST:PORT, got an empty list$"):
        split_urls([])  # not the recorded server: it was asked for none


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=30), st.lists(st.integers(-5, 5000), max_size=6).map(lambda xs: ",".join(map(str, xs))),
                 st.lists(st.text("0123456789 ,_-+", max_size=8), max_size=4).map(",".join)))
def test_any_concurrency_list_is_bounded_levels_or_one_error(text):
    """bench --concurrency: what the sweep gets is 1..1024 clients a level, or one line before any request."""
    from clfpipe.cli import _levels
    from clfpipe.contract.errors import ClfpipeError
    from clfpipe.serve.bench import MAX_CONCURRENCY, check_sweep

    try:
        levels = _levels(text)
        check_sweep("http", levels, batch=1, requests=None, seconds=None, window_s=1.0, max_windows=3)
    except ClfpipeError as exc:
        assert str(exc).startswith("--concurrency: expected") and "\n" not in str(exc)
        return
    assert levels and all(isinstance(c, int) and 1 <= c <= MAX_CONCURRENCY for c in levels)
