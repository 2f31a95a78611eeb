"""DETR: End-to-End Object Detection with Transformers (Carion et al., 2020).

Reads top to bottom like the paper: a CNN backbone (timm) gives a stride-32 feature map, a
1x1 convolution projects it to `d_model`, a sine position encoding is added to queries and
keys at every attention layer, a post-norm transformer encoder-decoder turns a fixed set of
learned object queries into detections, and shared class/box heads read every decoder layer.
The set loss (Hungarian matching) lives in `loss_detr_custom.py`.

Shapes: B = batch, H x W = padded image size, h x w = feature map size (H/32 x W/32),
N = h * w, Q = num_queries, d = d_model, L = decoder layers, C = num_labels.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from timm.layers import freeze_batch_norm_2d
from timm.layers.norm_act import FrozenBatchNorm2d, FrozenBatchNormAct2d  # the classes freeze_batch_norm_2d makes
from timm.models import FeatureListNet
from timm.models.resnet import BasicBlock, Bottleneck
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.auto.modeling_auto import MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES
from transformers.utils import ModelOutput, logging

from .configuration_detr_custom import DetrCustomConfig
from .loss_detr_custom import HungarianMatcher, SetCriterion

logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------- outputs


@dataclass
class DetrCustomModelOutput(ModelOutput):
    """Output of `DetrCustomModel`: the fields of transformers' `DetrModelOutput`, in its order.

    Fields that were not asked for are None; `return_dict=False` gives the others as a tuple in this order:
    (last_hidden_state, [decoder_hidden_states], [decoder_attentions], [cross_attentions], encoder_last_hidden_state,
    [encoder_hidden_states], [encoder_attentions], [intermediate_hidden_states]). In training mode with
    `num_query_groups` G > 1, every Q below is G * Q (eval uses the first group only).

    Args:
        last_hidden_state: (B, Q, d) final decoder output, after the decoder LayerNorm.
        decoder_hidden_states: with `output_hidden_states`, L + 1 tensors (B, Q, d): the decoder input (zeros) and
            every layer's output before the decoder LayerNorm.
        decoder_attentions: with `output_attentions`, L tensors (B, heads, Q, Q) of self-attention weights
            ((B * G, heads, Q, Q) with G query groups in training: each group attends only to itself).
        cross_attentions: with `output_attentions`, L tensors (B, heads, Q, N) of weights over the feature map
            (N = h * w, row-major, 0 on padding).
        encoder_last_hidden_state: (B, N, d) encoder output ("memory").
        encoder_hidden_states: with `output_hidden_states`, encoder_layers + 1 tensors (B, N, d): the encoder input
            (the projected feature map) and every layer's output.
        encoder_attentions: with `output_attentions`, encoder_layers tensors (B, heads, N, N).
        intermediate_hidden_states: with `config.auxiliary_loss` (as transformers' DetrModel), (L, B, Q, d): every
            decoder layer's output after the shared decoder LayerNorm (the last equals `last_hidden_state`); what
            the auxiliary losses read.
    """

    last_hidden_state: Tensor | None = None
    decoder_hidden_states: tuple[Tensor, ...] | None = None
    decoder_attentions: tuple[Tensor, ...] | None = None
    cross_attentions: tuple[Tensor, ...] | None = None
    encoder_last_hidden_state: Tensor | None = None
    encoder_hidden_states: tuple[Tensor, ...] | None = None
    encoder_attentions: tuple[Tensor, ...] | None = None
    intermediate_hidden_states: Tensor | None = None


@dataclass
class DetrCustomObjectDetectionOutput(ModelOutput):
    """Output of `DetrCustomForObjectDetection`: the fields of transformers' `DetrObjectDetectionOutput`, in its order.

    `return_dict=False` gives the fields that are not None as a tuple in this order, e.g. (logits, pred_boxes,
    last_hidden_state, encoder_last_hidden_state) for a plain inference call, (loss, loss_dict, logits, ...) with
    labels.

    Args:
        loss: scalar total loss (with `labels`): 1 * CE + bbox_loss_coefficient * L1 +
            giou_loss_coefficient * GIoU, summed over the final and auxiliary layers.
        loss_dict: the unweighted terms: `loss_ce`, `loss_bbox`, `loss_giou` (final layer),
            `loss_ce_i`, ... (decoder layer i, with `auxiliary_loss`), `cardinality_error`,
            `class_error` (logged only).
        logits: (B, Q, C + 1) class logits; the last class is "no object".
        pred_boxes: (B, Q, 4) normalised (cx, cy, w, h), relative to each image's UNPADDED size.
        auxiliary_outputs: with `auxiliary_loss` and `labels`, L - 1 dicts {"logits",
            "pred_boxes"} of the earlier decoder layers, shaped as above (as in transformers:
            without labels every output field is batch-first, which the pipeline relies on).
        last_hidden_state: (B, Q, d) final decoder output after the decoder LayerNorm.
        Other fields: as in `DetrCustomModelOutput`.
    """

    loss: Tensor | None = None
    loss_dict: dict | None = None
    logits: Tensor | None = None
    pred_boxes: Tensor | None = None
    auxiliary_outputs: list[dict] | None = None
    last_hidden_state: Tensor | None = None
    decoder_hidden_states: tuple[Tensor, ...] | None = None
    decoder_attentions: tuple[Tensor, ...] | None = None
    cross_attentions: tuple[Tensor, ...] | None = None
    encoder_last_hidden_state: Tensor | None = None
    encoder_hidden_states: tuple[Tensor, ...] | None = None
    encoder_attentions: tuple[Tensor, ...] | None = None


# ----------------------------------------------------------------------------- backbone


def create_timm_backbone(config: DetrCustomConfig, pretrained: bool = False, **kwargs) -> nn.Module:
    """A timm model returning only its last feature map; never downloads unless `pretrained`."""
    stride = config.backbone_output_stride or (16 if config.dilation else None)
    extra = {"output_stride": stride} if stride else {}
    return timm.create_model(config.backbone, pretrained=pretrained, features_only=True,
                             out_indices=(-1,), in_chans=config.num_channels, **extra, **kwargs)


class FoldedBatchNormConv2d(nn.Conv2d):
    """A convolution and the frozen BatchNorm after it, computed as ONE convolution.

    conv(x, W) * s + t == conv(x, W * s) + t, with s = weight / sqrt(running_var + eps) and
    t = bias - running_mean * s per output channel: the same math as the two modules, one pass over
    the feature map instead of three. Nothing is precomputed: the convolution keeps its own weight
    (gradients reach it through the product) and the BatchNorm, now a `PassThroughBatchNorm2d` at
    its place, keeps its buffers, so the state dict is unchanged.
    """

    def forward(self, x: Tensor) -> Tensor:
        bn = self.batch_norm[0]  # in a tuple: not a submodule, its keys stay where they were
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()  # (C_out,)
        shift = bn.bias - bn.running_mean * scale
        bias = shift if self.bias is None else shift + self.bias * scale
        return self._conv_forward(x, self.weight * scale[:, None, None, None], bias)


class PassThroughBatchNorm2d(FrozenBatchNorm2d):
    """A frozen BatchNorm whose affine map the convolution before it applies: the identity here."""

    def forward(self, x: Tensor) -> Tensor:
        return x


# Parents whose forward runs a convolution straight into the BatchNorm registered after it.
_RUN_IN_ORDER = (nn.Sequential, FeatureListNet, BasicBlock, Bottleneck)


def fold_frozen_batch_norms(body: nn.Module) -> int:
    """Make every Conv2d -> FrozenBatchNorm2d pair of a timm ResNet one convolution, in place.

    Only pairs that are adjacent children of a parent known to run them in that order are folded
    (other backbones are left as they are). The Parameter and buffer objects are reused, so
    state-dict keys, `requires_grad` and anything holding them are unaffected. Returns the count.
    """
    count = 0
    for parent in body.modules():
        if not isinstance(parent, _RUN_IN_ORDER):
            continue
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if type(conv) is not nn.Conv2d or type(bn) is not FrozenBatchNorm2d or \
                    conv.out_channels != bn.weight.numel():
                continue
            folded = FoldedBatchNormConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                           conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                                           conv.padding_mode, device="meta")
            folded.weight, folded.bias = conv.weight, conv.bias
            passthrough = PassThroughBatchNorm2d(bn.weight.numel(), bn.eps)
            for name, buffer in bn.named_buffers():
                setattr(passthrough, name, buffer)
            folded.batch_norm = (passthrough,)
            setattr(parent, conv_name, folded)
            setattr(parent, bn_name, passthrough)
            count += 1
    return count


def undo_zero_init_of_frozen_batch_norms(body: nn.Module) -> int:
    """Set back to 1 the BatchNorm scales that timm's `zero_init_last` set to 0, in place; returns how many.

    timm zero-initialises the last BatchNorm of every residual block (`zero_init_last`, e.g. `bn3` of a ResNet
    Bottleneck) so that the block starts as the identity and that BatchNorm then learns its scale. It can only do
    so where the BatchNorm trains: frozen (as every BatchNorm of `DetrCustomBackbone` is), a scale of 0 stays 0,
    with no gradient to the branch before it, and the residual branch is dead for good. So every BatchNorm about
    to be frozen gets PyTorch's BatchNorm init (scale 1) instead, what `_init_weights` gives a backbone missing
    from a checkpoint. Only scales that are exactly 0 inside a block with a `zero_init_last` method are touched (a
    fresh BatchNorm's scale is 1, pretrained ones are loaded after construction); no random number is drawn, so
    every other value of a model built under a seed is unchanged. Tensors on the meta device are left to
    `_init_weights`.
    """
    count = 0
    for block in body.modules():
        if not callable(getattr(block, "zero_init_last", None)):
            continue
        for norm in block.modules():
            weight = getattr(norm, "weight", None)
            if isinstance(norm, nn.modules.batchnorm._BatchNorm) and weight is not None and not weight.is_meta \
                    and weight.numel() and not bool(weight.any()):
                with torch.no_grad():
                    weight.fill_(1.0)
                count += 1
    return count


class DetrCustomBackbone(nn.Module):
    """timm CNN with every BatchNorm frozen (statistics and affine as buffers).

    A random backbone is timm's init except for the residual blocks' last BatchNorm, which timm zero-initialises
    for a BatchNorm that trains: frozen here, it starts at scale 1 (`undo_zero_init_of_frozen_batch_norms`), so
    that every residual branch trains, as `_init_weights` initialises it.

    With `freeze_backbone_stem`, the stem and first stage get no gradient, as in the original.

    Two speed settings change only float rounding (same math, same state dict), on by default:
    `backbone_fold_batch_norm` applies each frozen BatchNorm through the convolution before it
    (`fold_frozen_batch_norms`), `backbone_channels_last` feeds the images in channels-last memory
    format (faster oneDNN and cuDNN kernels). Measured in benchmarks/bench_model.py.

    Gradient checkpointing (`model.activation_checkpointing_enable()`) reaches the body through timm's own
    `set_grad_checkpointing`, where timm's feature wrapper has one (ResNets' FeatureListNet does): timm then
    checkpoints each of its modules but the first, the last (layer4) and in-place ones, non-reentrant, whatever
    `activation_checkpointing_kwargs` say.
    """

    def __init__(self, config: DetrCustomConfig):
        super().__init__()
        body = create_timm_backbone(config)
        self.first_stage = body.feature_info.info[1]["module"].replace(".", "_")
        undo_zero_init_of_frozen_batch_norms(body)  # every BatchNorm is frozen on the next line
        self.body = freeze_batch_norm_2d(body)
        self.num_channels = body.feature_info.channels()[-1]
        self.channels_last = config.backbone_channels_last
        if config.backbone_fold_batch_norm:
            fold_frozen_batch_norms(self.body)
        if config.freeze_backbone_stem:
            self.freeze_stem()
        self.mark_timm_init()

    def mark_timm_init(self) -> None:
        """Mark the body's tensors `_is_hf_initialized`, as transformers marks loaded ones (not on the meta device).

        timm has initialised them (random backbones equal timm's own); the mark keeps `post_init` from
        initialising them again. A model built on the meta device (`from_pretrained` builds it there) gets no mark,
        so `_init_weights` gives whatever the checkpoint lacks a proper value.
        """
        for tensor in (*self.body.parameters(), *self.body.buffers()):
            if not tensor.is_meta:
                tensor._is_hf_initialized = True

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether timm checkpoints the body's stages (set by `model.activation_checkpointing_enable()`)."""
        return bool(getattr(self.body, "grad_checkpointing", False))

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        if hasattr(self.body, "set_grad_checkpointing"):
            self.body.set_grad_checkpointing(enable)

    def freeze_stem(self) -> None:
        """Stop gradients to every module up to and including the first stage."""
        names = [name for name, _ in self.body.named_children()]
        if self.first_stage not in names:
            logger.warning(f"cannot find the first stage {self.first_stage!r} in {names}; nothing frozen")
            return
        for name, child in self.body.named_children():
            child.requires_grad_(False)
            if name == self.first_stage:
                break

    def forward(self, pixel_values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """pixel_values: (B, num_channels, H, W); mask: (B, H, W) bool, True on padding.

        Returns the feature map (B, C_backbone, h, w) and the mask resized to it with nearest
        interpolation, (B, h, w) bool.
        """
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        features = self.body(pixel_values)[-1]
        mask = F.interpolate(mask[None].float(), size=features.shape[-2:]).to(torch.bool)[0]
        return features, mask


# ----------------------------------------------------------------------------- positions


class DetrCustomSinePositionEmbedding(nn.Module):
    """The original sine encoding, always computed in float32.

    Positions are the cumulative count of unpadded cells divided by the image's own extent, so
    every image's valid area spans [0, 2*pi] whatever the padding.
    """

    def __init__(self, num_position_features: int = 128, temperature: float = 10000.0):
        super().__init__()
        self.num_position_features = num_position_features
        self.temperature = temperature
        self.scale = 2 * math.pi

    def forward(self, mask: Tensor) -> Tensor:
        """mask: (B, h, w) bool, True on padding -> (B, 2 * num_position_features, h, w) float32."""
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        eps = 1e-6
        y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
        x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        n = self.num_position_features
        dim_t = torch.arange(n, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / n)
        pos_x = x_embed[..., None] / dim_t  # (B, h, w, n)
        pos_y = y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class DetrCustomLearnedPositionEmbedding(nn.Module):
    """Learned absolute row/column embeddings for feature maps up to 50 x 50 (the original's option)."""

    def __init__(self, num_position_features: int = 128, max_size: int = 50):
        super().__init__()
        self.row_embeddings = nn.Embedding(max_size, num_position_features)
        self.column_embeddings = nn.Embedding(max_size, num_position_features)

    def forward(self, mask: Tensor) -> Tensor:
        """mask: (B, h, w) -> (B, 2 * num_position_features, h, w); padding is ignored."""
        (batch, h, w), device = mask.shape, mask.device
        x_emb = self.column_embeddings(torch.arange(w, device=device))  # (w, n)
        y_emb = self.row_embeddings(torch.arange(h, device=device))  # (h, n)
        pos = torch.cat([x_emb[None].expand(h, w, -1), y_emb[:, None].expand(h, w, -1)], dim=-1)
        return pos.permute(2, 0, 1)[None].expand(batch, -1, -1, -1).float()


# ----------------------------------------------------------------------------- transformer


def eager_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                            attention_mask: Tensor | None, dropout: float = 0.0, **kwargs) -> tuple[Tensor, Tensor]:
    """Explicit softmax attention (`attn_implementation="eager"`), the one implementation that returns the weights.

    Args:
        query: (B, heads, Lq, d / heads); key, value: (B, heads, Lk, d / heads).
        attention_mask: (B, 1, 1, Lk) bool, True = attend; None attends everywhere.
        dropout: dropout probability on the weights (0 in eval mode).
    Returns:
        The output (B, Lq, heads, d / heads), the layout of transformers' attention functions, and the weights
        (B, heads, Lq, Lk).
    """
    scores = (query @ key.transpose(-2, -1)) / math.sqrt(query.shape[-1])
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    weights = scores.softmax(-1)
    return (F.dropout(weights, dropout) @ value).transpose(1, 2), weights


def sdpa_attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                           attention_mask: Tensor | None, dropout: float = 0.0, **kwargs) -> tuple[Tensor, None]:
    """`scaled_dot_product_attention` (`attn_implementation="sdpa"`, the default); shapes as `eager_attention_forward`,
    no weights. Ours, not transformers' SDPA function: that one breaks the ONNX export with dynamic axes
    (scripts/export_onnx.py)."""
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout)
    return out.transpose(1, 2), None


