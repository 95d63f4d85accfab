import csv
import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clfpipe.contract.dataset import read_tags, scan_data
from clfpipe.contract.errors import DataError
from clfpipe.contract.metrics import best_threshold, f2_score
from clfpipe.demo_data import LABELS_CSV, write_demo_multilabel

# Hand-checked: 3 samples, 4 tags.
TARGETS = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 1, 1]])
PROBS = np.array([[0.9, 0.1, 0.15, 0.0], [0.3, 0.8, 0.0, 0.1], [0.6, 0.5, 0.4, 0.05]])


def test_f2_hand_checked():
    # threshold 0.2: predictions [1,0,0,0], [1,1,0,0], [1,1,1,0]
    # sample 1: tp1 fn1 fp0 -> 5/(5+4) ; sample 2: tp1 fp1 -> 5/(5+1) ; sample 3: tp3 fn1 -> 15/(15+4)
    expected = np.mean([5 / 9, 5 / 6, 15 / 19])
    assert f2_score(PROBS, TARGETS, 0.2) == pytest.approx(expected)
    assert f2_score(np.zeros((1, 3)), np.zeros((1, 3)), 0.5) == 1.0  # nothing to find, nothing claimed


def test_threshold_search_picks_the_best_in_range():
    # at 0.17 sample 1 also predicts its third tag (0.15 < 0.17: no) -> equal up to 0.24; lowest wins ties
    threshold, score = best_threshold(PROBS, TARGETS)
    assert 0.17 <= threshold <= 0.24
    assert score == max(f2_score(PROBS, TARGETS, t) for t in np.arange(0.17, 0.245, 0.01))
    probs = np.array([[0.21, 0.9]])
    assert best_threshold(probs, np.array([[1, 1]]))[0] == pytest.approx(0.17)
    assert best_threshold(probs, np.array([[0, 1]]))[0] == pytest.approx(0.21)


def test_planet_layout_scans_to_multi_hot(tmp_path):
    write_demo_multilabel(tmp_path, train=12, valid=4, image_size=32)
    train = scan_data(tmp_path, "train", LABELS_CSV)
    assert train.multi_label and train.classes == ("disc", "horizontal", "vertical")
    assert all(len(label) == 3 and sum(label) >= 1 for label in train.labels)
    valid = scan_data(tmp_path, "valid", LABELS_CSV, classes=train.classes)
    assert len(valid) == 4
    (tmp_path / "train" / "stray.jpg").write_bytes((tmp_path / "train" / "train_0000.jpg").read_bytes())
    with pytest.raises(DataError, match="no tags for 1 image"):
        scan_data(tmp_path, "train", LABELS_CSV)
    with pytest.raises(DataError, match="labels file not found"):
        scan_data(tmp_path, "train", "nope.csv")


@pytest.mark.slow
def test_multilabel_data_read_as_class_folders_says_which_table_reads_it(tmp_path):
    write_demo_multilabel(tmp_path, train=6, valid=2, image_size=32)
    with pytest.raises(DataError, match=rf"got 0; {LABELS_CSV} is there: .* data.labels_csv = '{LABELS_CSV}' "
                                        rf"\(data check: --labels-csv {LABELS_CSV}\)$"):
        scan_data(tmp_path, "train")
    (tmp_path / LABELS_CSV).unlink()
    with pytest.raises(DataError, match=r"got 0$"):  # no table: nothing to suggest
        scan_data(tmp_path, "train")


