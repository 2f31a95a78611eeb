"""Model core: matcher properties, save/load, init, input validation, precision, backbone."""

import pytest
import timm
import torch
from conftest import padded_batch, random_labels, tiny_config
from timm.layers.norm_act import FrozenBatchNorm2d
from torch import nn

from modeling_detr_custom import DetrCustomConfig, DetrCustomForObjectDetection, DetrCustomModel
from modeling_detr_custom.loss_detr_custom import HungarianMatcher, global_num_boxes
from modeling_detr_custom.modeling_detr_custom import DetrCustomSinePositionEmbedding


@pytest.fixture
def model(config):
    torch.manual_seed(0)
    return DetrCustomForObjectDetection(config).eval()


# ----------------------------------------------------------------------------- matcher


def random_predictions(layers=3, batch=4, queries=12, classes=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(layers, batch, queries, classes, generator=generator)
    boxes = torch.rand(layers, batch, queries, 4, generator=generator) * 0.5 + 0.1
    return logits, boxes


def test_batched_matching_equals_per_image_matching():
    matcher = HungarianMatcher(1, 5, 2)
    logits, boxes = random_predictions()
    labels = random_labels([3, 0, 5, 1], num_labels=3, seed=2)
    batched = matcher(logits, boxes, labels)
    for layer in range(logits.shape[0]):
        for b, target in enumerate(labels):
            alone = matcher(logits[layer:layer + 1, b:b + 1], boxes[layer:layer + 1, b:b + 1], [target])
            assert batched[layer][b][0].tolist() == alone[0][0][0].tolist()
            assert batched[layer][b][1].tolist() == alone[0][0][1].tolist()


def test_matching_is_optimal_and_one_to_one():
    matcher = HungarianMatcher(1, 5, 2)
    logits, boxes = random_predictions(layers=1, batch=1, queries=5)
    labels = random_labels([3], num_labels=3, seed=3)
    (queries, targets), = matcher(logits, boxes, labels)[0]
    assert len(set(queries.tolist())) == 3 and sorted(targets.tolist()) == [0, 1, 2]
    cost = matcher.cost_matrix(logits, boxes, labels[0]["class_labels"], labels[0]["boxes"])[0, 0]
    best = cost[queries, targets].sum()
    import itertools
    brute = min(sum(cost[q, t] for t, q in enumerate(perm)) for perm in itertools.permutations(range(5), 3))
    assert best <= brute + 1e-6


def test_image_without_targets_matches_nothing():
    logits, boxes = random_predictions(batch=2)
    matches = HungarianMatcher()(logits, boxes, random_labels([0, 2], num_labels=3))
    assert all(len(m[0][0]) == 0 and len(m[1][0]) == 2 for m in matches)
    all_empty = HungarianMatcher()(logits, boxes, random_labels([0, 0], num_labels=3))
    assert all(len(q) == 0 for layer in all_empty for q, _ in layer)


def test_more_targets_than_queries_is_a_clear_error():
    logits, boxes = random_predictions(batch=2, queries=4)
    with pytest.raises(ValueError, match="image 1 has 5 target boxes but the model has only 4 queries"):
        HungarianMatcher()(logits, boxes, random_labels([2, 5], num_labels=3))


# ----------------------------------------------------------------------------- loss


def test_loss_terms_for_every_decoder_layer(model):
    pixel_values, pixel_mask = padded_batch()
    out = model(pixel_values, pixel_mask, labels=random_labels([2, 0]))
    layers = model.config.decoder_layers
    for name in ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error"):
        assert name in out.loss_dict and all(f"{name}_{i}" in out.loss_dict for i in range(layers - 1))
    weights = {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}
    expected = sum(w * v for k, v in out.loss_dict.items() for name, w in weights.items()
                   if k == name or k.startswith(name + "_"))
    torch.testing.assert_close(out.loss, expected)
    assert len(out.auxiliary_outputs) == layers - 1
    with torch.no_grad():
        assert model(pixel_values, pixel_mask).auxiliary_outputs is None  # batch-first fields only


def test_loss_has_gradients_only_where_trainable(config):
    model = DetrCustomForObjectDetection(config).train()
    pixel_values, pixel_mask = padded_batch()
    model(pixel_values, pixel_mask, labels=random_labels([2, 1])).loss.backward()
    body = model.model.backbone.body
    assert body.conv1[0].weight.grad is None and body.layer1[0].conv1.weight.grad is None
    assert body.layer4[0].conv1.weight.grad is not None
    assert model.class_labels_classifier.weight.grad.abs().sum() > 0


def test_num_boxes_is_clamped_and_a_tensor():
    labels = random_labels([0, 0])
    assert global_num_boxes(labels, torch.device("cpu")).item() == 1.0
    assert global_num_boxes(random_labels([3, 2]), torch.device("cpu")).item() == 5.0


def _num_boxes_worker(rank, world_size, port, results):
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    counts = [[3, 2], [1, 0]][rank]  # 6 boxes over 2 processes
    results[rank] = global_num_boxes(random_labels(counts), torch.device("cpu")).item()
    torch.distributed.destroy_process_group()


def test_num_boxes_is_averaged_over_processes_once():
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("fork").Manager().dict()
    # fork: the children inherit the imported modules instead of importing torch again
    mp.start_processes(_num_boxes_worker, args=(2, port, results), nprocs=2, join=True, start_method="fork")
    assert dict(results) == {0: 3.0, 1: 3.0}  # (5 + 1) / 2, not divided twice


# ----------------------------------------------------------------------------- save / load / init


def test_save_and_load_give_bit_identical_outputs(tmp_path, model):
    pixel_values, pixel_mask = padded_batch()
    labels = random_labels([2, 1])
    with torch.no_grad():
        before = model(pixel_values, pixel_mask, labels=labels)
    model.save_pretrained(tmp_path)
    loaded = DetrCustomForObjectDetection.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        after = loaded(pixel_values, pixel_mask, labels=labels)
    assert torch.equal(before.logits, after.logits) and torch.equal(before.pred_boxes, after.pred_boxes)
    assert torch.equal(before.loss, after.loss)


def test_non_persistent_buffers_are_rebuilt_after_loading(tmp_path):
    model = DetrCustomForObjectDetection(tiny_config(eos_coefficient=0.25))
    assert "criterion.class_weight" not in model.state_dict()
    model.save_pretrained(tmp_path)
    loaded = DetrCustomForObjectDetection.from_pretrained(tmp_path)
    assert loaded.criterion.class_weight.tolist() == [1.0, 1.0, 1.0, 0.25]


def test_base_model_loads_from_a_detector_checkpoint(tmp_path, model):
    model.save_pretrained(tmp_path)
    base = DetrCustomModel.from_pretrained(tmp_path).eval()
    pixel_values, pixel_mask = padded_batch()
    with torch.no_grad():
        assert torch.equal(base(pixel_values, pixel_mask).last_hidden_state,
                           model(pixel_values, pixel_mask).last_hidden_state)


def test_init_leaves_the_timm_backbone_as_timm_made_it(config):
    """_init_weights touches only our modules: the backbone equals a timm model built from the same seed with
    `zero_init_last=False` (timm zero-initialises each residual block's last BatchNorm for a BatchNorm that trains;
    every one here is frozen, so they start at scale 1), and differs from timm's default only in those scales."""
    references = {}
    for zero_init_last in (False, True):
        torch.manual_seed(7)
        references[zero_init_last] = timm.create_model(config.backbone, features_only=True, pretrained=False,
                                                        out_indices=(-1,), zero_init_last=zero_init_last).state_dict()
    torch.manual_seed(7)
    model = DetrCustomModel(config)
    ours = model.backbone.body.state_dict()
    for name, value in references[False].items():
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(ours[name], value), name
    zeroed = [name for name, value in references[True].items() if not torch.equal(value, references[False][name])]
    assert zeroed and all(name.endswith(".weight") and not references[True][name].any() for name in zeroed)
    backbone_before = {k: v.clone() for k, v in ours.items()}
    for module in model.backbone.modules():
        model._init_weights(module)
    assert all(torch.equal(backbone_before[k], v) for k, v in model.backbone.body.state_dict().items())


def test_a_random_backbone_trains_every_residual_branch(config):
    """timm's zero scale of each residual block's last BatchNorm, frozen, would stay 0: no gradient would ever
    reach the convolutions of that branch. Built from scratch, every frozen BatchNorm is the identity's scale 1 and
    every convolution of the trainable stages gets a gradient."""
    model = DetrCustomForObjectDetection(config).train()
    body = model.model.backbone.body
    scales = {name: m.weight for name, m in body.named_modules() if isinstance(m, FrozenBatchNorm2d)}
    assert scales and all(torch.equal(s, torch.ones_like(s)) for s in scales.values()), \
        [name for name, s in scales.items() if not torch.equal(s, torch.ones_like(s))]
    pixel_values, pixel_mask = padded_batch()
    model(pixel_values, pixel_mask, labels=random_labels([2, 1])).loss.backward()
    convs = {name: m for name, m in body.named_modules() if isinstance(m, nn.Conv2d) and m.weight.requires_grad}
    assert len(convs) >= 6
    dead = [name for name, m in convs.items() if m.weight.grad is None or not m.weight.grad.any()]
    assert dead == []


def test_init_is_the_originals(config):
    model = DetrCustomForObjectDetection(config)
    attn = model.model.encoder.layers[0].self_attn
    bound = (6 / sum(attn.in_proj_weight.shape)) ** 0.5  # xavier_uniform over the whole (3d, d)
    assert attn.in_proj_weight.abs().max() <= bound and attn.in_proj_weight.abs().max() > 0.8 * bound
    assert torch.count_nonzero(attn.in_proj_bias) == 0 and torch.count_nonzero(attn.out_proj.bias) == 0
    assert model.model.query_position_embeddings.weight.std() > 0.5  # nn.Embedding's N(0, 1)


def test_backbone_batchnorms_are_frozen_and_stem_has_no_grad(config):
    model = DetrCustomForObjectDetection(config)
    body = model.model.backbone.body
    assert not any(isinstance(m, nn.BatchNorm2d) for m in body.modules())
    frozen = {n.split(".")[0] for n, p in body.named_parameters() if not p.requires_grad}
    trainable = {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad}
    assert frozen == {"conv1", "layer1"} and trainable == {"layer2", "layer3", "layer4"}
    unfrozen = DetrCustomForObjectDetection(tiny_config(freeze_backbone_stem=False))
    assert all(p.requires_grad for p in unfrozen.model.backbone.body.parameters())


def test_pretrained_backbone_loads_from_a_local_file(tmp_path, config):
    from safetensors.torch import save_file
    source = timm.create_model(config.backbone, pretrained=False)
    save_file(source.state_dict(), tmp_path / "backbone.safetensors")
    model = DetrCustomForObjectDetection(config)
    model.load_pretrained_backbone(tmp_path / "backbone.safetensors")
    assert torch.equal(model.model.backbone.body.layer4[0].conv1.weight, source.layer4[0].conv1.weight)
    assert torch.equal(model.model.backbone.body.bn1.running_var, source.bn1.running_var)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        model.load_pretrained_backbone(tmp_path / "nope.pth")


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("boxes, classes, message", [
    ([[0.5, 0.5, 1.2, 0.3]], [0], r"labels\[1\]\['boxes'\] must be normalised .*\[0.5, 0.5, 1.2"),
    ([[0.5, 0.5, 0.0, 0.3]], [0], r"labels\[1\]\['boxes'\].*w, h > 0.*0.0, 0.3"),
    ([[0.5, 0.5, -0.1, 0.3]], [0], r"labels\[1\]\['boxes'\]"),
    ([[0.5, float("nan"), 0.2, 0.3]], [0], r"labels\[1\]\['boxes'\].*nan"),
    ([[0.5, 0.5, 0.2, 0.3]], [3], r"labels\[1\]\['class_labels'\] must be in \[0, 3\).*got 3"),
    ([[0.5, 0.5, 0.2, 0.3]], [-1], r"labels\[1\]\['class_labels'\].*got -1"),
])
def test_bad_targets_name_the_image_and_value(model, boxes, classes, message):
    pixel_values, pixel_mask = padded_batch()
    labels = random_labels([2, 0])
    labels[1] = {"class_labels": torch.tensor(classes), "boxes": torch.tensor(boxes)}
    with pytest.raises(ValueError, match=message):
        model(pixel_values, pixel_mask, labels=labels)


def test_bad_shapes_are_clear_errors(model):
    pixel_values, pixel_mask = padded_batch()
    with pytest.raises(ValueError, match=r"pixel_values must be \(batch, 3, height, width\); got \(3, 96, 128\)"):
        model(pixel_values[0])
    with pytest.raises(ValueError, match=r"pixel_values must be .*got \(2, 1, 96, 128\)"):
        model(pixel_values[:, :1])
    with pytest.raises(ValueError, match=r"pixel_mask must be .*got \(2, 96, 127\)"):
        model(pixel_values, pixel_mask[:, :, :-1])
    with pytest.raises(ValueError, match=r"one dict per image \(2\); got 1"):
        model(pixel_values, pixel_mask, labels=random_labels([1]))
    with pytest.raises(ValueError, match=r"labels\[0\]: 'boxes' must be \(n, 4\)"):
        model(pixel_values, pixel_mask, labels=[{"class_labels": torch.tensor([0]), "boxes": torch.rand(1, 3)},
                                                random_labels([1])[0]])


def test_nan_predictions_never_reach_the_loss_silently(model):
    pixel_values, pixel_mask = padded_batch()
    pixel_values[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        model(pixel_values, pixel_mask, labels=random_labels([1, 1]))


@pytest.mark.parametrize("overrides, message", [
    (dict(d_model=30, encoder_attention_heads=4), "divisible"),
    (dict(num_queries=0), "num_queries"),
    (dict(dropout=1.5), "dropout"),
    (dict(activation_function="swish"), "activation_function"),
    (dict(position_embedding_type="rope"), "position_embedding_type"),
    (dict(class_cost=0, bbox_cost=0, giou_cost=0), "matching costs"),
    (dict(eos_coefficient=0), "eos_coefficient"),
])
def test_invalid_configs_raise_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_an_unknown_backbone_names_timms_closest_names():
    with pytest.raises(ValueError, match=r"^backbone 'resnet5O' is not a timm model; closest timm names: 'resnet50'"):
        DetrCustomConfig(backbone="resnet5O")
    with pytest.raises(ValueError, match=r"backbone 'test_resnt' is not a timm model; closest .*'test_resnet'"):
        tiny_config(backbone="test_resnt")
    with pytest.raises(ValueError, match=r"backbone 'qqqqqqq' is not a timm model; no timm name is close"):
        DetrCustomConfig(backbone="qqqqqqq")
    with pytest.raises(ValueError, match=r"backbone = None; expected a timm model name"):
        DetrCustomConfig(backbone=None)
    config = tiny_config()
    config.backbone = "resnet_50"  # a config changed after construction is checked where it is validated again
    with pytest.raises(ValueError, match=r"closest timm names: 'resnet50'"):
        config.validate_detr()
    # timm's names with a pretrained tag, and the sources timm resolves itself, are accepted as they are
    assert DetrCustomConfig(backbone="resnet50.a1_in1k").backbone == "resnet50.a1_in1k"
    assert DetrCustomConfig(backbone="hf-hub:timm/resnet18.a1_in1k").backbone == "hf-hub:timm/resnet18.a1_in1k"


def test_num_labels_that_disagrees_with_id2label_names_both():
    with pytest.raises(ValueError, match=r"^num_labels=5 disagrees with id2label, which names 3 classes "
                                         r"\('circle', 'square', 'triangle'\)"):
        tiny_config(num_labels=5)  # tiny_config gives id2label with 3 names
    assert tiny_config(num_labels=3).id2label == {0: "circle", 1: "square", 2: "triangle"}
    assert DetrCustomConfig(num_labels=4).id2label == {i: f"LABEL_{i}" for i in range(4)}
    assert DetrCustomConfig().num_labels == 91


def test_config_defaults_are_the_original_detr_r50():
    config = DetrCustomConfig()
    assert (config.backbone, config.num_queries, config.d_model, config.encoder_layers, config.decoder_layers) == \
        ("resnet50", 100, 256, 6, 6)
    assert (config.dropout, config.attention_dropout, config.activation_dropout) == (0.1, 0.1, 0.1)
    assert config.auxiliary_loss and config.num_labels == 91 and config.eos_coefficient == 0.1
    assert (config.class_cost, config.bbox_cost, config.giou_cost) == (1, 5, 2)


# ----------------------------------------------------------------------------- precision


def test_position_embedding_is_float32_under_bf16_autocast():
    mask = torch.zeros(2, 5, 7, dtype=torch.bool)
    mask[1, 3:] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pos = DetrCustomSinePositionEmbedding(16)(mask)
    assert pos.dtype == torch.float32 and pos.shape == (2, 32, 5, 7)
    # each image's own valid extent spans [0, 2*pi]: the last valid row of image 1 is row 2
    torch.testing.assert_close(pos[1, :, 2], pos[0, :, 4], atol=1e-5, rtol=0)


def test_bf16_autocast_on_cpu_trains_and_stays_close_to_fp32(model):
    pixel_values, pixel_mask = padded_batch()
    labels = random_labels([2, 1])
    with torch.no_grad():
        fp32 = model(pixel_values, pixel_mask, labels=labels)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(pixel_values, pixel_mask, labels=labels)
    bf16.loss.backward()
    assert torch.isfinite(bf16.loss)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(pixel_values, pixel_mask)
    assert (bf16.pred_boxes.float() - fp32.pred_boxes).abs().max() < 0.05


def test_outputs_on_request_and_as_tuple(model):
    pixel_values, pixel_mask = padded_batch()
    with torch.no_grad():
        out = model(pixel_values, pixel_mask, output_hidden_states=True, output_attentions=True)
        plain = model(pixel_values, pixel_mask)
        as_tuple = model(pixel_values, pixel_mask, return_dict=False)
    config = model.config
    assert len(out.encoder_hidden_states) == config.encoder_layers + 1
    assert len(out.decoder_hidden_states) == config.decoder_layers + 1
    assert out.cross_attentions[0].shape[:3] == (2, config.decoder_attention_heads, config.num_queries)
    torch.testing.assert_close(out.logits, plain.logits, atol=1e-5, rtol=0)  # explicit softmax path = SDPA
    assert plain.encoder_hidden_states is None and isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], plain.logits)


