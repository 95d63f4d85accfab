"""Kubernetes manifests for the container target: NVIDIA's Triton image serving the verified
``container`` repository (read from object storage by Triton itself, or from a volume), behind a
Service, scaled on queue time, with probes that send a real request through every ensemble.

Writes one YAML file per resource and ``all.yaml``; validated in the tests against the
Kubernetes schemas (kubernetes-validate) and, for KServe's InferenceService, against KServe's
own models.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import clfpipe.serve.probe as probe_module
from clfpipe.contract.errors import ServeError
from clfpipe.contract.manifest import Manifest, atomic_write_bytes
from clfpipe.contract.recipe import CONTAINER_SETUP

log = logging.getLogger(__name__)
HTTP, GRPC, METRICS = 8000, 8001, 8002
PROBE_DIR = "/opt/clfpipe"
# Queue time per request at the backbone: it grows as soon as the replicas cannot keep up (requests
# wait for an instance), whatever the model's own speed; GPU utilisation alone does not see it.
QUEUE_METRIC = "triton_backbone_queue_us_per_request"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?$")
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # RFC 1123 label
_URI = re.compile(r"^(s3|gs|as)://\S+$")
# a container image reference: [registry[:port]/]path[:tag][@sha256:digest], no spaces (docker's grammar, loosely)
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*[A-Za-z0-9]$")


@dataclass(frozen=True)
class Deployment:
    """What `clfpipe deploy` asks of the cluster."""

    name: str = "clfpipe"
    namespace: str | None = None
    replicas: int = 2
    max_replicas: int = 8
    gpus: int = 1
    repository_uri: str | None = None  # s3://, gs:// or as:// (Triton reads it itself)
    pvc: str | None = None  # or a PersistentVolumeClaim holding the repository, mounted at /models
    image: str | None = None  # an image that already has Pillow and numpy<2; default: NVIDIA's, plus a pip install
    queue_target_us: int = 20_000  # scale out when requests wait longer than this at the backbone

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ServeError(f"--name: expected a DNS label (lowercase letters, digits, '-', at most 52), got {self.name!r}")
        if (self.repository_uri is None) == (self.pvc is None):
            raise ServeError("deploy: expected one of --repository-uri s3://... (or gs://, as://) and --pvc NAME")
        if self.repository_uri is not None and not _URI.match(self.repository_uri):
            raise ServeError(f"--repository-uri: expected s3://, gs:// or as:// followed by a path, got {self.repository_uri!r}")
        if self.namespace is not None and not _NAMESPACE.match(self.namespace):  # kubectl would refuse the manifests
            raise ServeError(f"--namespace: expected a DNS label (lowercase letters, digits, '-', at most 63), got {self.namespace!r}")
        if self.image is not None and not _IMAGE.match(self.image):
            raise ServeError(f"--image: expected an image reference such as nvcr.io/nvidia/tritonserver:24.10-py3, got {self.image!r}")
        if self.pvc is not None and not _NAME.match(self.pvc):
            raise ServeError(f"--pvc: expected a PersistentVolumeClaim name, got {self.pvc!r}")
        checks = [("--replicas", self.replicas, 1, 1000), ("--max-replicas", self.max_replicas, self.replicas, 1000),
                  ("--gpu", self.gpus, 0, 16), ("--queue-target-us", self.queue_target_us, 100, 60_000_000)]
        for flag, value, lo, hi in checks:
            if not lo <= value <= hi:
                raise ServeError(f"{flag}: expected {lo} to {hi}, got {value}")

    @property
    def model_repository(self) -> str:
        return self.repository_uri or "/models"


def _meta(d: Deployment, suffix: str = "", **extra: Any) -> dict:
    meta: dict[str, Any] = {"name": d.name + suffix, "labels": {"app.kubernetes.io/name": d.name,
                                                                "app.kubernetes.io/part-of": "clfpipe"}, **extra}
    if d.namespace:
        meta["namespace"] = d.namespace
    return meta


def _selector(d: Deployment) -> dict:
    return {"app.kubernetes.io/name": d.name}


def _server_command(d: Deployment, container_image: str) -> tuple[str, list[str]]:
    """(image, command): tritonserver on the repository; NVIDIA's image lacks Pillow for the
    preprocessing step, and the python backend needs numpy<2, so the stock image installs both."""
    server = ["tritonserver", f"--model-repository={d.model_repository}", "--model-control-mode=none",
              "--strict-readiness=true", f"--http-port={HTTP}", f"--grpc-port={GRPC}", f"--metrics-port={METRICS}",
              "--exit-timeout-secs=30"]
    if d.image:
        return d.image, server
    return container_image, ["/bin/bash", "-c", f"{CONTAINER_SETUP} && exec " + " ".join(server)]


def _probe(period: int, failures: int) -> dict:
    """A real request through every ensemble (Triton's own health endpoints miss a dead python stub)."""
    return {"exec": {"command": ["python3", f"{PROBE_DIR}/probe.py", "--url", f"localhost:{HTTP}", "--timeout", "5"]},
            "periodSeconds": period, "timeoutSeconds": 15, "failureThreshold": failures}


def deployment(d: Deployment, manifest: Manifest) -> dict:
    image, command = _server_command(d, manifest.recipe.serve.container_image)
    container: dict[str, Any] = {
        "name": "triton", "image": image, "command": command,
        "ports": [{"name": "http", "containerPort": HTTP}, {"name": "grpc", "containerPort": GRPC},
                  {"name": "metrics", "containerPort": METRICS}],
        "resources": {"requests": {"cpu": "2", "memory": "8Gi"},
                      "limits": {"memory": "16Gi", **({"nvidia.com/gpu": str(d.gpus)} if d.gpus else {})}},
        # model load (and the stock image's pip install) before anything else is judged: up to 10 min
        "startupProbe": {"httpGet": {"path": "/v2/health/ready", "port": HTTP}, "periodSeconds": 10, "failureThreshold": 60},
        "readinessProbe": _probe(10, 1),
        "livenessProbe": _probe(20, 3),  # a dead stub never heals inside the pod: restart the container
        "volumeMounts": [{"name": "probe", "mountPath": PROBE_DIR, "readOnly": True}],
    }
    volumes: list[dict] = [{"name": "probe", "configMap": {"name": f"{d.name}-probe"}}]
    if d.pvc:
        container["volumeMounts"].append({"name": "models", "mountPath": "/models", "readOnly": True})
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": d.pvc, "readOnly": True}})
    else:  # object storage credentials (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, AZURE_*), when the bucket needs them
        container["envFrom"] = [{"secretRef": {"name": f"{d.name}-storage", "optional": True}}]
    template_meta = {"labels": _selector(d), "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS),
                                                           "prometheus.io/path": "/metrics"}}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(d),
            "spec": {"replicas": d.replicas, "selector": {"matchLabels": _selector(d)},
                     "template": {"metadata": template_meta,
                                  "spec": {"containers": [container], "volumes": volumes,
                                           "terminationGracePeriodSeconds": 45}}}}


