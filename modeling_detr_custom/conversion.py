"""Convert published DETR checkpoints to detr-custom (not shipped as remote code).

Sources:
- a transformers `DetrForObjectDetection` folder, with v5 or v4 key names (the layout of
  facebook/detr-resnet-50 on the Hub), timm backbone;
- an original facebookresearch/detr checkpoint, a `.pth` holding `{"model": state_dict}`.

Every key is accounted for: a key of the source that maps nowhere, or a key of our model that
nothing fills, is an error listing them. The converted model is then checked against
transformers' DETR (with `auxiliary_loss=False`, where it matches the original) on a random
padded batch, and nothing is written unless they agree.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from .configuration_detr_custom import DetrCustomConfig
from .modeling_detr_custom import DetrCustomForObjectDetection

# Renames applied in order; each is (pattern, replacement) on the full key.
V4_TO_V5 = [
    (r"^model\.backbone\.conv_encoder\.model\.", "model.backbone.model."),
    (r"\.(fc1|fc2)\.", r".mlp.\1."),
    (r"_attn\.out_proj\.", "_attn.o_proj."),
]
ORIGINAL_TO_V5 = [
    (r"^backbone\.0\.body\.", "model.backbone.model."),
    (r"^backbone\.1\.row_embed\.", "model.position_embedding.row_embeddings."),
    (r"^backbone\.1\.col_embed\.", "model.position_embedding.column_embeddings."),
    (r"^input_proj\.", "model.input_projection."),
    (r"^query_embed\.", "model.query_position_embeddings."),
    (r"^transformer\.decoder\.norm\.", "model.decoder.layernorm."),
    (r"^transformer\.(encoder|decoder)\.layers\.", r"model.\1.layers."),
    (r"\.multihead_attn\.", ".encoder_attn."),
    (r"_attn\.out_proj\.", "_attn.o_proj."),
    (r"\.linear(1|2)\.", r".mlp.fc\1."),
    (r"(encoder\.layers\.\d+)\.norm1\.", r"\1.self_attn_layer_norm."),
    (r"(encoder\.layers\.\d+)\.norm2\.", r"\1.final_layer_norm."),
    (r"(decoder\.layers\.\d+)\.norm1\.", r"\1.self_attn_layer_norm."),
    (r"(decoder\.layers\.\d+)\.norm2\.", r"\1.encoder_attn_layer_norm."),
    (r"(decoder\.layers\.\d+)\.norm3\.", r"\1.final_layer_norm."),
    (r"^class_embed\.", "class_labels_classifier."),
    (r"^bbox_embed\.", "bbox_predictor."),
]
IGNORED = re.compile(r"num_batches_tracked$")


def rename(state_dict: dict[str, Tensor], rules: list[tuple[str, str]]) -> dict[str, Tensor]:
    """Apply regex renames to every key, dropping BatchNorm counters."""
    renamed = {}
    for key, value in state_dict.items():
        if IGNORED.search(key):
            continue
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    return renamed


def split_in_proj(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Original nn.MultiheadAttention `in_proj_{weight,bias}` (3d, ...) -> v5 q/k/v_proj."""
    out = {}
    for key, value in state_dict.items():
        match = re.match(r"(.*)\.in_proj_(weight|bias)$", key)
        if not match:
            out[key] = value
            continue
        for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
            out[f"{match[1]}.{name}.{match[2]}"] = part
    return out