def test_folded_batch_norm_and_channels_last_change_only_rounding():
    """The speed settings keep the math, the state dict and the gradients of the plain backbone."""
    torch.manual_seed(0)
    fast = DetrCustomForObjectDetection(tiny_config(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0))
    plain = DetrCustomForObjectDetection(tiny_config(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                                                     backbone_fold_batch_norm=False, backbone_channels_last=False))
    assert list(fast.state_dict()) == list(plain.state_dict())
    with torch.no_grad():  # non-trivial frozen statistics, so a wrongly applied BatchNorm would show
        for name, value in fast.state_dict().items():
            if "running_var" in name or "running_mean" in name:
                value.uniform_(0.5, 1.5)
    plain.load_state_dict(fast.state_dict())
    pixel_values, pixel_mask = padded_batch()
    labels = random_labels([2, 1])
    out_fast, out_plain = fast(pixel_values, pixel_mask, labels=labels), plain(pixel_values, pixel_mask, labels=labels)
    torch.testing.assert_close(out_fast.logits, out_plain.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_fast.pred_boxes, out_plain.pred_boxes, atol=1e-5, rtol=1e-4)
    out_fast.loss.backward()
    out_plain.loss.backward()
    grad = lambda m: m.model.backbone.body.layer4[0].conv1.weight.grad  # noqa: E731
    torch.testing.assert_close(grad(fast), grad(plain), atol=1e-5, rtol=1e-3)


def test_a_head_recreated_for_new_labels_is_initialised(tmp_path, model):
    """from_pretrained with a new label set re-creates the class head: it must get a real init."""
    model.save_pretrained(tmp_path)
    for _ in range(3):  # uninitialised memory would show as huge or NaN values in some of the runs
        new = DetrCustomForObjectDetection.from_pretrained(
            tmp_path, id2label={0: "a", 1: "b", 2: "c", 3: "d", 4: "e"}, ignore_mismatched_sizes=True)
        weight = new.class_labels_classifier.weight
        assert weight.shape == (6, 32) and torch.isfinite(weight).all()
        assert weight.abs().max() <= 1 / 32 ** 0.5 + 1e-6  # nn.Linear's default bound
        assert torch.equal(new.model.encoder.layers[0].self_attn.in_proj_weight,
                           model.model.encoder.layers[0].self_attn.in_proj_weight)


def test_feed_forward_weights_get_the_originals_xavier_init(config):
    model = DetrCustomForObjectDetection(config)
    fc1 = model.model.encoder.layers[0].mlp.fc1.weight  # (ffn, d)
    bound = (6 / sum(fc1.shape)) ** 0.5
    assert fc1.abs().max() <= bound and fc1.abs().max() > 0.8 * bound