ATTENTION_FUNCTIONS = {"eager": eager_attention_forward, "sdpa": sdpa_attention_forward}


class DetrCustomAttention(nn.Module):
    """Multi-head attention by `config._attn_implementation`, the transformers-5 way.

    "sdpa" (the default) runs `scaled_dot_product_attention`, "eager" the explicit softmax, any other name a
    function registered with transformers' `AttentionInterface` (called with the same arguments and bool mask).
    A call that asks for the weights runs in eager whatever the implementation, since SDPA cannot return them.
    Parameters use nn.MultiheadAttention's layout (in_proj_weight (3d, d) = [W_q; W_k; W_v]), the original's, so
    its checkpoints load as they are. When query and key are the same tensor (self-attention: q = k = x + pos)
    both projections are one matmul.
    """

    def __init__(self, config: DetrCustomConfig, num_heads: int):
        super().__init__()
        self.config = config
        self.d_model, self.num_heads, self.dropout = config.d_model, num_heads, config.attention_dropout
        self.is_causal = False  # read by transformers' attention functions: DETR never masks causally
        self.in_proj_weight = nn.Parameter(torch.empty(3 * self.d_model, self.d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * self.d_model))
        self.out_proj = nn.Linear(self.d_model, self.d_model)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """query: (B, Lq, d); key, value: (B, Lk, d); attn_mask: (B, 1, 1, Lk) bool, True = attend.

        Returns the output (B, Lq, d) and the weights (B, heads, Lq, Lk) from eager, which every call with
        `need_weights` runs, or None from SDPA.
        """
        d, w, b = self.d_model, self.in_proj_weight, self.in_proj_bias
        if query is key:
            q, k = F.linear(query, w[: 2 * d], b[: 2 * d]).chunk(2, dim=-1)
        else:
            q, k = F.linear(query, w[:d], b[:d]), F.linear(key, w[d: 2 * d], b[d: 2 * d])
        v = F.linear(value, w[2 * d:], b[2 * d:])
        q, k, v = (x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for x in (q, k, v))  # (B, heads, L, d/heads)
        implementation = "eager" if need_weights else self.config._attn_implementation
        attention = ATTENTION_FUNCTIONS.get(implementation) or \
            ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        out, weights = attention(self, q, k, v, attn_mask, dropout=self.dropout if self.training else 0.0)
        return self.out_proj(out.flatten(2)), weights


