"""The model behaves like a transformers model (issue 10): the property checks of transformers'
tests/test_modeling_common.py, written for this model with a tiny-config model tester.

- output flags (`output_attentions`, `output_hidden_states`, `return_dict`) come from the config when a call
  passes None, and the call wins; attentions and hidden states have the documented counts and shapes; the output
  fields are transformers' DETR fields in its order, and `return_dict=False` gives the documented tuple;
- config: transformers' generic names through `attribute_map`, `is_encoder_decoder`, save/load round trip;
- weight init: a meta-device model after `init_weights()`, `from_pretrained` without weights and a checkpoint
  without the backbone get proper values everywhere; a complete checkpoint loads bit-identically;
- gradient checkpointing recomputes the layers and gives the same loss and gradients (its memory saving is
  measured by benchmarks/bench_memory.py, not here);
- attn_implementation "sdpa" (default) and "eager" agree; attention weights with either (an SDPA call asking for
  them runs eager); a function registered with transformers' AttentionInterface is used;
- image processor: kwargs class name, images with the model's `num_channels`;
- the pipeline loads a remote-code folder without logging an error.
"""

import copy
import dataclasses
import json
import logging
from contextlib import contextmanager

import pytest
import torch
from conftest import padded_batch, random_labels, tiny_config
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.layers.norm_act import FrozenBatchNorm2d
from torch import nn
from transformers import AttentionInterface, DetrConfig, ImagesKwargs, PreTrainedModel, pipeline, set_seed
from transformers.models.detr.modeling_detr import DetrModelOutput, DetrObjectDetectionOutput

from modeling_detr_custom import (
    DetrCustomConfig,
    DetrCustomForObjectDetection,
    DetrCustomImageProcessor,
    DetrCustomModel,
)
from modeling_detr_custom.modeling_detr_custom import (
    DetrCustomModelOutput,
    DetrCustomObjectDetectionOutput,
    class_weights,
    eager_attention_forward,
)

MODEL_CLASSES = (DetrCustomModel, DetrCustomForObjectDetection)


class DetrCustomModelTester:
    """Tiny configs, a padded batch and the shapes every output must have (transformers' model-tester pattern).

    Every count and size differs from the others (2 encoder and 3 decoder layers, 4 and 2 heads, 7 queries against
    a 3 x 4 = 12 cell feature map), so a field holding the wrong tensor cannot pass a shape check.
    """

    batch_size = 2
    image_sizes = ((96, 128), (64, 96))  # padded to 96 x 128; stride 32: 3 x 4 cells, the second image 2 x 3
    num_cells = 12
    num_queries = 7
    encoder_layers, decoder_layers = 2, 3
    encoder_heads, decoder_heads = 4, 2
    d_model = 32

    def get_config(self, **overrides) -> DetrCustomConfig:
        kwargs = dict(num_queries=self.num_queries, encoder_layers=self.encoder_layers,
                      decoder_layers=self.decoder_layers, encoder_attention_heads=self.encoder_heads,
                      decoder_attention_heads=self.decoder_heads, d_model=self.d_model)
        return tiny_config(**{**kwargs, **overrides})

    def prepare_config_and_inputs_for_common(self, **overrides) -> tuple[DetrCustomConfig, dict]:
        pixel_values, pixel_mask = padded_batch(sizes=self.image_sizes)
        return self.get_config(**overrides), {"pixel_values": pixel_values, "pixel_mask": pixel_mask}

    def create_model(self, model_class: type, seed: int = 0, **overrides) -> nn.Module:
        torch.manual_seed(seed)
        return model_class(self.get_config(**overrides)).eval()

    def padded_cells(self) -> list[int]:
        """Flattened feature-map cells of the second image that are padding (outside its 2 x 3 valid cells)."""
        return [r * 4 + c for r in range(3) for c in range(4) if r >= 2 or c >= 3]


tester = DetrCustomModelTester()


@pytest.fixture(scope="module")
def inputs() -> dict:
    return tester.prepare_config_and_inputs_for_common()[1]


def run(model: nn.Module, inputs: dict, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs)


# ----------------------------------------------------------------------------- output flags