def test_multilabel_trains_exports_and_records_f2(tmp_path):
    from clfpipe.contract.manifest import RunDir
    from clfpipe.contract.probabilities import probabilities
    from clfpipe.contract.recipe import load_recipe
    from clfpipe.export.onnx_export import export_onnx
    from clfpipe.nn.reference import files_to_batch, load_run_model, torch_logits
    from clfpipe.runtime.ort import OnnxProbabilities
    from clfpipe.train.loop import train_run

    write_demo_multilabel(tmp_path / "data", train=96, valid=24, image_size=48)
    recipe = load_recipe(None, [f"data.labels_csv={LABELS_CSV}", "data.batch_size=16", "stages.0.epochs=2",
                                "stages.0.size=32", "evaluate.report=true"])
    manifest = train_run(tmp_path / "data", tmp_path / "run", recipe)
    figures = manifest.stage("train")
    assert figures["metric"] == "f2" and 0.17 <= figures["threshold"] <= 0.24
    assert set(figures["f2"]) == {"plain", "tta_fastai", "tta_deterministic"} and 0 < figures["valid_f2"] <= 1
    assert (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",") == [
        "stage_index", "stage", "epoch", "lr_body_early", "lr_body_late", "lr_head", "train_loss", "valid_loss", "f2", "seconds"]
    export_onnx(tmp_path / "run")
    run = RunDir(tmp_path / "run")
    manifest = run.read()
    gate = manifest.artifact("onnx")["gate"]  # the figures and the rule name the run's metric (they said 'accuracy')
    assert gate["metric"] == "f2" and gate["accuracy"] == pytest.approx(figures["f2"]["plain"], abs=1e-4)
    files = list(scan_data(tmp_path / "data", "valid", LABELS_CSV, tuple(manifest.classes)).files)
    batch = files_to_batch(files, manifest.preprocess)
    reference = probabilities(torch_logits(load_run_model(run, manifest), batch), multi_label=True)
    served = OnnxProbabilities(tmp_path / "run" / "model.onnx", activation="sigmoid")(batch)  # what Triton's backbone runs
    np.testing.assert_allclose(served, reference, atol=1e-4)
    assert not np.allclose(served.sum(1), 1.0, atol=1e-3)  # independent sigmoids, not a softmax
    _the_served_config_carries_the_threshold(tmp_path / "run", served, figures["threshold"])
    _data_clean_ranks_tagged_images(tmp_path, files, reference, figures["threshold"])


def _data_clean_ranks_tagged_images(tmp_path, valid_files, reference, threshold):
    """data clean on a multi-label run: each image's mean binary cross-entropy over its tags, the
    tags it predicts above the threshold; --apply moves a deleted image aside, refuses a tag list
    that names an unknown tag, and writes a new one into the image's row of the labels table."""
    from clfpipe.cli import main
    from clfpipe.contract.cleaning import read_plan
    from clfpipe.train.clean import clean_run

    table, ranking = clean_run(tmp_path / "run", 5)
    rows = list(csv.DictReader(table.open(newline="")))
    assert len(rows) == 96 + 24 and ranking.tags_table == LABELS_CSV
    losses = [float(r["loss"]) for r in rows]
    assert losses == sorted(losses, reverse=True)
    by_file = {r["file"]: r for r in rows}
    tags = read_tags(tmp_path / "data" / LABELS_CSV)
    classes = ("disc", "horizontal", "vertical")
    for f, probs in zip(valid_files, reference):
        row = by_file[f"valid/{f.name}"]
        truth = np.array([c in tags[f.stem] for c in classes])
        bce = -np.mean(np.log(np.where(truth, probs, 1 - probs)))
        assert float(row["loss"]) == pytest.approx(bce, abs=2e-3)
        assert set(row["label"].split()) - {"-"} == set(tags[f.stem])
        assert row["predicted"] == (" ".join(c for c, p in zip(classes, probs) if p > threshold) or "-")
    rows[0]["action"] = "delete"
    rows[1]["action"] = "cloudy"
    _write_rows(table, rows)
    with pytest.raises(DataError, match="line 3: action: expected keep, delete or the image's tags, space-separated"):
        read_plan(table, tmp_path / "data", classes, LABELS_CSV)
    new = ("disc",) if rows[1]["label"] == "vertical" else ("vertical",)
    rows[1]["action"] = new[0]
    _write_rows(table, rows)
    assert main(["data", "clean", "--run", str(tmp_path / "run"), "--apply", str(table)]) == 0
    assert (tmp_path / "data" / "removed" / rows[0]["file"]).is_file() and not (tmp_path / "data" / rows[0]["file"]).exists()
    assert read_tags(tmp_path / "data" / LABELS_CSV) == {**tags, Path(rows[1]["file"]).stem: new}


def _write_rows(table, rows):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    table.write_text(buf.getvalue())


