"""Parity with transformers' DetrForObjectDetection, through the conversion script.

transformers' DETR is faithful to the original only with auxiliary_loss=False (see
shared/docs/detr-reference.md), so that is the reference; a last test shows the departure.
"""

import re
import sys

import pytest
import torch
from conftest import ROOT, padded_batch, random_labels
from transformers import AutoModelForObjectDetection, DetrConfig, DetrForObjectDetection
from transformers.loss.loss_for_object_detection import ForObjectDetectionLoss, HungarianMatcher

from modeling_detr_custom.conversion import COCO_NAMES, V4_TO_V5, rename

sys.path.insert(0, str(ROOT / "scripts"))
import convert_hf_detr  # noqa: E402

NUM_LABELS = 5


def randomise_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random frozen-BN statistics/affine and biases, so zero-initialised values hide nothing."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var") or (name.endswith("weight") and tensor.ndim == 1 and "backbone" in name):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.5 + 0.75)
            elif name.endswith(("running_mean", "bias")):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)


def reference_model(auxiliary_loss: bool = False) -> DetrForObjectDetection:
    config = DetrConfig(use_timm_backbone=True, backbone="resnet50", use_pretrained_backbone=False,
                        auxiliary_loss=auxiliary_loss, num_labels=NUM_LABELS)
    torch.manual_seed(0)
    model = DetrForObjectDetection(config)
    randomise_(model)
    return model.eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(transformers reference, our converted model loaded from its folder with trust_remote_code)."""
    reference = reference_model()
    hf_dir, out_dir = tmp_path_factory.mktemp("hf"), tmp_path_factory.mktemp("ours")
    reference.save_pretrained(hf_dir)
    convert_hf_detr.main(["--hf_model", str(hf_dir), "--output_dir", str(out_dir)])
    ours = AutoModelForObjectDetection.from_pretrained(out_dir, trust_remote_code=True).eval()
    return reference, ours, out_dir


def run_both(reference, ours, **kwargs):
    """Eval outputs of both on a padded batch; ours with labels (auxiliary outputs need them)."""
    pixel_values, pixel_mask = padded_batch(sizes=((160, 224), (128, 160)))
    labels = random_labels([3, 0], num_labels=NUM_LABELS, seed=1)  # the second image has no boxes
    with torch.no_grad():
        theirs = reference(pixel_values=pixel_values, pixel_mask=pixel_mask, output_hidden_states=True)
        mine = ours(pixel_values, pixel_mask, labels=labels, **kwargs)
    return theirs, mine


@pytest.mark.parametrize("auxiliary_loss", [True, False])
def test_outputs_match_transformers(converted, auxiliary_loss):
    reference, ours, _ = converted
    ours.config.auxiliary_loss = auxiliary_loss
    theirs, mine = run_both(reference, ours)
    torch.testing.assert_close(mine.logits, theirs.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(mine.pred_boxes, theirs.pred_boxes, atol=1e-4, rtol=0)
    assert (mine.auxiliary_outputs is not None) == auxiliary_loss


def test_auxiliary_outputs_match_transformers_heads_on_normed_states(converted):
    reference, ours, _ = converted
    ours.config.auxiliary_loss = True
    theirs, mine = run_both(reference, ours)
    layer_states = theirs.decoder_hidden_states[-6:]  # one per decoder layer, before the norm
    norm = reference.model.decoder.layernorm
    assert len(mine.auxiliary_outputs) == 5
    for aux, state in zip(mine.auxiliary_outputs, layer_states[:-1]):
        with torch.no_grad():
            expected_logits = reference.class_labels_classifier(norm(state))
            expected_boxes = reference.bbox_predictor(norm(state)).sigmoid()
        torch.testing.assert_close(aux["logits"], expected_logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(aux["pred_boxes"], expected_boxes, atol=1e-4, rtol=0)


def test_loss_terms_and_matchings_match_transformers_loss(converted):
    reference, ours, _ = converted
    ours.config.auxiliary_loss = True
    _, mine = run_both(reference, ours)
    labels = random_labels([3, 0], num_labels=NUM_LABELS, seed=1)
    logits = torch.stack([a["logits"] for a in mine.auxiliary_outputs] + [mine.logits])
    boxes = torch.stack([a["pred_boxes"] for a in mine.auxiliary_outputs] + [mine.pred_boxes])
    config = DetrConfig(**{**reference.config.to_dict(), "auxiliary_loss": True})
    loss, loss_dict, _ = ForObjectDetectionLoss(mine.logits, labels, "cpu", mine.pred_boxes, config, logits, boxes)
    for name, value in loss_dict.items():
        torch.testing.assert_close(mine.loss_dict[name].reshape(()), value.reshape(()).float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(mine.loss, loss, rtol=1e-5, atol=0)

    their_matcher = HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)
    our_matches = ours.criterion.matcher(logits, boxes, labels)
    for layer in range(6):
        theirs = their_matcher({"logits": logits[layer], "pred_boxes": boxes[layer]}, labels)
        for (q1, t1), (q2, t2) in zip(our_matches[layer], theirs):
            assert q1.tolist() == q2.tolist() and t1.tolist() == t2.tolist()


def test_transformers_with_auxiliary_loss_departs_from_the_original(converted):
    """With auxiliary_loss=True transformers normalises the running decoder state; we do not."""
    faithful, ours, _ = converted
    departing = reference_model(auxiliary_loss=True)
    departing.load_state_dict(faithful.state_dict())
    ours.config.auxiliary_loss = True
    theirs, mine = run_both(departing, ours)
    assert (mine.logits - theirs.logits).abs().max() > 1e-2
    faithful_out, _ = run_both(faithful, ours)
    torch.testing.assert_close(mine.logits, faithful_out.logits, atol=1e-4, rtol=0)


def test_v4_key_names_convert(tmp_path, converted):
    """A folder with transformers v4 key names (facebook/detr-resnet-50's layout) converts too."""
    reference, ours, _ = converted
    v5 = reference.state_dict()
    v4 = {}
    for key, value in v5.items():  # the inverse of V4_TO_V5, written out independently
        key = key.replace("model.backbone.model.", "model.backbone.conv_encoder.model.")
        key = key.replace(".mlp.fc", ".fc").replace("_attn.o_proj.", "_attn.out_proj.")
        v4[key] = value
    assert rename(v4, V4_TO_V5).keys() == v5.keys()
    reference.save_pretrained(tmp_path / "hf")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in v4.items()}, tmp_path / "hf" / "model.safetensors")
    convert_hf_detr.main(["--hf_model", str(tmp_path / "hf"), "--output_dir", str(tmp_path / "out")])
    reloaded = AutoModelForObjectDetection.from_pretrained(tmp_path / "out", trust_remote_code=True)
    for (k1, v1), (k2, v2) in zip(ours.state_dict().items(), reloaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


ORIGINAL_NAMES = [  # transformers v5 -> facebookresearch/detr, written from the original code
    (r"^model\.backbone\.model\.", "backbone.0.body."),
    (r"^model\.input_projection\.", "input_proj."),
    (r"^model\.query_position_embeddings\.", "query_embed."),
    (r"^model\.decoder\.layernorm\.", "transformer.decoder.norm."),
    (r"^model\.(encoder|decoder)\.layers\.", r"transformer.\1.layers."),
    (r"\.encoder_attn\.", ".multihead_attn."),
    (r"_attn\.o_proj\.", "_attn.out_proj."),
    (r"\.mlp\.fc(\d)\.", r".linear\1."),
    (r"(encoder\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm1."),
    (r"(encoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm2."),
    (r"(decoder\.layers\.\d+)\.self_attn_layer_norm\.", r"\1.norm1."),
    (r"(decoder\.layers\.\d+)\.multihead_attn_layer_norm\.", r"\1.norm2."),
    (r"(decoder\.layers\.\d+)\.final_layer_norm\.", r"\1.norm3."),
    (r"^class_labels_classifier\.", "class_embed."),
    (r"^bbox_predictor\.", "bbox_embed."),
]


def to_original(v5: dict) -> dict:
    renamed = {}
    for key, value in v5.items():
        for pattern, replacement in ORIGINAL_NAMES:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    fused = {}
    for key, value in renamed.items():
        match = re.match(r"(.*)\.(q|k|v)_proj\.(weight|bias)$", key)
        if match is None:
            fused[key] = value
        elif match[2] == "q":
            parts = [renamed[f"{match[1]}.{p}_proj.{match[3]}"] for p in "qkv"]
            fused[f"{match[1]}.in_proj_{match[3]}"] = torch.cat(parts)
    return fused


def test_original_checkpoint_converts(tmp_path, converted):
    reference, ours, _ = converted
    original = to_original(reference.state_dict())
    assert "transformer.decoder.layers.0.norm3.weight" in original and "backbone.0.body.conv1.weight" in original
    torch.save({"model": original}, tmp_path / "detr.pth")
    convert_hf_detr.main(["--original_checkpoint", str(tmp_path / "detr.pth"), "--output_dir", str(tmp_path / "out")])
    reloaded = AutoModelForObjectDetection.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    theirs, mine = run_both(reference, reloaded)
    torch.testing.assert_close(mine.logits, theirs.logits, atol=1e-4, rtol=0)


def test_conversion_lists_unaccounted_keys_and_writes_nothing(tmp_path, converted):
    reference, _, _ = converted
    original = to_original(reference.state_dict())
    original["transformer.extra.weight"] = torch.zeros(1)
    del original["class_embed.bias"]
    torch.save({"model": original}, tmp_path / "detr.pth")
    with pytest.raises(ValueError, match=r"missing keys \(1\).*class_labels_classifier\.bias(.|\n)*"
                                         r"unexpected keys \(1\).*transformer\.extra"):
        convert_hf_detr.main(["--original_checkpoint", str(tmp_path / "detr.pth"),
                              "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_conversion_refuses_to_write_when_outputs_disagree(tmp_path, converted, monkeypatch):
    reference, _, _ = converted
    reference.save_pretrained(tmp_path / "hf")
    import modeling_detr_custom.conversion as conversion
    real = conversion.v5_to_ours

    def corrupt(state_dict):
        out = real(state_dict)
        out["class_labels_classifier.bias"] = out["class_labels_classifier.bias"] + 1.0
        return out

    monkeypatch.setattr(conversion, "v5_to_ours", corrupt)
    with pytest.raises(ValueError, match="disagrees"):
        convert_hf_detr.main(["--hf_model", str(tmp_path / "hf"), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_coco_names_cover_raw_ids():
    assert len(COCO_NAMES) == 91 and COCO_NAMES[1] == "person" and COCO_NAMES[90] == "toothbrush"
