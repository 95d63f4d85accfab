"""The graph every variant is exported from uses only ops that the ONNX exporters of torch 2.6 and
later all lower: torch 2.11's has no function for aten.adaptive_max_pool2d, so the concat-pool head
takes the max as amax over H and W. A new op in the graph fails this test until someone has
checked the older exporters have it and added it here."""

import pytest
import torch

from clfpipe.contract.engines import Variant
from clfpipe.contract.preprocess import PreprocessSpec
from clfpipe.contract.recipe import ModelConfig
from clfpipe.nn.folded import Folded, example_input
from clfpipe.nn.models import build_model

ALLOWED = {
    "aten.conv2d.default", "aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default",
    "aten.relu.default", "aten.relu_.default", "aten.max_pool2d.default", "aten.add.Tensor", "aten.add_.Tensor",
    "aten.amax.default", "aten.mean.dim", "aten.cat.default", "aten.flatten.using_ints", "aten.view.default",
    "aten.linear.default", "aten.permute.default", "aten.sub.Tensor", "aten.div.Tensor", "aten._to_copy.default",
    "aten.softmax.int", "aten.sigmoid.default", "aten.flip.default", "aten.slice.Tensor", "aten.upsample_bilinear2d.vec",
    "aten.reshape.default", "aten.mean.default", "aten.to.dtype", "aten.dropout.default",
    "aten._assert_tensor_metadata.default",  # what .float() leaves in the program: a check the exporters drop
    "aten.sym_size.int",  # the dynamic batch size the TTA average reshapes by (ONNX Shape)
}
MISSING_IN_OLDER_EXPORTERS = {"aten.adaptive_max_pool2d.default", "aten.adaptive_avg_pool2d.default"}


@pytest.mark.parametrize("variant", [Variant(), Variant("fp32", True, False), Variant("fp32", True, True)],
                         ids=lambda v: v.name)
@pytest.mark.parametrize("multi_label", [False, True])
def test_exported_ops_are_in_the_allowed_set(variant, multi_label):
    model = build_model(ModelConfig(arch="resnet18"), 3).eval()
    folded = Folded(model, PreprocessSpec.for_size(64), variant, multi_label)
    program = torch.export.export(folded, (example_input(variant, 64),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not ops & MISSING_IN_OLDER_EXPORTERS
    assert ops <= ALLOWED, sorted(ops - ALLOWED)
    assert "aten.amax.default" in ops  # the max half of the concat pool