class DetrCustomFeedForward(nn.Module):
    """Linear -> activation -> dropout -> Linear."""

    def __init__(self, d_model: int, ffn_dim: int, activation: str, activation_dropout: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_model, ffn_dim), nn.Linear(ffn_dim, d_model)
        self.activation = F.relu if activation == "relu" else F.gelu
        self.activation_dropout = nn.Dropout(activation_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation_dropout(self.activation(self.fc1(x))))


class DetrCustomEncoderLayer(GradientCheckpointingLayer):
    """Post-norm encoder layer; positions are added to queries and keys only.

    A GradientCheckpointingLayer: with gradient checkpointing on, training recomputes it in the backward pass
    (tensors are passed positionally, so they are the checkpoint's inputs).
    """

    def __init__(self, config: DetrCustomConfig):
        super().__init__()
        d = config.d_model
        self.self_attn = DetrCustomAttention(config, config.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.mlp = DetrCustomFeedForward(d, config.encoder_ffn_dim, config.activation_function,
                                         config.activation_dropout)
        self.final_layer_norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, src: Tensor, pos: Tensor, attn_mask: Tensor,
                need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """src, pos: (B, N, d); attn_mask: (B, 1, 1, N) bool, True on real pixels."""
        q = k = src + pos
        attended, weights = self.self_attn(q, k, src, attn_mask, need_weights)
        src = self.self_attn_layer_norm(src + self.dropout(attended))
        src = self.final_layer_norm(src + self.dropout(self.mlp(src)))
        return src, weights


class DetrCustomDecoderLayer(GradientCheckpointingLayer):
    """Post-norm decoder layer: self-attention between queries, cross-attention to the image (checkpointed like
    the encoder layer)."""

    def __init__(self, config: DetrCustomConfig):
        super().__init__()
        d, heads = config.d_model, config.decoder_attention_heads
        self.self_attn = DetrCustomAttention(config, heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.encoder_attn = DetrCustomAttention(config, heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.mlp = DetrCustomFeedForward(d, config.decoder_ffn_dim, config.activation_function,
                                         config.activation_dropout)
        self.final_layer_norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, tgt: Tensor, query_pos: Tensor, memory: Tensor, pos: Tensor, attn_mask: Tensor,
                need_weights: bool = False, num_groups: int = 1) -> tuple[Tensor, tuple]:
        """tgt, query_pos: (B, G * Q, d), G query groups of Q; memory, pos: (B, N, d); attn_mask: (B, 1, 1, N) bool.

        Self-attention stays within each group (Group DETR); cross-attention and the FFN see every query.
        """
        attended, self_weights = self.self_attn_within_groups(tgt, tgt + query_pos, num_groups, need_weights)
        tgt = self.self_attn_layer_norm(tgt + self.dropout(attended))
        attended, cross_weights = self.encoder_attn(tgt + query_pos, memory + pos, memory, attn_mask,
                                                    need_weights)
        tgt = self.encoder_attn_layer_norm(tgt + self.dropout(attended))
        tgt = self.final_layer_norm(tgt + self.dropout(self.mlp(tgt)))
        return tgt, (self_weights, cross_weights)

    def self_attn_within_groups(self, tgt: Tensor, q: Tensor, num_groups: int,
                                need_weights: bool) -> tuple[Tensor, Tensor | None]:
        """tgt (values), q (= keys): (B, G * Q, d) -> (B, G * Q, d) and weights (B * G, heads, Q, Q).

        Masking attention between groups equals attending in G separate batches: the groups are folded
        into the batch, G times less work than a block-diagonal mask over G * Q queries.
        """
        if num_groups == 1:
            return self.self_attn(q, q, tgt, None, need_weights)
        tgt, q = (x.unflatten(1, (num_groups, -1)).flatten(0, 1) for x in (tgt, q))  # (B * G, Q, d)
        attended, weights = self.self_attn(q, q, tgt, None, need_weights)
        return attended.unflatten(0, (-1, num_groups)).flatten(1, 2), weights


class DetrCustomEncoder(nn.Module):
    def __init__(self, config: DetrCustomConfig):
        super().__init__()
        self.layers = nn.ModuleList(DetrCustomEncoderLayer(config) for _ in range(config.encoder_layers))

    def forward(self, src: Tensor, pos: Tensor, attn_mask: Tensor, output_hidden_states: bool = False,
                output_attentions: bool = False) -> tuple[Tensor, tuple | None, tuple | None]:
        """src, pos: (B, N, d) -> memory (B, N, d), hidden states, attention weights."""
        states, attentions = (src,) if output_hidden_states else None, () if output_attentions else None
        for layer in self.layers:
            src, weights = layer(src, pos, attn_mask, output_attentions)
            states = states + (src,) if output_hidden_states else None
            attentions = attentions + (weights,) if output_attentions else None
        return src, states, attentions


class DetrCustomDecoder(nn.Module):
    """Decoder layers plus one shared LayerNorm.

    The norm is applied to a copy of every layer's output, for the heads; the running state
    that feeds the next layer is never normalised (transformers 5.23 departs from this with
    `auxiliary_loss=True`).
    """

    def __init__(self, config: DetrCustomConfig):
        super().__init__()
        self.layers = nn.ModuleList(DetrCustomDecoderLayer(config) for _ in range(config.decoder_layers))
        self.layernorm = nn.LayerNorm(config.d_model)

    def forward(self, query_pos: Tensor, memory: Tensor, pos: Tensor, attn_mask: Tensor,
                output_hidden_states: bool = False, output_attentions: bool = False, num_groups: int = 1) -> tuple:
        """query_pos: (B, G * Q, d), G groups of Q object queries; memory, pos: (B, N, d).

        Returns (L, B, G * Q, d) normalised outputs of every layer, hidden states, self- and
        cross-attention weights.
        """
        tgt = torch.zeros_like(query_pos)
        normed, states = [], (tgt,) if output_hidden_states else None
        self_attns, cross_attns = ((), ()) if output_attentions else (None, None)
        for layer in self.layers:
            tgt, (self_w, cross_w) = layer(tgt, query_pos, memory, pos, attn_mask, output_attentions, num_groups)
            normed.append(self.layernorm(tgt))
            states = states + (tgt,) if output_hidden_states else None
            if output_attentions:
                self_attns, cross_attns = self_attns + (self_w,), cross_attns + (cross_w,)
        return torch.stack(normed), states, self_attns, cross_attns


# ----------------------------------------------------------------------------- models


class DetrCustomPreTrainedModel(PreTrainedModel):
    config_class = DetrCustomConfig
    config: DetrCustomConfig
    base_model_prefix = "model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["DetrCustomEncoderLayer", "DetrCustomDecoderLayer"]
    # a Group DETR checkpoint (num_query_groups K > 1) loaded with K = 1 drops groups 2..K, by design
    _keys_to_ignore_on_load_unexpected = [r"extra_query_position_embeddings"]
    supports_gradient_checkpointing = True
    _supports_sdpa = True  # the default; "eager" on request (attn_implementation="eager")

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """The original's init for our modules, a fresh timm-style init for the backbone's.

        xavier_uniform on every transformer weight of dim > 1; the input projection, query
        embeddings and heads keep PyTorch's defaults. Backbone convolutions get timm's ResNet init
        (kaiming normal, fan_out, ReLU gain; biases 0) and frozen BatchNorms the identity (weight 1,
        bias 0, running_mean 0, running_var 1). Every value goes through `transformers.initialization`,
        which skips tensors marked `_is_hf_initialized`: loaded ones, and those timm initialised at
        construction (`DetrCustomBackbone.mark_timm_init`). Dispatches on the modules that hold the
        parameters: transformers skips custom-code modules without parameters of their own, so
        a head re-created for a new label set is initialised here too.
        """
        gain = self.config.init_xavier_std
        kind = self._init_kinds().get(id(module))
        if isinstance(module, DetrCustomAttention):
            init.xavier_uniform_(module.in_proj_weight, gain=gain)
            init.zeros_(module.in_proj_bias)
            init.xavier_uniform_(module.out_proj.weight, gain=gain)
            init.zeros_(module.out_proj.bias)
        elif isinstance(module, SetCriterion):
            init.copy_(module.class_weight, class_weights(self.config))
        elif kind == "backbone_conv":
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif kind == "frozen_batch_norm":
            # through the buffers themselves: a folded convolution reads these same buffers
            for buffer, value in ((module.weight, 1.0), (module.bias, 0.0), (module.running_mean, 0.0),
                                  (module.running_var, 1.0)):
                init.constant_(buffer, value)
        elif kind == "learned_position":
            init.uniform_(module.weight)
        elif kind is not None:
            module.reset_parameters()  # PyTorch's default init of Linear / Conv2d / Embedding / LayerNorm
            if kind == "xavier":
                init.xavier_uniform_(module.weight, gain=gain)

    def _init_kinds(self) -> dict[int, str]:
        """id(module) -> how to initialise it, for every leaf module that holds tensors, attention excepted."""
        if "_init_kinds_cache" not in self.__dict__:
            backbone = {id(m) for m in self.modules() if isinstance(m, DetrCustomBackbone) for m in m.modules()}
            kinds = {}
            for m in self.modules():
                if id(m) in backbone and isinstance(m, nn.Conv2d):
                    kinds[id(m)] = "backbone_conv"
                elif id(m) in backbone and isinstance(m, (FrozenBatchNorm2d, FrozenBatchNormAct2d)):
                    kinds[id(m)] = "frozen_batch_norm"
                elif id(m) not in backbone and isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding, nn.LayerNorm)):
                    kinds[id(m)] = "default"
            for m in self.modules():
                if isinstance(m, DetrCustomFeedForward) and self.config.ffn_init == "xavier":
                    kinds[id(m.fc1)] = kinds[id(m.fc2)] = "xavier"
                elif isinstance(m, DetrCustomLearnedPositionEmbedding):
                    kinds[id(m.row_embeddings)] = kinds[id(m.column_embeddings)] = "learned_position"
                elif isinstance(m, DetrCustomAttention):
                    kinds.pop(id(m.out_proj), None)  # initialised with its attention module
            self.__dict__["_init_kinds_cache"] = kinds
        return self.__dict__["_init_kinds_cache"]

    def _output_flags(self, output_hidden_states: bool | None, output_attentions: bool | None,
                      return_dict: bool | None) -> tuple[bool, bool, bool]:
        """The call's output flags; None takes the config's (`config.output_hidden_states`, ...), as in transformers."""
        config = self.config
        pick = lambda value, default: bool(default if value is None else value)  # noqa: E731
        return (pick(output_hidden_states, config.output_hidden_states),
                pick(output_attentions, config.output_attentions), pick(return_dict, config.return_dict))