def _the_served_config_carries_the_threshold(run_dir, probs, threshold):
    """The client named the most probable class of a multi-label model alone, as if single-label:
    the ensemble now carries training's F2 threshold, and the client names every tag above it."""
    from google.protobuf import json_format

    from clfpipe.contract.engines import SERVED, Variant
    from clfpipe.contract.manifest import RunDir
    from clfpipe.contract.probabilities import tagged
    from clfpipe.serve.client import describe, make_prediction
    from clfpipe.serve.repository import Backbone, ensemble_config

    config = ensemble_config(RunDir(run_dir).read(), Backbone(SERVED[0], Variant("fp32", True, False), Path("model-pre.onnx")))
    served = describe(json_format.MessageToDict(config, preserving_proto_field_name=True), "classifier", "here")
    assert served.threshold == threshold and len(served.classes) == probs.shape[1]
    for row in probs:
        tags = make_prediction("x", row, served.classes, 1, served.threshold).tags
        assert sorted(label for label, _ in tags) == sorted(np.asarray(served.classes)[tagged(row, threshold)].tolist())
        assert [p for _, p in tags] == sorted((p for _, p in tags), reverse=True)


def test_a_prediction_names_the_tags_strictly_above_the_threshold():
    from clfpipe.serve.client import make_prediction

    p = make_prediction("x", np.array([0.2, 0.9, 0.5, 0.7]), ["a", "b", "c", "d"], 1, threshold=0.5)
    assert p.tags == [("b", 0.9), ("d", 0.7)] and p.label == "b"  # 0.5 is not claimed: F2 is scored so
    assert p.to_dict()["tags"] == [{"label": "b", "prob": 0.9}, {"label": "d", "prob": 0.7}]
    assert make_prediction("x", np.array([0.1, 0.2]), ["a", "b"], 1, threshold=0.5).tags == []
    single = make_prediction("x", np.array([0.1, 0.9]), ["a", "b"], 1)
    assert single.tags is None and "tags" not in single.to_dict()


def test_the_csv_of_predictions_names_the_tags_as_a_labels_file_does():
    from clfpipe.serve.client import make_prediction, predictions_csv

    classes = ["a", "b c", "d"]
    preds = [make_prediction(f"img{i}.jpg", row, classes, 1, threshold=0.5)
             for i, row in enumerate(np.array([[0.2, 0.9, 0.7], [0.1, 0.2, 0.3]]))]
    rows = list(csv.reader(io.StringIO(predictions_csv(preds, classes, multi_label=True).decode())))
    assert rows[0] == ["file", "tags", "a", "b c", "d"]
    assert rows[1] == ["img0.jpg", "b c d", "0.2", "0.9", "0.7"] and rows[2] == ["img1.jpg", "", "0.1", "0.2", "0.3"]


def _table(rows: list[list[str]], header: list[str]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    return buf.getvalue().encode("utf-8", "surrogatepass")


TABLES = st.builds(_table, st.lists(st.lists(st.text(max_size=10), max_size=4), max_size=8),
                   st.sampled_from([["image", "tags"], ["tags", "image", "x"], ["image"], []]))


@settings(max_examples=400, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=400), TABLES))
def test_any_labels_file_reads_as_tags_or_one_dataerror(read_table, content):
    """A file that was not UTF-8 was a UnicodeDecodeError traceback, a row without its tags an
    AttributeError, and an image listed twice with other tags took the last row's unsaid."""
    for stem, row_tags in (read_table(read_tags, content) or {}).items():
        assert stem and isinstance(row_tags, tuple) and all(t and not any(c.isspace() for c in t) for t in row_tags)


