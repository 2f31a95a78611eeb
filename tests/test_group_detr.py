"""Group DETR (config `num_query_groups`): training with K query groups, inference with the first.

K = 1 must be exactly today's DETR (the parity tests cover that against transformers); here:
eval equals a K = 1 model holding the first group, groups do not see each other, every group is
matched on its own and the loss is the mean of the groups' set losses.
"""

import pytest
import torch
from conftest import padded_batch, random_labels, tiny_config

from modeling_detr_custom import DetrCustomForObjectDetection

K, Q = 3, 12


def group_model(num_groups: int = K, seed: int = 0, **overrides) -> DetrCustomForObjectDetection:
    """Tiny model without dropout (so train-mode outputs are deterministic)."""
    torch.manual_seed(seed)
    config = tiny_config(num_query_groups=num_groups, dropout=0.0, attention_dropout=0.0,
                         activation_dropout=0.0, **overrides)
    return DetrCustomForObjectDetection(config)


def first_group_model(model: DetrCustomForObjectDetection) -> DetrCustomForObjectDetection:
    """A K = 1 model with `model`'s weights, i.e. its first query group."""
    single = group_model(1)
    state = {k: v for k, v in model.state_dict().items() if "extra_query_position_embeddings" not in k}
    single.load_state_dict(state)
    return single


def test_k1_has_no_extra_parameters_and_same_state_dict_keys():
    assert group_model(1).model.extra_query_position_embeddings is None
    extra = set(group_model(K).state_dict()) - set(group_model(1).state_dict())
    assert extra == {"model.extra_query_position_embeddings.weight"}
    assert group_model(K).model.extra_query_position_embeddings.weight.shape == ((K - 1) * Q, 32)


def test_eval_outputs_equal_a_k1_model_with_the_first_group():
    model = group_model(K).eval()
    single = first_group_model(model).eval()
    pixel_values, pixel_mask = padded_batch()
    with torch.no_grad():
        grouped, alone = model(pixel_values, pixel_mask), single(pixel_values, pixel_mask)
    assert grouped.logits.shape == (2, Q, 4) and grouped.pred_boxes.shape == (2, Q, 4)
    assert torch.equal(grouped.logits, alone.logits) and torch.equal(grouped.pred_boxes, alone.pred_boxes)