def class_weights(config: DetrCustomConfig) -> Tensor:
    """(C + 1,) cross-entropy class weights: 1, and `eos_coefficient` for "no object"."""
    weight = torch.ones(config.num_labels + 1)
    weight[-1] = config.eos_coefficient
    return weight


class DetrCustomModel(DetrCustomPreTrainedModel):
    """Backbone + positions + transformer; returns the decoder's hidden states."""

    def __init__(self, config: DetrCustomConfig):
        super().__init__(config)
        self.backbone = DetrCustomBackbone(config)
        self.input_projection = nn.Conv2d(self.backbone.num_channels, config.d_model, kernel_size=1)
        position = (DetrCustomSinePositionEmbedding if config.position_embedding_type == "sine"
                    else DetrCustomLearnedPositionEmbedding)
        self.position_embedding = position(config.d_model // 2)
        self.query_position_embeddings = nn.Embedding(config.num_queries, config.d_model)
        # Group DETR: groups 2..K, used in training only (None for the paper's K = 1)
        extra = (config.num_query_groups - 1) * config.num_queries
        self.extra_query_position_embeddings = nn.Embedding(extra, config.d_model) if extra else None
        self.encoder = DetrCustomEncoder(config)
        self.decoder = DetrCustomDecoder(config)
        self.post_init()

    def load_pretrained_backbone(self, checkpoint: str | os.PathLike | None = None) -> None:
        """Load ImageNet weights into the backbone, explicitly (construction never downloads).

        Args:
            checkpoint: None to fetch the timm weights of `config.backbone` from the Hub, or a
                local file (.safetensors / .pth / .bin) with a timm state dict of that model.
        """
        overlay = {}
        if checkpoint is not None:
            if not os.path.isfile(checkpoint):
                raise FileNotFoundError(f"backbone checkpoint {str(checkpoint)!r} is not a file")
            overlay = {"pretrained_cfg_overlay": {"file": os.fspath(checkpoint)}}
        source = create_timm_backbone(self.config, pretrained=True, **overlay)
        self.backbone.body.load_state_dict(source.state_dict())

    def object_queries(self) -> Tensor:
        """(G * Q, d) object queries: the first group, and in training mode groups 2..K too."""
        queries = self.query_position_embeddings.weight
        if self.training and self.extra_query_position_embeddings is not None:
            queries = torch.cat([queries, self.extra_query_position_embeddings.weight])
        return queries

    def _check_inputs(self, pixel_values: Tensor, pixel_mask: Tensor | None) -> None:
        channels = self.config.num_channels
        if pixel_values.ndim != 4 or pixel_values.shape[1] != channels:
            raise ValueError(f"pixel_values must be (batch, {channels}, height, width); got "
                             f"{tuple(pixel_values.shape)}")
        if pixel_mask is not None and pixel_mask.shape != (pixel_values.shape[0], *pixel_values.shape[2:]):
            raise ValueError(f"pixel_mask must be (batch, height, width) = "
                             f"{(pixel_values.shape[0], *pixel_values.shape[2:])} like pixel_values; "
                             f"got {tuple(pixel_mask.shape)}")

    def forward(self, pixel_values: Tensor, pixel_mask: Tensor | None = None,
                output_hidden_states: bool | None = None, output_attentions: bool | None = None,
                return_dict: bool | None = None, **kwargs) -> DetrCustomModelOutput | tuple:
        """
        Args:
            pixel_values: (B, num_channels, H, W) normalised images, zero-padded bottom/right.
            pixel_mask: (B, H, W), 1 on real pixels and 0 on padding; None = no padding.
            output_hidden_states, output_attentions, return_dict: None takes the config's value
                (`config.output_hidden_states`, `config.output_attentions`, `config.return_dict`).
                Attention weights come from the eager implementation, which such a call uses.

        Returns:
            `DetrCustomModelOutput`, or with `return_dict=False` its fields that are not None as a tuple.
        """
        output_hidden_states, output_attentions, return_dict = self._output_flags(
            output_hidden_states, output_attentions, return_dict)
        self._check_inputs(pixel_values, pixel_mask)
        if pixel_mask is None:
            padding = pixel_values.new_zeros(pixel_values.shape[0], *pixel_values.shape[2:], dtype=torch.bool)
        else:
            padding = pixel_mask == 0
        features, mask = self.backbone(pixel_values, padding)
        src = self.input_projection(features).flatten(2).transpose(1, 2)  # (B, N, d)
        pos = self.position_embedding(mask).to(src.dtype).flatten(2).transpose(1, 2)  # (B, N, d)
        attn_mask = ~mask.flatten(1)[:, None, None, :]  # (B, 1, 1, N), True = attend
        memory, enc_states, enc_attns = self.encoder(src, pos, attn_mask, output_hidden_states, output_attentions)
        queries = self.object_queries()
        query_pos = queries[None].expand(src.shape[0], -1, -1)  # (B, G * Q, d)
        normed, dec_states, self_attns, cross_attns = self.decoder(
            query_pos, memory, pos, attn_mask, output_hidden_states, output_attentions,
            num_groups=queries.shape[0] // self.config.num_queries)
        output = DetrCustomModelOutput(
            last_hidden_state=normed[-1], decoder_hidden_states=dec_states, decoder_attentions=self_attns,
            cross_attentions=cross_attns, encoder_last_hidden_state=memory, encoder_hidden_states=enc_states,
            encoder_attentions=enc_attns, intermediate_hidden_states=normed if self.config.auxiliary_loss else None)
        return output if return_dict else output.to_tuple()


class DetrCustomMLP(nn.Module):
    """Box head: `num_layers` Linear layers with ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


class DetrCustomForObjectDetection(DetrCustomPreTrainedModel):
    """DETR: the base model plus class and box heads shared by every decoder layer, and the set loss."""

    def __init__(self, config: DetrCustomConfig):
        super().__init__(config)
        self.model = DetrCustomModel(config)
        self.class_labels_classifier = nn.Linear(config.d_model, config.num_labels + 1)
        self.bbox_predictor = DetrCustomMLP(config.d_model, config.d_model, 4, num_layers=3)
        matcher = HungarianMatcher(config.class_cost, config.bbox_cost, config.giou_cost)
        self.criterion = SetCriterion(config.num_labels, matcher, config.eos_coefficient,
                                      config.bbox_loss_coefficient, config.giou_loss_coefficient)
        self.post_init()

    def load_pretrained_backbone(self, checkpoint: str | os.PathLike | None = None) -> None:
        """See `DetrCustomModel.load_pretrained_backbone`."""
        self.model.load_pretrained_backbone(checkpoint)

    def forward(self, pixel_values: Tensor, pixel_mask: Tensor | None = None,
                labels: list[dict] | None = None, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> DetrCustomObjectDetectionOutput | tuple:
        """
        Args:
            pixel_values: (B, num_channels, H, W) normalised images, zero-padded bottom/right.
            pixel_mask: (B, H, W), 1 on real pixels and 0 on padding; None = no padding.
            labels: B dicts with `class_labels` (n,) int64 in [0, num_labels) and `boxes`
                (n, 4) normalised (cx, cy, w, h) relative to the image's UNPADDED size.
            output_hidden_states, output_attentions, return_dict: as in `DetrCustomModel.forward`.

        Returns:
            `DetrCustomObjectDetectionOutput`, or with `return_dict=False` its fields that are not None as a tuple.
        """
        output_hidden_states, output_attentions, return_dict = self._output_flags(
            output_hidden_states, output_attentions, return_dict)
        outputs = self.model(pixel_values, pixel_mask, output_hidden_states, output_attentions, return_dict=True)
        with_aux = self.config.auxiliary_loss and labels is not None
        hidden = outputs.intermediate_hidden_states if with_aux else outputs.last_hidden_state[None]
        logits = self.class_labels_classifier(hidden)  # (L or 1, B, Q, C + 1)
        pred_boxes = self.bbox_predictor(hidden).sigmoid()  # (L or 1, B, Q, 4)
        loss = loss_dict = None
        if labels is not None:
            num_groups = logits.shape[2] // self.config.num_queries
            loss, loss_dict = self.criterion(logits, pred_boxes, labels, num_groups)
        auxiliary_outputs = None
        if with_aux:
            auxiliary_outputs = [{"logits": lo, "pred_boxes": bo} for lo, bo in zip(logits[:-1], pred_boxes[:-1])]
        output = DetrCustomObjectDetectionOutput(
            loss=loss, loss_dict=loss_dict, logits=logits[-1], pred_boxes=pred_boxes[-1],
            auxiliary_outputs=auxiliary_outputs, last_hidden_state=outputs.last_hidden_state,
            decoder_hidden_states=outputs.decoder_hidden_states, decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions, encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states, encoder_attentions=outputs.encoder_attentions)
        return output if return_dict else output.to_tuple()


DetrCustomModel.register_for_auto_class("AutoModel")
DetrCustomForObjectDetection.register_for_auto_class("AutoModelForObjectDetection")
# pipeline("object-detection") checks the model's class name against this table of names only (not against
# the classes registered with AutoModelForObjectDetection) and logs an error listing every detector otherwise.
# Importing this file, as remote code or from the installed package, lists ours under its model type.
MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES.setdefault(DetrCustomConfig.model_type, DetrCustomForObjectDetection.__name__)

__all__ = ["DetrCustomModel", "DetrCustomForObjectDetection", "DetrCustomPreTrainedModel",
           "DetrCustomModelOutput", "DetrCustomObjectDetectionOutput"]