FLAG_FIELDS = {"output_hidden_states": ("encoder_hidden_states", "decoder_hidden_states"),
               "output_attentions": ("encoder_attentions", "decoder_attentions", "cross_attentions")}


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("flag", sorted(FLAG_FIELDS))
def test_output_flags_come_from_the_config_and_the_call_wins(model_class, flag, inputs):
    model = tester.create_model(model_class, attn_implementation="eager")
    for config_value, call_value, expected in [(False, None, False), (True, None, True),
                                               (True, False, False), (False, True, True)]:
        setattr(model.config, flag, config_value)
        out = run(model, inputs, **{flag: call_value})
        for field in FLAG_FIELDS[flag]:
            assert (getattr(out, field) is not None) == expected, (flag, config_value, call_value, field)


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_return_dict_comes_from_the_config_and_the_call_wins(model_class, inputs):
    model = tester.create_model(model_class)
    model.config.return_dict = False
    assert isinstance(run(model, inputs), tuple)
    assert not isinstance(run(model, inputs, return_dict=True), tuple)
    model.config.return_dict = True
    assert not isinstance(run(model, inputs), tuple)
    assert isinstance(run(model, inputs, return_dict=False), tuple)


# ----------------------------------------------------------------------------- counts and shapes


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_attentions_have_the_documented_counts_and_shapes(model_class, inputs):
    model = tester.create_model(model_class)
    out = run(model, inputs, output_attentions=True)
    b, n, q = tester.batch_size, tester.num_cells, tester.num_queries
    expected = {"encoder_attentions": (tester.encoder_layers, (b, tester.encoder_heads, n, n)),
                "decoder_attentions": (tester.decoder_layers, (b, tester.decoder_heads, q, q)),
                "cross_attentions": (tester.decoder_layers, (b, tester.decoder_heads, q, n))}
    for field, (count, shape) in expected.items():
        weights = getattr(out, field)
        assert len(weights) == count and all(w.shape == shape for w in weights), field
        for w in weights:  # every row a distribution
            torch.testing.assert_close(w.sum(-1), torch.ones(shape[:-1]), atol=1e-5, rtol=0)
    padding = tester.padded_cells()
    for field in ("encoder_attentions", "cross_attentions"):  # nothing attends to the padding
        assert all(w[1, ..., padding].abs().max() == 0 for w in getattr(out, field)), field


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_hidden_states_have_the_documented_counts_and_shapes(model_class, inputs):
    model = tester.create_model(model_class)
    out = run(model, inputs, output_hidden_states=True)
    b, n, q, d = tester.batch_size, tester.num_cells, tester.num_queries, tester.d_model
    assert len(out.encoder_hidden_states) == tester.encoder_layers + 1
    assert all(h.shape == (b, n, d) for h in out.encoder_hidden_states)
    assert len(out.decoder_hidden_states) == tester.decoder_layers + 1
    assert all(h.shape == (b, q, d) for h in out.decoder_hidden_states)
    assert out.last_hidden_state.shape == (b, q, d) and out.encoder_last_hidden_state.shape == (b, n, d)
    # what each one is: the decoder starts at zeros, its states are taken before the shared LayerNorm
    assert torch.count_nonzero(out.decoder_hidden_states[0]) == 0
    assert torch.equal(out.encoder_hidden_states[-1], out.encoder_last_hidden_state)
    decoder = (model.model if hasattr(model, "model") else model).decoder
    with torch.no_grad():
        torch.testing.assert_close(decoder.layernorm(out.decoder_hidden_states[-1]), out.last_hidden_state)


def test_intermediate_hidden_states_as_transformers_detr_model_gives_them(inputs):
    """With auxiliary_loss (ours defaults to it, as the paper trains) and only then."""
    model = tester.create_model(DetrCustomModel)
    out = run(model, inputs)
    assert out.intermediate_hidden_states.shape == (tester.decoder_layers, tester.batch_size, tester.num_queries,
                                                    tester.d_model)
    assert torch.equal(out.intermediate_hidden_states[-1], out.last_hidden_state)
    model.config.auxiliary_loss = False
    assert run(model, inputs).intermediate_hidden_states is None


def output_order(output_class) -> list[str]:
    return [f.name for f in dataclasses.fields(output_class)]