def v5_to_ours(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers v5 DETR keys -> detr-custom keys (q/k/v projections fused into in_proj)."""
    out, pending = {}, {}
    for key, value in state_dict.items():
        key = re.sub(r"^model\.backbone\.model\.", "model.backbone.body.", key)
        key = key.replace("_attn.o_proj.", "_attn.out_proj.")
        match = re.match(r"(.*_attn)\.(q|k|v)_proj\.(weight|bias)$", key)
        if match:
            pending.setdefault((match[1], match[3]), {})[match[2]] = value
        else:
            out[key] = value
    for (prefix, kind), parts in pending.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{prefix}: need q, k and v projections ({kind}); got {sorted(parts)}")
        out[f"{prefix}.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def check_keys(converted: dict[str, Tensor], model: torch.nn.Module) -> None:
    """Raise ValueError listing every missing or unexpected key and every shape mismatch."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    shapes = [f"{k}: {tuple(converted[k].shape)} vs {tuple(expected[k].shape)}"
              for k in set(expected) & set(converted) if converted[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"checkpoint does not fit the model.\nmissing keys ({len(missing)}): {missing}\n"
                         f"unexpected keys ({len(unexpected)}): {unexpected}\nshape mismatches: {shapes}")


# ----------------------------------------------------------------------------- configs

COCO_NAMES = [
    "N/A", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack",
    "umbrella", "N/A", "N/A", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A",
    "toilet", "N/A", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave",
    "oven", "toaster", "sink", "refrigerator", "N/A", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
]  # COCO 2017 names by raw category id (0..90), as the original DETR uses them

ARCHITECTURE_FIELDS = (
    "num_queries", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
    "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "activation_function",
    "position_embedding_type", "dilation", "class_cost", "bbox_cost", "giou_cost",
    "bbox_loss_coefficient", "giou_loss_coefficient", "eos_coefficient", "num_channels",
)


def config_from_hf(hf_config: dict) -> DetrCustomConfig:
    """Our config from a transformers DETR `config.json` (v4 or v5).

    Architecture, matching and loss fields are copied; dropouts keep the original DETR's
    values (the published weights were trained with them).
    """
    backbone_config = hf_config.get("backbone_config") or {}
    if hf_config.get("use_timm_backbone") is False or backbone_config.get("model_type") not in (None, "timm_backbone"):
        raise ValueError("only DETR checkpoints with a timm backbone (use_timm_backbone=True, e.g. "
                         f"facebook/detr-resnet-50) are supported; got backbone_config {backbone_config}")
    kwargs = {k: hf_config[k] for k in ARCHITECTURE_FIELDS if k in hf_config}
    kwargs["backbone"] = backbone_config.get("backbone") or hf_config.get("backbone") or "resnet50"
    id2label = hf_config.get("id2label")
    if id2label:
        kwargs["id2label"] = {int(k): v for k, v in id2label.items()}
    return DetrCustomConfig(**kwargs)


def config_from_original(state_dict: dict[str, Tensor], backbone: str = "resnet50", dilation: bool = False,
                         num_heads: int = 8) -> DetrCustomConfig:
    """Our config from the shapes of an original checkpoint (heads cannot be read from them)."""
    num_queries, d_model = state_dict["query_embed.weight"].shape
    layers = {part: len({k.split(".")[3] for k in state_dict if k.startswith(f"transformer.{part}.layers.")})
              for part in ("encoder", "decoder")}
    num_labels = state_dict["class_embed.weight"].shape[0] - 1
    id2label = dict(enumerate(COCO_NAMES)) if num_labels == len(COCO_NAMES) else None
    return DetrCustomConfig(
        backbone=backbone, dilation=dilation, num_queries=num_queries, d_model=d_model,
        encoder_layers=layers["encoder"], decoder_layers=layers["decoder"],
        encoder_attention_heads=num_heads, decoder_attention_heads=num_heads,
        encoder_ffn_dim=state_dict["transformer.encoder.layers.0.linear1.weight"].shape[0],
        decoder_ffn_dim=state_dict["transformer.decoder.layers.0.linear1.weight"].shape[0],
        position_embedding_type="learned" if "backbone.1.row_embed.weight" in state_dict else "sine",
        **({"id2label": id2label} if id2label else {"num_labels": num_labels}))


def transformers_config(config: DetrCustomConfig):
    """The transformers DetrConfig of the same architecture, without auxiliary loss (faithful)."""
    from transformers import DetrConfig

    # Only what shapes the forward pass: DetrConfig is strict about the types of the loss fields.
    fields = {k: getattr(config, k) for k in ARCHITECTURE_FIELDS if "cost" not in k and "coefficient" not in k}
    return DetrConfig(use_timm_backbone=True, backbone=config.backbone, use_pretrained_backbone=False,
                      auxiliary_loss=False, id2label=dict(config.id2label), **fields)


# ----------------------------------------------------------------------------- sources


def load_hf_folder(hf_dir: str | Path) -> tuple[dict[str, Tensor], dict]:
    """(state dict with v5 key names, config.json as a dict) of a transformers DETR folder."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir} is not a transformers model folder: no config.json")
    if (hf_dir / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state_dict = load_file(hf_dir / "model.safetensors")
    elif (hf_dir / "pytorch_model.bin").is_file():
        state_dict = torch.load(hf_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{hf_dir} holds neither model.safetensors nor pytorch_model.bin")
    if any("conv_encoder" in k or re.search(r"layers\.\d+\.fc1\.", k) for k in state_dict):
        if any("embedder" in k for k in state_dict):
            raise ValueError("this checkpoint uses transformers' own ResNet backbone; "
                             "only timm backbones are supported")
        state_dict = rename(state_dict, V4_TO_V5)
    state_dict = {k: v for k, v in state_dict.items() if not IGNORED.search(k)}
    return state_dict, json.loads((hf_dir / "config.json").read_text())


def load_original_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The `model` state dict of an original facebookresearch/detr `.pth`."""
    import argparse

    with torch.serialization.safe_globals([argparse.Namespace]):  # the original saves its args
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        keys = sorted(checkpoint)[:5] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path}: expected a dict with a 'model' state dict; got {keys}")
    return checkpoint["model"]