def services(d: Deployment) -> list[dict]:
    """A ClusterIP Service, and a headless one whose DNS name lists every ready pod for gRPC clients
    that balance themselves (a gRPC connection through a ClusterIP stays on one pod)."""
    ports = [{"name": "http", "port": HTTP, "targetPort": "http"},
             {"name": "grpc", "port": GRPC, "targetPort": "grpc", "appProtocol": "grpc"},
             {"name": "metrics", "port": METRICS, "targetPort": "metrics"}]
    return [{"apiVersion": "v1", "kind": "Service", "metadata": _meta(d),
             "spec": {"type": "ClusterIP", "selector": _selector(d), "ports": ports}},
            {"apiVersion": "v1", "kind": "Service", "metadata": _meta(d, "-headless"),
             "spec": {"clusterIP": "None", "selector": _selector(d), "ports": ports}}]


def autoscaler(d: Deployment) -> dict:
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": _meta(d),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": d.name},
                     "minReplicas": d.replicas, "maxReplicas": d.max_replicas,
                     "metrics": [{"type": "Pods", "pods": {"metric": {"name": QUEUE_METRIC},
                                                           "target": {"type": "AverageValue",
                                                                      "averageValue": str(d.queue_target_us)}}}],
                     "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}}}}


def adapter_rules(d: Deployment) -> dict:
    """The Prometheus adapter's rule that makes QUEUE_METRIC a custom metric of each pod: the backbone's
    queue time over its successful requests, per second, from Triton's own counters."""
    match = '{model="backbone",<<.LabelMatchers>>}'
    rule = {"seriesQuery": 'nv_inference_queue_duration_us{model="backbone",namespace!="",pod!=""}',
            "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
            "name": {"matches": "nv_inference_queue_duration_us", "as": QUEUE_METRIC},
            "metricsQuery": f"sum(rate(nv_inference_queue_duration_us{match}[1m])) by (<<.GroupBy>>) / "
                            f"clamp_min(sum(rate(nv_inference_request_success{match}[1m])) by (<<.GroupBy>>), 1e-6)"}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(d, "-prometheus-adapter-rules"),
            "data": {"config.yaml": yaml.safe_dump({"rules": [rule]}, sort_keys=False)}}