def test_output_fields_are_transformers_detr_fields_in_its_order():
    # DETR has no cache (transformers < 5.24 names that field past_key_values)
    detr_model_fields = [f for f in output_order(DetrModelOutput) if f not in ("cache", "past_key_values")]
    assert output_order(DetrCustomModelOutput) == detr_model_fields
    assert output_order(DetrCustomObjectDetectionOutput) == output_order(DetrObjectDetectionOutput)


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_return_dict_false_gives_the_fields_that_are_set_in_order(model_class, inputs):
    model = tester.create_model(model_class, attn_implementation="eager")
    for flags in ({}, {"output_hidden_states": True, "output_attentions": True}):
        as_dict, as_tuple = run(model, inputs, **flags), run(model, inputs, return_dict=False, **flags)
        names = [f for f in output_order(type(as_dict)) if getattr(as_dict, f) is not None]
        assert list(as_dict.keys()) == names and len(as_tuple) == len(names)
        for name, value in zip(names, as_tuple):
            expected = getattr(as_dict, name)
            same = torch.equal(value, expected) if torch.is_tensor(value) else \
                all(torch.equal(a, e) for a, e in zip(value, expected))
            assert same, name
    plain = run(model, inputs, return_dict=False)
    if model_class is DetrCustomModel:  # (last_hidden_state, encoder_last_hidden_state, intermediate_hidden_states)
        assert [t.shape[-2] for t in plain[:2]] == [tester.num_queries, tester.num_cells] and plain[2].ndim == 4
    else:  # (logits, pred_boxes, last_hidden_state, encoder_last_hidden_state)
        assert [t.shape[-1] for t in plain] == [4, 4, tester.d_model, tester.d_model]


# ----------------------------------------------------------------------------- config


def test_config_generic_names_save_and_load_through_the_attribute_map(tmp_path):
    config = tester.get_config()
    config.hidden_size, config.num_attention_heads, config.num_hidden_layers = 64, 8, 3
    assert (config.d_model, config.encoder_attention_heads, config.encoder_layers) == (64, 8, 3)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["d_model"], saved["encoder_attention_heads"], saved["encoder_layers"]) == (64, 8, 3)
    assert not {"hidden_size", "num_attention_heads", "num_hidden_layers"} & set(saved)
    loaded = DetrCustomConfig.from_pretrained(tmp_path)
    assert (loaded.hidden_size, loaded.num_attention_heads, loaded.num_hidden_layers) == (64, 8, 3)
    assert loaded.decoder_attention_heads == tester.decoder_heads  # mapped to the encoder's only, as DetrConfig
    assert DetrCustomConfig(hidden_size=48, num_attention_heads=6).d_model == 48
    assert loaded.is_encoder_decoder is True and DetrConfig.is_encoder_decoder is True


# ----------------------------------------------------------------------------- weight init


def assert_properly_initialised(model: DetrCustomForObjectDetection) -> None:
    """Finite values everywhere; the backbone's frozen BatchNorms the identity, its convolutions timm's init
    (kaiming normal, fan_out); our own modules the original's init."""
    for name, tensor in model.state_dict().items():
        assert torch.isfinite(tensor).all(), name
    for name, module in model.model.backbone.named_modules():
        if isinstance(module, FrozenBatchNorm2d):
            for buffer, value in ((module.weight, 1), (module.bias, 0), (module.running_mean, 0),
                                  (module.running_var, 1)):
                assert torch.equal(buffer, torch.full_like(buffer, value)), name
        elif isinstance(module, nn.Conv2d) and module.weight.numel() >= 512:  # enough samples for the std
            expected = (2 / (module.out_channels * module.kernel_size[0] * module.kernel_size[1])) ** 0.5
            assert 0.75 < module.weight.std().item() / expected < 1.25, name
    attn = model.model.encoder.layers[0].self_attn
    bound = (6 / sum(attn.in_proj_weight.shape)) ** 0.5  # xavier_uniform
    assert 0.8 * bound < attn.in_proj_weight.abs().max() <= bound
    assert torch.equal(model.criterion.class_weight, class_weights(model.config))


def test_meta_device_model_gets_proper_values_from_init_weights():
    with torch.device("meta"):
        model = DetrCustomForObjectDetection(tester.get_config())
    model.to_empty(device="cpu")
    model.init_weights()
    assert_properly_initialised(model)


def test_from_pretrained_without_weights_initialises_everything():
    model = DetrCustomForObjectDetection.from_pretrained(None, config=tester.get_config(), state_dict={})
    assert_properly_initialised(model)


@contextmanager
def wrapped_initialize_weights(wrap):
    """Replace `PreTrainedModel._initialize_weights` (which runs `_init_weights` on one module) by `wrap(original)`
    for the block, as transformers' `seeded_weight_init` / `skip_weight_init` test helpers do."""
    original = PreTrainedModel._initialize_weights
    PreTrainedModel._initialize_weights = wrap(original)
    try:
        yield
    finally:
        PreTrainedModel._initialize_weights = original