# ----------------------------------------------------------------------------- conversion


def random_padded_batch(config: DetrCustomConfig, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Two images of different sizes, zero-padded: pixel_values (2, C, 256, 320), pixel_mask (2, 256, 320)."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(2, config.num_channels, 256, 320, generator=generator)
    pixel_mask = torch.ones(2, 256, 320, dtype=torch.long)
    pixel_mask[1, 192:], pixel_mask[1, :, 224:] = 0, 0
    pixel_values[1] *= pixel_mask[1]
    return pixel_values, pixel_mask


@torch.no_grad()
def max_output_difference(ours: DetrCustomForObjectDetection, reference: torch.nn.Module) -> dict[str, float]:
    """Largest absolute differences of logits and boxes on a random padded batch, eval mode."""
    pixel_values, pixel_mask = random_padded_batch(ours.config)
    a = ours.eval()(pixel_values, pixel_mask)
    b = reference.eval()(pixel_values=pixel_values, pixel_mask=pixel_mask)
    return {"logits": (a.logits - b.logits).abs().max().item(),
            "pred_boxes": (a.pred_boxes - b.pred_boxes).abs().max().item()}


def build_and_verify(config: DetrCustomConfig, v5_state_dict: dict[str, Tensor],
                     atol: float = 1e-4) -> DetrCustomForObjectDetection:
    """Our model holding the weights of a v5 state dict, checked against transformers' DETR.

    Raises ValueError on any unaccounted key or when outputs differ by more than `atol`.
    """
    from transformers import DetrForObjectDetection

    ours = DetrCustomForObjectDetection(config)
    converted = v5_to_ours(v5_state_dict)
    check_keys(converted, ours)
    ours.load_state_dict(converted)
    reference = DetrForObjectDetection(transformers_config(config))
    reference.load_state_dict(v5_state_dict)
    diff = max_output_difference(ours, reference)
    if max(diff.values()) > atol:
        raise ValueError(f"converted model disagrees with transformers' DETR: max |diff| {diff} > {atol}; "
                         "nothing written")
    return ours


def save_converted(model: DetrCustomForObjectDetection, output_dir: str | Path) -> None:
    """Write the model (and a default DETR image processor) as a remote-code folder."""
    model.save_pretrained(output_dir)
    try:
        from .image_processing_detr_custom import DetrCustomImageProcessor
    except ImportError:  # processor module not available: the model folder alone is still valid
        return
    DetrCustomImageProcessor(id2label=dict(model.config.id2label)).save_pretrained(output_dir)


def convert_hf_folder(hf_dir: str | Path, output_dir: str | Path | None = None,
                      atol: float = 1e-4) -> DetrCustomForObjectDetection:
    """Convert a transformers DetrForObjectDetection folder (v5 or v4 keys, timm backbone)."""
    state_dict, hf_config = load_hf_folder(hf_dir)
    model = build_and_verify(config_from_hf(hf_config), state_dict, atol)
    if output_dir is not None:
        save_converted(model, output_dir)
    return model


def convert_original_checkpoint(path: str | Path, output_dir: str | Path | None = None, backbone: str = "resnet50",
                                dilation: bool = False, num_heads: int = 8,
                                atol: float = 1e-4) -> DetrCustomForObjectDetection:
    """Convert an original facebookresearch/detr checkpoint (`{"model": state_dict}`)."""
    original = load_original_checkpoint(path)
    config = config_from_original(original, backbone, dilation, num_heads)
    model = build_and_verify(config, split_in_proj(rename(original, ORIGINAL_TO_V5)), atol)
    if output_dir is not None:
        save_converted(model, output_dir)
    return model