def test_training_runs_every_group_and_groups_do_not_see_each_other():
    model = group_model(K).train()
    pixel_values, pixel_mask = padded_batch()
    with torch.no_grad():
        before = model(pixel_values, pixel_mask)
        model.model.extra_query_position_embeddings.weight[:Q].add_(torch.randn(Q, 32))  # perturb group 2
        after = model(pixel_values, pixel_mask)
    assert before.logits.shape == (2, K * Q, 4)
    assert torch.equal(before.logits[:, :Q], after.logits[:, :Q])  # group 1 unchanged
    assert torch.equal(before.logits[:, 2 * Q:], after.logits[:, 2 * Q:])  # group 3 unchanged
    assert not torch.allclose(before.logits[:, Q:2 * Q], after.logits[:, Q:2 * Q])
    # group 1 in training is exactly what a K = 1 model computes
    with torch.no_grad():
        alone = first_group_model(model).train()(pixel_values, pixel_mask)
    torch.testing.assert_close(before.logits[:, :Q], alone.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(before.pred_boxes[:, :Q], alone.pred_boxes, rtol=0, atol=1e-6)


def test_loss_is_the_mean_over_groups_of_each_groups_set_loss():
    model = group_model(K).train()
    pixel_values, pixel_mask = padded_batch()
    labels = random_labels([3, 1], seed=4)
    out = model(pixel_values, pixel_mask, labels=labels)
    logits = torch.stack([out.auxiliary_outputs[0]["logits"], out.logits])  # (L, B, K * Q, C + 1)
    boxes = torch.stack([out.auxiliary_outputs[0]["pred_boxes"], out.pred_boxes])
    per_group = [model.criterion(logits[:, :, g * Q:(g + 1) * Q], boxes[:, :, g * Q:(g + 1) * Q], labels)
                 for g in range(K)]
    torch.testing.assert_close(out.loss, sum(loss for loss, _ in per_group) / K)
    for name in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0"):
        torch.testing.assert_close(out.loss_dict[name], sum(d[name] for _, d in per_group) / K)
    # the logged-only errors are the first group's
    for name in ("class_error", "cardinality_error"):
        torch.testing.assert_close(out.loss_dict[name], per_group[0][1][name])


def test_every_group_is_matched_on_every_layer():
    model = group_model(K).train()
    pixel_values, pixel_mask = padded_batch()
    labels = random_labels([3, 2], seed=5)
    calls = []
    matcher_forward = model.criterion.matcher.forward
    model.criterion.matcher.forward = lambda *a: calls.append(matcher_forward(*a)) or calls[-1]
    model(pixel_values, pixel_mask, labels=labels)
    (matches,) = calls
    assert len(matches) == model.config.decoder_layers * K  # one matching per (layer, group)
    for per_image in matches:
        for (queries, targets), target in zip(per_image, labels):
            assert sorted(targets.tolist()) == list(range(len(target["boxes"])))  # every target, once
            assert len(set(queries.tolist())) == len(queries) and (queries < Q).all()


def test_gradients_reach_every_group():
    pixel_values, pixel_mask = padded_batch()
    labels = random_labels([3, 1], seed=6)
    model = group_model(K).train()
    model(pixel_values, pixel_mask, labels=labels).loss.backward()
    grad = model.model.extra_query_position_embeddings.weight.grad
    assert grad is not None and all(grad[g * Q:(g + 1) * Q].abs().sum() > 0 for g in range(K - 1))


def test_save_load_round_trip_and_loading_across_group_counts(tmp_path):
    model = group_model(K)
    model.save_pretrained(tmp_path / "k3")
    loaded = DetrCustomForObjectDetection.from_pretrained(tmp_path / "k3")
    assert loaded.config.num_query_groups == K
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    # a K > 1 checkpoint for inference with K = 1: groups 2..K are dropped, outputs unchanged
    single = DetrCustomForObjectDetection.from_pretrained(tmp_path / "k3", num_query_groups=1).eval()
    pixel_values, pixel_mask = padded_batch()
    with torch.no_grad():
        assert torch.equal(single(pixel_values, pixel_mask).logits, model.eval()(pixel_values, pixel_mask).logits)
    # a K = 1 checkpoint (e.g. published weights) fine-tuned with K > 1: group 1 loaded, groups 2..K fresh
    group_model(1, seed=3).save_pretrained(tmp_path / "k1")
    grouped = DetrCustomForObjectDetection.from_pretrained(tmp_path / "k1", num_query_groups=4)
    source = DetrCustomForObjectDetection.from_pretrained(tmp_path / "k1")
    assert torch.equal(grouped.model.query_position_embeddings.weight, source.model.query_position_embeddings.weight)
    extra = grouped.model.extra_query_position_embeddings.weight
    assert extra.shape == (3 * Q, 32) and torch.isfinite(extra).all() and 0.5 < extra.std() < 1.5  # N(0, 1)


@pytest.mark.parametrize("value", [0, -2])
def test_invalid_group_count_is_a_clear_error(value):
    with pytest.raises(ValueError, match=f"num_query_groups must be a positive integer; got {value}"):
        tiny_config(num_query_groups=value)


# ----------------------------------------------------------------------------- the demo's other options


def test_ffn_init_xavier_is_the_default_and_pytorch_keeps_nn_linear_init():
    fc2 = {init: group_model(1, **({} if init is None else {"ffn_init": init})).model.encoder.layers[0].mlp.fc2
           for init in (None, "pytorch")}
    pytorch_bound = 1 / 64 ** 0.5  # nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = ffn_dim 64
    xavier_bound = (6 / (64 + 32)) ** 0.5  # twice as wide
    assert pytorch_bound < fc2[None].weight.abs().max() <= xavier_bound
    assert fc2["pytorch"].weight.abs().max() <= pytorch_bound
    with pytest.raises(ValueError, match="ffn_init must be 'xavier' or 'pytorch'; got 'normal'"):
        tiny_config(ffn_init="normal")


def test_backbone_output_stride_sets_the_feature_map_resolution():
    for stride, cells in ((None, 2), (16, 4), (8, 8)):
        model = group_model(1, backbone_output_stride=stride).eval()
        features, mask = model.model.backbone(torch.zeros(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
        assert features.shape[-2:] == mask.shape[-2:] == (cells, cells), stride
    with pytest.raises(ValueError, match="backbone_output_stride must be None, 8, 16 or 32 .* got 12"):
        tiny_config(backbone_output_stride=12)
    with pytest.raises(ValueError, match="got 8 with dilation=True"):
        tiny_config(backbone_output_stride=8, dilation=True)