def seeded(original):
    def initialize(*args, **kwargs):
        set_seed(42)
        original(*args, **kwargs)
    return initialize


def skipped(original):
    return lambda *args, **kwargs: None


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_init_weights_can_init_buffers(model_class):
    """transformers' test of the same name: the buffers a model is constructed with (without `_init_weights`) are
    those `init_weights()` gives a model built on the meta device, exactly. Among them the frozen BatchNorms'
    scales, which timm zero-initialises in each residual block's last BatchNorm (for a BatchNorm that trains)."""
    config = tester.get_config()
    with wrapped_initialize_weights(skipped):
        from_init = model_class(copy.deepcopy(config))
    with torch.device("meta"):
        from_meta = model_class(copy.deepcopy(config))
    from_meta.to_empty(device="cpu")
    from_meta.init_weights()
    buffers, meta_buffers = dict(from_init.named_buffers()), dict(from_meta.named_buffers())
    assert sorted(buffers) == sorted(meta_buffers)
    assert [name for name, value in buffers.items() if not torch.equal(value, meta_buffers[name])] == []


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=lambda c: c.__name__)
def test_can_init_all_missing_weights(model_class):
    """transformers' test of the same name: with the same seed before every `_init_weights` call, a model from
    `__init__` and one from `from_pretrained` with no weights at all (every tensor initialised by `_init_weights`)
    hold the same values, none left on the meta device.

    As transformers' test exempts the weights of a timm backbone (timm draws them at construction, which the
    seeding of `_init_weights` does not reach), the random convolution weights of the timm body are compared by
    their distribution (timm's kaiming normal, fan_out) instead; every other tensor, the frozen BatchNorms' included,
    must be equal."""
    config = tester.get_config()
    with wrapped_initialize_weights(seeded):
        from_init = model_class(copy.deepcopy(config))
        from_pretrained = model_class.from_pretrained(None, config=copy.deepcopy(config), state_dict={})
    on_meta = [name for name, t in (*from_pretrained.named_parameters(), *from_pretrained.named_buffers()) if t.is_meta]
    assert on_meta == []
    state, loaded_state = from_init.state_dict(), from_pretrained.state_dict()
    assert sorted(state) == sorted(loaded_state)
    prefix = "backbone.body." if model_class is DetrCustomModel else "model.backbone.body."
    body = from_init.get_submodule(prefix.rstrip("."))
    timm_drawn = {f"{prefix}{name}.weight" for name, m in body.named_modules() if isinstance(m, nn.Conv2d)}
    assert [name for name, value in state.items()
            if name not in timm_drawn and not torch.equal(value, loaded_state[name])] == []
    for name in timm_drawn:
        weight = state[name]
        if weight.numel() >= 512:  # enough samples for the std
            expected = (2 / (weight.shape[0] * weight.shape[2] * weight.shape[3])) ** 0.5
            for value in (weight, loaded_state[name]):
                assert 0.75 < value.std().item() / expected < 1.25, name


def randomised_model() -> DetrCustomForObjectDetection:
    """A model whose every frozen-BatchNorm buffer is random, so any re-initialisation would show."""
    model = tester.create_model(DetrCustomForObjectDetection)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if ".backbone." in f".{name}":
                buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
    return model


def test_a_checkpoint_without_the_backbone_gets_a_fresh_backbone_and_the_rest_as_saved(tmp_path):
    model = randomised_model()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("model.backbone.")},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = DetrCustomForObjectDetection.from_pretrained(tmp_path)
    assert_properly_initialised(loaded)
    for name, value in loaded.state_dict().items():
        if not name.startswith("model.backbone."):
            assert torch.equal(value, model.state_dict()[name]), name


def test_a_complete_checkpoint_loads_bit_identically(tmp_path):
    model = randomised_model()
    model.save_pretrained(tmp_path)
    loaded = DetrCustomForObjectDetection.from_pretrained(tmp_path)
    assert list(loaded.state_dict()) == list(model.state_dict())
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert torch.equal(loaded.criterion.class_weight, model.criterion.class_weight)  # non-persistent


# ----------------------------------------------------------------------------- gradient checkpointing