def disruption_budget(d: Deployment) -> dict:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(d),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _selector(d)}}}


def probe_config(d: Deployment) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(d, "-probe"),
            "data": {"probe.py": Path(probe_module.__file__).read_text()}}


def k8s_manifests(d: Deployment, manifest: Manifest) -> list[dict]:
    return [probe_config(d), deployment(d, manifest), *services(d), autoscaler(d), adapter_rules(d), disruption_budget(d)]


def inference_service(d: Deployment, manifest: Manifest) -> dict:
    """KServe's InferenceService (v1beta1) with its Triton runtime on the same repository, in an
    image that has what the repository's python steps need: KServe starts its runtime's command
    in the image as it is and appends the args given (kserve/kserve#2310), so the install that
    'deploy k8s' runs at start cannot run here, and NVIDIA's image lacks Pillow."""
    if not d.repository_uri:
        raise ServeError("deploy kserve: expected --repository-uri (KServe downloads the repository from storageUri)")
    if not d.image:
        base = manifest.recipe.serve.container_image
        raise ServeError(f"deploy kserve: expected --image, a Triton image with Pillow and numpy<2 (KServe runs its runtime's "
                         f"image as it is, and {base} lacks Pillow for the preprocessing step): build one FROM {base} "
                         f"with RUN {CONTAINER_SETUP}")
    triton = {"storageUri": d.repository_uri, "image": d.image,
              "args": ["--strict-readiness=true", "--model-control-mode=none"],
              "resources": {"requests": {"cpu": "2", "memory": "8Gi"},
                            "limits": {"memory": "16Gi", **({"nvidia.com/gpu": str(d.gpus)} if d.gpus else {})}}}
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": _meta(d, annotations={"serving.kserve.io/enable-prometheus-scraping": "true"}),
            "spec": {"predictor": {"minReplicas": d.replicas, "maxReplicas": d.max_replicas, "triton": triton}}}


def write_manifests(docs: list[dict], out: Path) -> list[Path]:
    """One file per resource (kind-name.yaml) and all.yaml for `kubectl apply -f`."""
    paths = []
    for doc in docs:
        path = out / f"{doc['kind'].lower()}-{doc['metadata']['name']}.yaml"
        atomic_write_bytes(path, yaml.safe_dump(doc, sort_keys=False).encode())
        paths.append(path)
    atomic_write_bytes(out / "all.yaml", yaml.safe_dump_all(docs, sort_keys=False).encode())
    return [*paths, out / "all.yaml"]
