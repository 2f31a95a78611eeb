"""Speed work must not change results (issue 6).

- torch.compile takes the model-only forward whole: no graph breaks (one graph, so fused kernels and
  CUDA graphs cover the whole model), and compiled and eager forwards agree within 1e-4. The inductor
  test compiles C++ kernels, several minutes on a 2-core CPU, so it is marked slow; the default suite
  checks the graph (no breaks) and the traced program (aot_eager) instead.
- The backbone speed settings (frozen BatchNorms folded into the convolutions, channels-last images)
  change only float rounding: same state dict and outputs as with them off, also after a deepcopy
  (tests/test_model.py checks the gradients).
"""

import copy
import shutil

import pytest
import torch
from conftest import padded_batch, tiny_config

from modeling_detr_custom import DetrCustomForObjectDetection
from modeling_detr_custom.modeling_detr_custom import FoldedBatchNormConv2d, PassThroughBatchNorm2d


@pytest.fixture(scope="module")
def model_and_batch():
    torch.manual_seed(0)
    model = DetrCustomForObjectDetection(tiny_config()).eval()
    return model, padded_batch()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def assert_same_detections(compiled, eager, atol=1e-4):
    torch.testing.assert_close(compiled.logits, eager.logits, atol=atol, rtol=0)
    torch.testing.assert_close(compiled.pred_boxes, eager.pred_boxes, atol=atol, rtol=0)


def test_model_only_forward_has_no_graph_breaks(model_and_batch):
    model, (pixel_values, pixel_mask) = model_and_batch
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(pixel_values, pixel_mask)
    reasons = [f"{b.reason} at {b.user_stack[-1] if b.user_stack else '?'}" for b in explanation.break_reasons]
    assert explanation.graph_break_count == 0, "graph breaks:\n" + "\n".join(reasons)
    assert explanation.graph_count == 1


def test_traced_forward_matches_eager(model_and_batch):
    """aot_eager runs the graph dynamo captured, after AOTAutograd's decompositions, without codegen."""
    model, (pixel_values, pixel_mask) = model_and_batch
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert_same_detections(compiled(pixel_values, pixel_mask), model(pixel_values, pixel_mask))


@pytest.mark.slow
def test_inductor_compiled_forward_matches_eager(model_and_batch):
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the inductor CPU backend cannot build kernels here")
    model, (pixel_values, pixel_mask) = model_and_batch
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    with torch.no_grad():
        try:
            out = compiled(pixel_values, pixel_mask)
        except torch._dynamo.exc.BackendCompilerFailed as error:  # toolchain problems, not our model
            pytest.skip(f"inductor cannot compile on this machine: {str(error).splitlines()[0]}")
        assert_same_detections(out, model(pixel_values, pixel_mask))
        # a second call reuses the compiled graph (no recompilation for the same shapes)
        assert_same_detections(compiled(pixel_values, pixel_mask), model(pixel_values, pixel_mask))


# ----------------------------------------------------------------------------- backbone speed settings

SETTINGS_OFF = {"backbone_fold_batch_norm": False, "backbone_channels_last": False}


def randomised_pair():
    """(default model, the same weights with the speed settings off), random frozen-BN statistics."""
    torch.manual_seed(0)
    fast = DetrCustomForObjectDetection(tiny_config())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, buffer in fast.model.backbone.named_buffers():
            if name.endswith(("running_var", "weight")):
                buffer.copy_(torch.rand(buffer.shape, generator=generator) * 0.5 + 0.75)
            elif name.endswith(("running_mean", "bias")):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
    plain = DetrCustomForObjectDetection(tiny_config(**SETTINGS_OFF))
    assert list(plain.state_dict()) == list(fast.state_dict())  # same keys, same order
    plain.load_state_dict(fast.state_dict())
    return fast, plain


def test_frozen_batch_norms_are_folded_without_changing_the_state_dict():
    fast, plain = randomised_pair()
    folded = [m for m in fast.model.backbone.body.modules() if isinstance(m, FoldedBatchNormConv2d)]
    passthrough = [m for m in fast.model.backbone.body.modules() if isinstance(m, PassThroughBatchNorm2d)]
    assert len(folded) == len(passthrough) > 0
    assert not any(isinstance(m, FoldedBatchNormConv2d) for m in plain.modules())
    for conv in folded:  # each folded convolution reads a BatchNorm that is registered in the model
        assert any(conv.batch_norm[0] is m for m in passthrough)
    assert {n: p.requires_grad for n, p in fast.named_parameters()} == \
        {n: p.requires_grad for n, p in plain.named_parameters()}


def test_speed_settings_give_the_same_outputs():
    fast, plain = randomised_pair()
    pixel_values, pixel_mask = padded_batch()
    with torch.no_grad():
        assert_same_detections(fast.eval()(pixel_values, pixel_mask), plain.eval()(pixel_values, pixel_mask),
                               atol=1e-5)
        copied = copy.deepcopy(fast)
        assert_same_detections(copied(pixel_values, pixel_mask), fast(pixel_values, pixel_mask), atol=0)
    # the copy's folded convolutions read the copy's BatchNorms, not the original's
    copied_norms = [m for m in copied.modules() if isinstance(m, PassThroughBatchNorm2d)]
    for conv in (m for m in copied.modules() if isinstance(m, FoldedBatchNormConv2d)):
        assert any(conv.batch_norm[0] is m for m in copied_norms)