def count_calls(modules: dict[str, nn.Module]) -> dict[str, int]:
    """Calls per module, counted on entry (a checkpointed layer's modules run again in backward, until the last
    tensor backward needs is recomputed: a module may not get to return)."""
    counts = dict.fromkeys(modules, 0)
    for name, module in modules.items():
        module.register_forward_pre_hook(lambda *_, name=name: counts.__setitem__(name, counts[name] + 1))
    return counts


def training_step(model: DetrCustomForObjectDetection, inputs: dict) -> torch.Tensor:
    model.zero_grad()
    torch.manual_seed(1)  # the same dropout masks (checkpointing replays them in the recomputation)
    loss = model(**inputs, labels=random_labels([3, 1])).loss
    loss.backward()
    return loss


def test_gradient_checkpointing_recomputes_the_layers_with_the_same_loss_and_gradients(inputs):
    plain = tester.create_model(DetrCustomForObjectDetection).train()  # dropout 0.1 everywhere, the original's
    checkpointed = tester.create_model(DetrCustomForObjectDetection).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.activation_checkpointing_enable()
    assert checkpointed.is_activation_checkpointing and checkpointed.model.backbone.gradient_checkpointing
    watched = lambda m: {"encoder layer": m.model.encoder.layers[0].self_attn,  # noqa: E731
                         "decoder layer": m.model.decoder.layers[-1].encoder_attn,
                         "backbone stage": m.model.backbone.body.layer2}
    plain_calls, checkpointed_calls = count_calls(watched(plain)), count_calls(watched(checkpointed))
    expected_loss = training_step(plain, inputs)
    loss = training_step(checkpointed, inputs)
    assert set(plain_calls.values()) == {1} and set(checkpointed_calls.values()) == {2}, checkpointed_calls
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=0)
    grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    assert grads.keys() == {n for n, p in checkpointed.named_parameters() if p.grad is not None}
    for name, param in checkpointed.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(param.grad, grads[name], atol=1e-5, rtol=0, msg=name)
    checkpointed.activation_checkpointing_disable()
    assert not checkpointed.is_activation_checkpointing and not checkpointed.model.backbone.gradient_checkpointing
    training_step(checkpointed, inputs)
    assert set(checkpointed_calls.values()) == {3}


def test_gradient_checkpointing_enable_is_the_deprecated_alias():
    model = tester.create_model(DetrCustomForObjectDetection)
    assert model.supports_gradient_checkpointing
    with pytest.warns(FutureWarning, match="activation_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    assert model.model.decoder.layers[0].gradient_checkpointing and model.model.backbone.gradient_checkpointing


# ----------------------------------------------------------------------------- attention implementations


def test_sdpa_is_the_default_and_eager_agrees_with_it(inputs):
    sdpa = tester.create_model(DetrCustomForObjectDetection, dropout=0.0, attention_dropout=0.0,
                               activation_dropout=0.0)
    eager = tester.create_model(DetrCustomForObjectDetection, attn_implementation="eager", dropout=0.0,
                                attention_dropout=0.0, activation_dropout=0.0)
    eager.load_state_dict(sdpa.state_dict())
    assert (sdpa.config._attn_implementation, eager.config._attn_implementation) == ("sdpa", "eager")
    a, b = run(sdpa, inputs), run(eager, inputs)
    for field in ("logits", "pred_boxes", "last_hidden_state", "encoder_last_hidden_state"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), atol=1e-5, rtol=0, msg=field)
    losses = [training_step(model.train(), inputs) for model in (sdpa, eager)]
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=0)
    for (name, p), q in zip(sdpa.named_parameters(), eager.parameters()):
        if p.grad is not None:  # relative to each gradient's scale: some are sums of terms in the hundreds
            scale = max(1.0, p.grad.abs().max().item())
            assert (p.grad - q.grad).abs().max() <= 1e-5 * scale, name


def test_attention_weights_with_sdpa_come_from_eager_for_that_call(inputs):
    sdpa = tester.create_model(DetrCustomForObjectDetection)
    eager = tester.create_model(DetrCustomForObjectDetection, attn_implementation="eager")
    eager.load_state_dict(sdpa.state_dict())
    with_weights, from_eager, plain = (run(sdpa, inputs, output_attentions=True),
                                       run(eager, inputs, output_attentions=True), run(sdpa, inputs))
    assert sdpa.config._attn_implementation == "sdpa"  # unchanged by the call
    for field in ("encoder_attentions", "decoder_attentions", "cross_attentions"):
        for w, e in zip(getattr(with_weights, field), getattr(from_eager, field)):
            torch.testing.assert_close(w, e, atol=1e-6, rtol=0)
    torch.testing.assert_close(with_weights.logits, plain.logits, atol=1e-5, rtol=0)
    # as in transformers: the config flag needs eager, and switching to eager makes it work
    with pytest.raises(ValueError, match="eager"):
        sdpa.config.output_attentions = True
    sdpa.set_attn_implementation("eager")
    sdpa.config.output_attentions = True
    assert len(run(sdpa, inputs).cross_attentions) == tester.decoder_layers


