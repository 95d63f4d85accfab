"""Deployment manifests: every Kubernetes resource validated against the Kubernetes schemas of the
versions the README names, KServe's InferenceService against KServe's own models, and the repository
archive reproducible."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from clfpipe.cli import main
from clfpipe.contract.errors import ServeError
from clfpipe.contract.manifest import new_manifest
from clfpipe.contract.recipe import load_recipe
from clfpipe.serve.deploy import QUEUE_METRIC, Deployment, inference_service, k8s_manifests

K8S_VERSIONS = ("1.30.0", "1.34.0")  # what the README promises


def _manifest(tmp_path):
    return new_manifest(load_recipe(None), ["cat", "dog"], tmp_path, tmp_path)


def check_against_models(doc: dict, type_name: str) -> list[str]:
    """Every key known to KServe's (or the Kubernetes client's) generated model of its type, recursively."""
    out = subprocess.run([sys.executable, str(Path(__file__).parent / "kserve_check.py"), type_name], input=json.dumps(doc),
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


@pytest.mark.parametrize("source", [{"pvc": "models"}, {"repository_uri": "s3://bucket/clfpipe/repo"}])
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_kubernetes_resource_validates(tmp_path, source, version):
    docs = k8s_manifests(Deployment(namespace="serving", gpus=1, **source), _manifest(tmp_path))
    assert [d["kind"] for d in docs] == ["ConfigMap", "Deployment", "Service", "Service", "HorizontalPodAutoscaler",
                                         "ConfigMap", "PodDisruptionBudget"]
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises on any schema error
    deployment = docs[1]["spec"]["template"]
    container = deployment["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["readinessProbe"]["exec"]["command"][:2] == ["python3", "/opt/clfpipe/probe.py"]
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert deployment["metadata"]["annotations"]["prometheus.io/port"] == "8002"
    assert docs[4]["spec"]["metrics"][0]["pods"]["metric"]["name"] == QUEUE_METRIC
    rules = yaml.safe_load(docs[5]["data"]["config.yaml"])["rules"][0]
    assert rules["name"]["as"] == QUEUE_METRIC and "nv_inference_queue_duration_us" in rules["metricsQuery"]
    assert docs[3]["spec"]["clusterIP"] == "None"  # the headless one, for client-side gRPC balancing


def test_the_validators_catch_mistakes(tmp_path):
    docs = k8s_manifests(Deployment(pvc="models"), _manifest(tmp_path))
    docs[1]["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinessProbes"):
        kubernetes_validate.validate(docs[1], K8S_VERSIONS[0], strict=True)
    service = inference_service(Deployment(repository_uri="s3://b/r", image="reg.example/triton:1"), _manifest(tmp_path))
    service["spec"]["predictor"]["triton"]["storageURI"] = "typo"
    assert check_against_models(service, "V1beta1InferenceService") == [
        ".spec.predictor.triton.storageURI: not a field of V1beta1TritonSpec"]


def test_the_inference_service_validates_against_kserves_models(tmp_path):
    doc = inference_service(Deployment(repository_uri="gs://bucket/repo", gpus=2, namespace="ml", image="reg.example/triton:1"),
                            _manifest(tmp_path))
    assert check_against_models(doc, "V1beta1InferenceService") == []
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1" and doc["spec"]["predictor"]["triton"]["storageUri"] == "gs://bucket/repo"
    assert doc["spec"]["predictor"]["triton"]["image"] == "reg.example/triton:1"
    with pytest.raises(ServeError, match="expected --repository-uri"):
        inference_service(Deployment(pvc="models"), _manifest(tmp_path))


def test_kserve_needs_an_image_with_what_the_python_steps_import(tmp_path):
    """It wrote NVIDIA's stock runtime, whose Triton cannot load the preprocessing step (no Pillow),
    and dropped --image unsaid."""
    with pytest.raises(ServeError, match=re.escape("deploy kserve: expected --image, a Triton image with Pillow and numpy<2")) as err:
        inference_service(Deployment(repository_uri="s3://b/r"), _manifest(tmp_path))
    assert "FROM nvcr.io/nvidia/tritonserver:24.10-py3 with RUN pip install --quiet pillow \"numpy<2\"" in str(err.value)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "expected one of --repository-uri"),
    ({"pvc": "x", "repository_uri": "s3://b/r"}, "expected one of --repository-uri"),
    ({"repository_uri": "http://b/r"}, "expected s3://, gs:// or as://"),
    ({"pvc": "Models!"}, "--pvc: expected a PersistentVolumeClaim name"),
    ({"pvc": "m", "name": "Bad_Name"}, "--name: expected a DNS label"),
    ({"pvc": "m", "replicas": 4, "max_replicas": 2}, "--max-replicas: expected 4 to 1000, got 2"),
    ({"pvc": "m", "gpus": -1}, "--gpu: expected 0 to 16, got -1"),
    ({"pvc": "m", "namespace": "Bad_NS"}, "--namespace: expected a DNS label (lowercase letters, digits, '-', at most 63), got 'Bad_NS'"),
    ({"pvc": "m", "namespace": "n" * 64}, "--namespace: expected a DNS label"),
    ({"pvc": "m", "image": ""}, "--image: expected an image reference such as nvcr.io/nvidia/tritonserver:24.10-py3, got ''"),
    ({"pvc": "m", "image": "my image:1"}, "--image: expected an image reference"),
])
def test_bad_options_are_one_line(kwargs, message):
    with pytest.raises(ServeError, match=re.escape(message)):
        Deployment(**kwargs)


@pytest.mark.parametrize("image", ["nvcr.io/nvidia/tritonserver:24.10-py3", "localhost:5000/triton", "triton",
                                   "reg.example/team/triton@sha256:" + "a" * 64])
def test_image_references_that_registries_take_are_taken(image):
    assert Deployment(pvc="m", image=image).image == image


@pytest.mark.slow
def test_deploy_commands_and_a_reproducible_archive(run_copy, tmp_path, capsys):
    assert main(["deploy", "k8s", "--run", str(run_copy), "--pvc", "models", "--gpu", "0"]) == 0
    written = [Path(line) for line in capsys.readouterr().out.split()]
    assert written[-1].name == "all.yaml" and len(list(yaml.safe_load_all(written[-1].read_text()))) == 7
    for doc in yaml.safe_load_all(written[-1].read_text()):
        kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)
    assert (run_copy / "model_repository_container" / "clfpipe_probe.py").is_file()
    assert main(["deploy", "kserve", "--run", str(run_copy), "--repository-uri", "s3://b/r", "--image", "reg.example/triton:1",
                 "--out", str(tmp_path / "ks")]) == 0
    assert check_against_models(yaml.safe_load((tmp_path / "ks" / "all.yaml").read_text()), "V1beta1InferenceService") == []
    with pytest.raises(SystemExit) as exit_:  # argparse's own usage error
        main(["deploy", "k8s", "--run", str(run_copy)])
    assert exit_.value.code == 2 and "one of the arguments --repository-uri --pvc is required" in capsys.readouterr().err
    digests = []
    for _ in range(2):
        assert main(["repo", "--run", str(run_copy), "--target", "container", "--archive"]) == 0
        archive = Path(capsys.readouterr().out.split()[-1])
        digests.append(hashlib.sha256(archive.read_bytes()).hexdigest())
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert digests[0] == digests[1] and "backbone/config.pbtxt" in names and "clfpipe_repository.json" in names