def test_labels_file_rows_that_disagree_or_lack_tags_are_named(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("image,tags\na.jpg,x y\nb,z\na,x\n")
    with pytest.raises(DataError, match=r"line 4: expected each image once, got 'a' again with other tags \('x', before 'x y'\)"):
        read_tags(path)
    path.write_text("\ufeffimage,tags\na.jpg,x y\na,x y\nb\n")  # Excel's BOM; the same row twice is no conflict
    with pytest.raises(DataError, match=r"line 4: expected an image name and its tags, got \['b', None\]"):
        read_tags(path)
    path.write_bytes(b"image,tags\n\xff,x\n")
    with pytest.raises(DataError, match="expected UTF-8 text, got byte 0xff at offset 11"):
        read_tags(path)


def test_the_gate_names_the_runs_metric():
    """A multi-label gate said 'accuracy 0.87' and 'accuracy drop <= 0.01' of an F2."""
    from clfpipe.contract.engines import Variant
    from clfpipe.contract.gates import judge

    logits = np.log(PROBS / (1 - PROBS + 1e-9) + 1e-9)
    multi = judge(Variant("int8"), logits, logits + 0.01, TARGETS, multi_label=True, rtol=1e-3, atol=1e-3, threshold=0.2)
    assert multi.metric == "f2" and "f2 drop <= 0.01" in multi.rule and ", f2 " in multi.summary()
    single = judge(Variant("int8"), logits, logits, np.array([0, 1, 0]), multi_label=False, rtol=1e-3, atol=1e-3)
    assert single.metric == "accuracy" and "accuracy drop <= 0.01" in single.rule


@pytest.mark.slow
def test_a_served_multilabel_run_verifies_against_its_sigmoids(tmp_path, capsys):
    """`verify --served` on a multi-label run: the served TTA ensemble was compared with a softmax of
    the TTA views (the reference took every image for class 0 of a single-label split), 0.55 apart."""
    from clfpipe.cli import main
    from clfpipe.contract.recipe import load_recipe
    from clfpipe.pipeline import run_pipeline
    from clfpipe.serve.server import Ports, start_server, stop_server

    write_demo_multilabel(tmp_path / "data", train=96, valid=24, image_size=48)
    recipe = load_recipe("demo", [f"data.labels_csv={LABELS_CSV}", "data.batch_size=16", "stages.*.size=32",
                                  # 3 epochs a stage: some tags fall below the threshold (after 1, every one was above)
                                  "stages.*.epochs=3", "stages.*.cycle_mult=1", "evaluate.report=false"])
    repo = run_pipeline(tmp_path / "data", tmp_path / "run", recipe)
    info = start_server(repo, tmp_path / "state", ports=Ports.free(), supervise=False)
    try:
        assert main(["verify", "--run", str(tmp_path / "run"), "--served", "--state-dir", str(tmp_path / "state")]) == 0
        images = sorted((tmp_path / "data" / "valid").glob("*.jpg"))
        _labels_are_the_tags_above_the_threshold(info.grpc_url, [f.read_bytes() for f in images])
    finally:
        stop_server(tmp_path / "state")
    served = [row for row in (line.split() for line in capsys.readouterr().out.splitlines()) if row[1:2] == ["triton-http"]]
    assert [row[0] for row in served] == ["classifier", "classifier_pixels", "classifier_tta", "classifier_tta_pixels"]
    assert all("pass" in row and float(row[5]) < 1e-4 for row in served)  # max |diff| of the probabilities


def _labels_are_the_tags_above_the_threshold(url: str, images: list[bytes]) -> None:
    """What a Triton client reads as LABELS from a multi-label model: every tag its threshold claims,
    most probable first (was: the top 3 classes, claimed or not), at most the request's top_k."""
    import json

    import tritonclient.grpc as grpcclient

    from clfpipe.contract.probabilities import tagged

    with grpcclient.InferenceServerClient(url) as client:
        params = client.get_model_config("classifier", as_json=True)["config"]["parameters"]
        classes, threshold = json.loads(params["classes"]["string_value"]), float(params["threshold"]["string_value"])
        request = grpcclient.InferInput("IMAGE", [len(images), 1], "BYTES")
        request.set_data_from_numpy(np.array([[i] for i in images], dtype=np.object_))
        outputs = [grpcclient.InferRequestedOutput("PROBS"), grpcclient.InferRequestedOutput("LABELS")]
        every = client.infer("classifier", [request], outputs=outputs)
        one = client.infer("classifier", [request], outputs=outputs, parameters={"top_k": 1}).as_numpy("LABELS")
    probs, labels = every.as_numpy("PROBS"), every.as_numpy("LABELS")
    claims = tagged(probs, threshold)
    assert claims.sum(1).min() < len(classes) and claims.sum(1).max() > 1  # some tags unclaimed, some images with several
    assert labels.shape == (len(images), claims.sum(1).max())
    for row, claimed, named, first in zip(probs, claims, labels, one):
        want = [classes[j] for j in np.argsort(-row, kind="stable") if claimed[j]]
        assert [n.decode().rsplit(":", 1)[0] for n in named if n] == want
        assert [n.decode().rsplit(":", 1)[0] for n in first if n] == want[:1]