def test_an_attention_function_registered_with_transformers_is_used(inputs):
    calls = []

    def recording_attention(module, query, key, value, attention_mask, dropout=0.0, **kwargs):
        calls.append(tuple(query.shape))
        return eager_attention_forward(module, query, key, value, attention_mask, dropout)

    AttentionInterface.register("detr_custom_recording", recording_attention)
    model = tester.create_model(DetrCustomForObjectDetection, attn_implementation="detr_custom_recording")
    reference = tester.create_model(DetrCustomForObjectDetection)
    out, expected = run(model, inputs), run(reference, inputs)
    assert len(calls) == tester.encoder_layers + 2 * tester.decoder_layers  # self- and cross-attention
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=0)


def test_an_unsupported_attention_implementation_is_a_clear_error():
    with pytest.raises(ValueError, match="Flash Attention 2"):
        DetrCustomForObjectDetection(tester.get_config(attn_implementation="flash_attention_2"))


# ----------------------------------------------------------------------------- image processor


def test_image_processor_kwargs_class_follows_transformers_naming():
    kwargs_class = DetrCustomImageProcessor.valid_kwargs
    assert kwargs_class.__name__ == "DetrCustomImageProcessorKwargs"
    assert set(ImagesKwargs.__annotations__) | {"remove_crowd", "id2label"} <= set(kwargs_class.__annotations__)


def test_images_with_the_models_num_channels_are_taken_as_they_are():
    rgba = torch.randint(0, 256, (40, 60, 4), dtype=torch.uint8).numpy()
    processor = DetrCustomImageProcessor(do_resize=False, image_mean=[0.5, 0.4, 0.3, 0.2],
                                         image_std=[0.2, 0.25, 0.3, 0.5])
    pixel_values = processor(images=[rgba, Image.fromarray(rgba, "RGBA"), torch.from_numpy(rgba).permute(2, 0, 1)],
                             return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (3, 4, 40, 60)
    expected = (torch.from_numpy(rgba).permute(2, 0, 1) / 255 - torch.tensor([0.5, 0.4, 0.3, 0.2])[:, None, None]) \
        / torch.tensor([0.2, 0.25, 0.3, 0.5])[:, None, None]
    for image in pixel_values:  # numpy HWC, PIL RGBA and a CHW tensor: the same four channels, alpha kept
        torch.testing.assert_close(image, expected, atol=1e-5, rtol=0)
    model = tester.create_model(DetrCustomForObjectDetection, num_channels=4)
    out = run(model, processor(images=[rgba], return_tensors="pt"))
    assert out.logits.shape == (1, tester.num_queries, 4) and torch.isfinite(out.logits).all()
    # RGB stays the default: RGBA drops its alpha
    assert DetrCustomImageProcessor(do_resize=False)(images=[rgba])["pixel_values"].shape == (1, 3, 40, 60)
    with pytest.raises(ValueError, match=r"images\[0\] has 3 channels; expected 4"):
        processor(images=[rgba[..., :3]])
    with pytest.raises(ValueError, match="image_mean has 4 values and image_std 3"):
        DetrCustomImageProcessor(image_mean=[0.5] * 4)


# ----------------------------------------------------------------------------- pipeline


class Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_pipeline_loads_a_remote_code_folder_without_logging_an_error(tmp_path):
    model = tester.create_model(DetrCustomForObjectDetection)
    model.save_pretrained(tmp_path)
    DetrCustomImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(tmp_path)
    records, transformers_logger = Records(), logging.getLogger("transformers")
    transformers_logger.addHandler(records)
    try:
        detect = pipeline("object-detection", model=str(tmp_path), trust_remote_code=True)
    finally:
        transformers_logger.removeHandler(records)
    assert [r.getMessage()[:200] for r in records.records] == []
    detections = detect(Image.new("RGB", (80, 60), "white"), threshold=0.0)
    assert len(detections) == tester.num_queries
