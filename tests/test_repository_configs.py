import json

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from clfpipe.manifest import new_manifest
from clfpipe.preprocess import PreprocessSpec
from clfpipe.recipe import load_recipe
from serve.repository import backbone_config, config_text, ensemble_config, preprocess_config


def _manifest(tmp_path):
    return new_manifest(load_recipe(None, ["stages.0.size=96", "serve.max_batch_size=16"]), ["x", "y", "z"], tmp_path)


def _parse(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())  # unknown fields or bad enums raise


def test_generated_configs_parse_with_tritons_schema(tmp_path):
    manifest = _manifest(tmp_path)
    for config in (preprocess_config(manifest), backbone_config(manifest, "model.onnx"), ensemble_config(manifest)):
        parsed = _parse(config_text(config))
        assert parsed == config
        assert parsed.max_batch_size == 16


def test_models_that_batch_have_dynamic_batching_and_shapes_follow_the_manifest(tmp_path):
    manifest = _manifest(tmp_path)
    pre, backbone = preprocess_config(manifest), backbone_config(manifest, "model.onnx")
    for config in (pre, backbone):
        assert config.backend == "python" and config.HasField("dynamic_batching")
    assert list(pre.output[0].dims) == [3, 96, 96]
    assert list(backbone.output[0].dims) == [3]
    assert PreprocessSpec.from_dict(json.loads(pre.parameters["preprocess"].string_value)) == manifest.preprocess


def test_ensemble_wires_image_to_probs(tmp_path):
    config = ensemble_config(_manifest(tmp_path))
    assert config.platform == "ensemble"
    assert [s.model_name for s in config.ensemble_scheduling.step] == ["preprocess", "backbone"]
    assert config.input[0].name == "IMAGE" and config.input[0].data_type == mc.TYPE_STRING
    assert config.output[0].name == "PROBS" and config.output[0].label_filename == "labels.txt"
    assert json.loads(config.parameters["classes"].string_value) == ["x", "y", "z"]
