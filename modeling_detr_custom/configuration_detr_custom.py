"""Configuration of detr-custom: the original DETR-R50 by default (Carion et al., 2020).

Field names follow transformers' `DetrConfig`; where transformers' defaults depart from the
original DETR (attention/activation dropout, dropout on the encoder input, position embedding
dtype), ours are the original's.
"""

import difflib

from transformers import PreTrainedConfig

COCO_NUM_LABELS = 91  # COCO category ids are used raw (1..90 with gaps): max id + 1

# Saved with every config, so a folder loads through AutoModel as well as
# AutoModelForObjectDetection with trust_remote_code (save_pretrained records only the saved class).
AUTO_MAP = {
    "AutoConfig": "configuration_detr_custom.DetrCustomConfig",
    "AutoModel": "modeling_detr_custom.DetrCustomModel",
    "AutoModelForObjectDetection": "modeling_detr_custom.DetrCustomForObjectDetection",
}


class DetrCustomConfig(PreTrainedConfig):
    """Holds every hyper-parameter of the model and its set loss.

    Args:
        backbone: timm model name supporting `features_only=True`; only its last (stride-32)
            feature map is used. Weights are never downloaded at construction. A name timm does not know is a
            ValueError naming timm's closest names (names with timm's "hf-hub:" / "local-dir:" prefix are left to
            timm).
        dilation: replace the stride of the last stage by dilation (DETR-DC5, stride 16).
        backbone_output_stride: None (the original: 32, or 16 with `dilation`), or 8 / 16 / 32 for
            timm's `output_stride` (the last stages dilated instead of strided): 8 gives a 4x finer
            feature map, which the CPU demo preset uses for its 64 px images. With `dilation`, only 16.
        num_queries: number of object queries, i.e. the maximum number of detections per image.
        num_query_groups: Group DETR (Chen et al., ICCV 2023), 1 = the paper's DETR. With K > 1,
            training runs K groups of `num_queries` queries through the shared decoder, each group
            attending only to itself in self-attention and matched one-to-one on its own, so every
            target gets K positives; the loss is the mean of the K groups' set losses (the scale of
            K = 1). Evaluation and inference use only the first group: outputs, cost and exported
            graphs are those of a K = 1 model. Groups 2..K live in
            `model.extra_query_position_embeddings` ((K - 1) * num_queries, d_model); a K = 1
            checkpoint loaded with K > 1 starts them fresh, a K > 1 checkpoint loaded with K = 1
            drops them.
        d_model: width of the transformer.
        encoder_layers / decoder_layers: depth of the encoder / decoder.
        encoder_attention_heads / decoder_attention_heads: heads per attention layer.
        encoder_ffn_dim / decoder_ffn_dim: hidden width of the feed-forward blocks.
        dropout: dropout on every residual branch.
        attention_dropout: dropout on the attention weights.
        activation_dropout: dropout after the feed-forward activation.
        activation_function: "relu" (the original) or "gelu".
        position_embedding_type: "sine" (the original) or "learned".
        auxiliary_loss: add the set loss after every decoder layer, as the paper trains.
        class_cost / bbox_cost / giou_cost: weights of the Hungarian matching cost.
        bbox_loss_coefficient / giou_loss_coefficient: weights of the L1 and GIoU losses
            (the classification loss has weight 1).
        eos_coefficient: class weight of "no object" in the classification loss.
        freeze_backbone_stem: freeze the backbone stem and first stage, as the original does.
        backbone_fold_batch_norm / backbone_channels_last: speed settings that change only float
            rounding, not the math or the state dict: apply each frozen BatchNorm through the
            convolution before it, and feed the backbone channels-last images.
        init_xavier_std: gain of the xavier_uniform init of transformer weights.
        ffn_init: "xavier" (the original: xavier_uniform on the feed-forward weights like every
            transformer weight) or "pytorch" (nn.Linear's default, kaiming_uniform with a = sqrt(5),
            about 2x smaller second-layer weights), which the CPU demo preset uses because its tiny
            model learns faster with it (README).
        id2label / label2id: class names; the class head has `num_labels + 1` outputs, the last
            being "no object". Defaults to COCO's 91 raw ids. `num_labels` alone gives the names "LABEL_i"; given
            with `id2label`, it must be its length (a ValueError names both otherwise).
        label_to_category_id: model label id -> the training dataset's category id (COCO json
            `category_id`), recorded by training so that evaluation maps predictions back; None: the
            label ids are the category ids (the original DETR's raw COCO ids).
        contiguous_labels: whether training used labels 0..K-1 (sorted category ids) instead of the raw
            category ids; evaluation of a saved model reads it to load its dataset the same way.

    As transformers' `DetrConfig`: `is_encoder_decoder` is True, and the generic names `hidden_size`,
    `num_attention_heads` and `num_hidden_layers` read and write `d_model`, `encoder_attention_heads` and
    `encoder_layers`. The output flags (`output_attentions`, `output_hidden_states`, `return_dict`) are what a
    forward call without them uses; `attn_implementation` is "sdpa" by default or "eager" (attention weights).
    """

    model_type = "detr_custom"
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "encoder_attention_heads",
        "num_hidden_layers": "encoder_layers",
    }

    def __init__(
        self,
        backbone: str = "resnet50",
        dilation: bool = False,
        backbone_output_stride: int | None = None,
        num_queries: int = 100,
        num_query_groups: int = 1,
        d_model: int = 256,
        encoder_layers: int = 6,
        decoder_layers: int = 6,
        encoder_attention_heads: int = 8,
        decoder_attention_heads: int = 8,
        encoder_ffn_dim: int = 2048,
        decoder_ffn_dim: int = 2048,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        activation_dropout: float = 0.1,
        activation_function: str = "relu",
        position_embedding_type: str = "sine",
        auxiliary_loss: bool = True,
        class_cost: float = 1.0,
        bbox_cost: float = 5.0,
        giou_cost: float = 2.0,
        bbox_loss_coefficient: float = 5.0,
        giou_loss_coefficient: float = 2.0,
        eos_coefficient: float = 0.1,
        freeze_backbone_stem: bool = True,
        backbone_fold_batch_norm: bool = True,
        backbone_channels_last: bool = True,
        init_xavier_std: float = 1.0,
        ffn_init: str = "xavier",
        num_channels: int = 3,
        label_to_category_id: dict[int, int] | None = None,
        contiguous_labels: bool = False,
        **kwargs,
    ):
        if "id2label" not in kwargs and "num_labels" not in kwargs:
            kwargs["num_labels"] = COCO_NUM_LABELS
        check_num_labels(kwargs.get("num_labels"), kwargs.get("id2label"))
        kwargs["auto_map"] = {**AUTO_MAP, **(kwargs.get("auto_map") or {})}
        kwargs.setdefault("is_encoder_decoder", True)
        self.backbone = backbone
        self.dilation = dilation
        self.backbone_output_stride = backbone_output_stride
        self.num_queries = num_queries
        self.num_query_groups = num_query_groups
        self.d_model = d_model
        self.encoder_layers = encoder_layers
        self.decoder_layers = decoder_layers
        self.encoder_attention_heads = encoder_attention_heads
        self.decoder_attention_heads = decoder_attention_heads
        self.encoder_ffn_dim = encoder_ffn_dim
        self.decoder_ffn_dim = decoder_ffn_dim
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.activation_dropout = activation_dropout
        self.activation_function = activation_function
        self.position_embedding_type = position_embedding_type
        self.auxiliary_loss = auxiliary_loss
        self.class_cost = class_cost
        self.bbox_cost = bbox_cost
        self.giou_cost = giou_cost
        self.bbox_loss_coefficient = bbox_loss_coefficient
        self.giou_loss_coefficient = giou_loss_coefficient
        self.eos_coefficient = eos_coefficient
        self.freeze_backbone_stem = freeze_backbone_stem
        self.backbone_fold_batch_norm = backbone_fold_batch_norm
        self.backbone_channels_last = backbone_channels_last
        self.init_xavier_std = init_xavier_std
        self.ffn_init = ffn_init
        self.num_channels = num_channels
        # JSON turns the int keys into strings: back to ints, the form every reader expects
        self.label_to_category_id = (None if label_to_category_id is None else
                                     {int(k): int(v) for k, v in label_to_category_id.items()})
        self.contiguous_labels = bool(contiguous_labels)
        super().__init__(**kwargs)
        if "label2id" not in kwargs:
            self.label2id = {name: idx for idx, name in self.id2label.items()}
        self.validate_detr()

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """transformers' `from_dict`, keeping its idiom `from_pretrained(folder, num_labels=N)`: an N other than the
        saved names' count replaces them by LABEL_0 ... LABEL_{N-1}, as for transformers' own models (a new label
        set to fine-tune on), instead of meeting `check_num_labels`, which is for a config that contradicts itself."""
        asked = kwargs.get("num_labels")
        saved = config_dict.get("id2label")
        if asked is not None and saved is not None and len(saved) != asked:
            config_dict = {k: v for k, v in config_dict.items() if k not in ("id2label", "label2id")}
        return super().from_dict(config_dict, **kwargs)

    def validate_detr(self) -> None:
        """Raise ValueError on a combination the model cannot build."""
        positive = ("num_queries", "num_query_groups", "d_model", "encoder_attention_heads", "decoder_attention_heads",
                    "encoder_ffn_dim", "decoder_ffn_dim", "decoder_layers")
        for name in positive:
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be a positive integer; got {getattr(self, name)!r}")
        if self.encoder_layers < 0:
            raise ValueError(f"encoder_layers must be >= 0; got {self.encoder_layers!r}")
        for heads in ("encoder_attention_heads", "decoder_attention_heads"):
            if self.d_model % getattr(self, heads):
                raise ValueError(f"d_model ({self.d_model}) must be divisible by {heads} "
                                 f"({getattr(self, heads)})")
        if self.d_model % 2:
            raise ValueError(f"d_model must be even (half for y, half for x positions); got {self.d_model}")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1); got {getattr(self, name)!r}")
        if self.activation_function not in ("relu", "gelu"):
            raise ValueError(f"activation_function must be 'relu' or 'gelu'; got {self.activation_function!r}")
        if self.backbone_output_stride not in (None, 8, 16, 32) or \
                (self.dilation and self.backbone_output_stride not in (None, 16)):
            raise ValueError(f"backbone_output_stride must be None, 8, 16 or 32 (16 or None with dilation=True); got "
                             f"{self.backbone_output_stride!r} with dilation={self.dilation}")
        if self.ffn_init not in ("xavier", "pytorch"):
            raise ValueError(f"ffn_init must be 'xavier' or 'pytorch'; got {self.ffn_init!r}")
        if self.position_embedding_type not in ("sine", "learned"):
            raise ValueError(f"position_embedding_type must be 'sine' or 'learned'; got "
                             f"{self.position_embedding_type!r}")
        if not 0.0 < self.eos_coefficient <= 1.0:
            raise ValueError(f"eos_coefficient must be in (0, 1]; got {self.eos_coefficient!r}")
        if min(self.class_cost, self.bbox_cost, self.giou_cost) < 0 or \
                self.class_cost + self.bbox_cost + self.giou_cost == 0:
            raise ValueError("matching costs must be >= 0 and not all 0; got class_cost="
                             f"{self.class_cost}, bbox_cost={self.bbox_cost}, giou_cost={self.giou_cost}")
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1; got {self.num_labels}")
        check_backbone_name(self.backbone)


