import json
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from clfpipe.contract.engines import SERVED, Variant
from clfpipe.contract.manifest import new_manifest
from clfpipe.contract.preprocess import PreprocessSpec
from clfpipe.contract.recipe import load_recipe
from clfpipe.serve.repository import (
    Backbone,
    backbone_config,
    config_text,
    docker_command,
    ensemble_config,
    plan_config,
    preprocess_config,
)

PLAIN = Backbone(SERVED[0], Variant("fp32", True, False), Path("model-pre.onnx"))
TTA = Backbone(SERVED[1], Variant("fp32", True, True), Path("model-pre-tta.onnx"))


def _manifest(tmp_path, *overrides):
    recipe = load_recipe(None, ["stages.0.size=96", "serve.max_batch_size=16", *overrides])
    return new_manifest(recipe, ["x", "y", "z"], tmp_path, tmp_path)


def _parse(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())  # unknown fields or bad enums raise


@pytest.mark.parametrize("target", ["embedded", "container"])
def test_every_generated_config_parses_with_tritons_schema(tmp_path, target):
    manifest = _manifest(tmp_path, "serve.container_ort_tensorrt=true")
    configs = [preprocess_config(manifest, "pil"), preprocess_config(manifest, "nvjpeg")]
    for backbone in (PLAIN, TTA):
        configs += [backbone_config(manifest, backbone, target), ensemble_config(manifest, backbone)]
        if target == "embedded":
            configs += [backbone_config(manifest, backbone, target, fused=True), ensemble_config(manifest, backbone, fused=True)]
    if target == "container":
        configs.append(plan_config(manifest, "trt-pre", {"outputs": {"logits": ["batch", 3]}, "profile": {"max": 8}}))
    for config in configs:
        parsed = _parse(config_text(config))
        assert parsed == config
        assert parsed.max_batch_size in (8, 16)


def test_python_models_batch_and_ship_uint8_between_steps(tmp_path):
    manifest = _manifest(tmp_path)
    pre, backbone = preprocess_config(manifest, "pil"), backbone_config(manifest, PLAIN, "embedded")
    for config in (pre, backbone):
        assert config.backend == "python" and config.HasField("dynamic_batching")
    assert pre.output[0].data_type == mc.TYPE_UINT8 and list(pre.output[0].dims) == [96, 96, 3]
    assert backbone.input[0].data_type == mc.TYPE_UINT8 and list(backbone.output[0].dims) == [3]
    assert PreprocessSpec.from_dict(json.loads(pre.parameters["preprocess"].string_value)) == manifest.preprocess
    assert backbone.parameters["activation"].string_value == "softmax"
    assert backbone_config(manifest, TTA, "embedded").parameters["activation"].string_value == "none"
    multi = _manifest(tmp_path, "data.labels_csv=labels.csv")
    assert backbone_config(multi, PLAIN, "embedded").parameters["activation"].string_value == "sigmoid"


def test_container_backbone_is_onnxruntime_on_gpu_with_optional_tensorrt(tmp_path):
    plain = backbone_config(_manifest(tmp_path), PLAIN, "container")
    assert plain.platform == "onnxruntime_onnx" and plain.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert not plain.optimization.execution_accelerators.gpu_execution_accelerator
    accelerated = backbone_config(_manifest(tmp_path, "serve.container_ort_tensorrt=true"), PLAIN, "container")
    (trt,) = accelerated.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP16"
    assert "trt_engine_cache_path" in trt.parameters
    assert "--gpus all" in docker_command(tmp_path, "img:tag") and f"{tmp_path}:/models" in docker_command(tmp_path, "img:tag")


def test_the_docker_line_sets_up_the_image_as_deploy_does(tmp_path):
    """The docker line installed Pillow only: an image with numpy 2 would serve corrupt tensors."""
    import shlex

    from clfpipe.contract.recipe import CONTAINER_SETUP
    from clfpipe.serve.deploy import Deployment, _server_command

    words = shlex.split(docker_command(tmp_path / "a run", "img:tag"))  # a path with a space stays one word
    assert words[words.index("-v") + 1] == f"{tmp_path / 'a run'}:/models"
    script = words[words.index("-c") + 1]
    assert script.startswith(f"{CONTAINER_SETUP} && exec tritonserver --model-repository=/models")
    assert shlex.split(CONTAINER_SETUP)[-1] == "numpy<2"
    _, command = _server_command(Deployment(pvc="models"), "img:tag")
    assert command[-1].startswith(f"{CONTAINER_SETUP} && exec tritonserver")


def test_ensemble_wires_image_to_probs(tmp_path):
    config = ensemble_config(_manifest(tmp_path), TTA)
    assert config.name == "classifier_tta" and config.platform == "ensemble"
    assert [s.model_name for s in config.ensemble_scheduling.step] == ["preprocess", "backbone_tta"]
    assert config.input[0].name == "IMAGE" and config.input[0].data_type == mc.TYPE_STRING
    assert config.output[0].name == "PROBS" and config.output[0].label_filename == "labels.txt"
    assert json.loads(config.parameters["classes"].string_value) == ["x", "y", "z"]


def test_the_fused_step_takes_image_bytes_and_decodes_them_itself(tmp_path):
    """decode=nvjpeg with a torch engine: IMAGE straight into one step, pixels never on the host."""
    manifest = _manifest(tmp_path)
    torch_plain = Backbone(SERVED[0], Variant("fp32", True, False, "torch"), Path("model-pre.ep.pt2"))
    fused = backbone_config(manifest, torch_plain, "embedded", fused=True)
    assert fused.name == "backbone_image" and fused.input[0].name == "IMAGE" and fused.input[0].data_type == mc.TYPE_STRING
    assert fused.parameters["decode"].string_value == "nvjpeg" and fused.parameters["engine"].string_value == "torch"
    assert PreprocessSpec.from_dict(json.loads(fused.parameters["preprocess"].string_value)) == manifest.preprocess
    assert fused.model_warmup[0].inputs["IMAGE"].input_data_file == "warmup_image"
    ensemble = ensemble_config(manifest, torch_plain, fused=True)
    assert ensemble.name == "classifier" and [s.model_name for s in ensemble.ensemble_scheduling.step] == ["backbone_image"]
    assert json.loads(ensemble.parameters["classes"].string_value) == ["x", "y", "z"]