# timm's prefixes of a model that is not in its registry: a Hub repo or a local folder, resolved by timm itself
TIMM_SOURCE_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")


def check_backbone_name(name: object) -> None:
    """ValueError naming timm's closest model names when `name` is not a timm model (a registry lookup: timm's
    list of names is read only for the message)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"backbone = {name!r}; expected a timm model name such as 'resnet50'")
    if name.lower().startswith(TIMM_SOURCE_PREFIXES):
        return
    import timm  # the model's dependency; imported here so that reading a config alone stays light

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = (f"closest timm names: {', '.join(map(repr, close))}" if close else
            "no timm name is close (timm.list_models() lists them)")
    raise ValueError(f"backbone {name!r} is not a timm model; {hint}")


def check_num_labels(num_labels: object, id2label: object) -> None:
    """ValueError when both `num_labels` and `id2label` are given and disagree (transformers would log a warning
    and silently replace the names by LABEL_0, LABEL_1, ...)."""
    if num_labels is None or id2label is None or len(id2label) == num_labels:
        return
    names = list(dict(id2label).values())
    shown = ", ".join(map(repr, names[:5])) + (", ..." if len(names) > 5 else "")
    raise ValueError(f"num_labels={num_labels!r} disagrees with id2label, which names {len(id2label)} classes "
                     f"({shown}); give id2label alone (num_labels is its length), or num_labels alone")


DetrCustomConfig.register_for_auto_class()

__all__ = ["DetrCustomConfig"]
