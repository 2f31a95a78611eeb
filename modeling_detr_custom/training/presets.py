"""The model presets and their training recipes, as data.

`demo` was picked by measurement for a validation AP50 of the synthetic shapes >= 0.85 in as little time as it
takes on a 2-core CPU: 4.2-4.7 minutes on the Intel AVX-512 machine, not yet measured on an AVX2-only one, which the
aim of 10 minutes includes (README, BENCHMARKS.md). DETR from scratch learns slowly; what
makes CPU learning visible: a tiny random backbone at stride 8 (an 8x8 feature map of the 64 px images), d_model
128 (1.5x faster steps than 256 for a little less learning per step), few queries, Group DETR with 4 groups in
training (inference is DETR's), PyTorch's default init of the feed-forward layers (with the original's xavier init
the stride-16 demo model of 0fb0b69 stalled: AP50 0.05 instead of 0.53 after 24 epochs), and a linear warmup for 20
epochs, x0.1 after 17. At batch 8, twice the earlier lr (4e-4) gave AP50 0.94-0.96 against 0.85-0.89 (28 epochs,
three seeds); with no warmup it never learned, and with 500 steps the paper's DETR, num_query_groups=1, stayed at
AP50 ~0 on two seeds of three, while Group DETR trained. 20 epochs instead of 28 (issue 21: 28 took 11-18 minutes on
the AVX2 machines) cost about 0.02 AP50. Batch 16 (lr x sqrt 2 = 5.7e-4, warmup 500 steps: the same 8,000 images as
1,000 steps of 8) takes 0.81x the time of batch 8 for the same mean AP50 over 3 seeds (0.892 against 0.893): a
step of 16 costs 1.6x one of 8. Batch 32, or 16 with 2 query groups, fell to 0.85 (seed 1). `tiny` is for tests.
`r50` is the paper's model and recipe, init included (COCO, 300 epochs, lr x0.1 at 200, no warmup).
"""

from __future__ import annotations

from typing import Any

# DetrCustomConfig kwargs of each preset.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "demo": dict(backbone="test_resnet", backbone_output_stride=8, freeze_backbone_stem=False, d_model=128,
                 encoder_layers=2, decoder_layers=2, encoder_attention_heads=8, decoder_attention_heads=8,
                 encoder_ffn_dim=512, decoder_ffn_dim=512, num_queries=10, num_query_groups=4, ffn_init="pytorch",
                 dropout=0.0, attention_dropout=0.0, activation_dropout=0.0),
    "tiny": dict(backbone="test_resnet", d_model=32, encoder_layers=1, decoder_layers=2,
                 encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                 decoder_ffn_dim=64, num_queries=12),
    "r50": {},  # DetrCustomConfig's defaults are the original DETR-R50
}

# Training options of each preset, used for every option left unset on the command line / in the options file.
# The small presets take the idle cores (`num_threads="auto"`): a demo step is about 1.5x faster on both cores of
# an idle 2-core machine, but several times slower on two threads when another job keeps a core busy.
TRAINING_PRESETS: dict[str, dict[str, Any]] = {
    "demo": dict(image_size=64, learning_rate=5.7e-4, backbone_learning_rate=5.7e-4, warmup_steps=500,
                 num_train_epochs=20, lr_drop_epochs=17, per_device_train_batch_size=16, backbone_weights="none",
                 augmentation=False, num_threads="auto"),
    "tiny": dict(image_size=64, learning_rate=1e-4, backbone_learning_rate=1e-5, warmup_steps=0,
                 num_train_epochs=1, lr_drop_epochs=None, per_device_train_batch_size=2, backbone_weights="none",
                 augmentation=True, num_threads="auto"),
    "r50": dict(image_size=800, learning_rate=1e-4, backbone_learning_rate=1e-5, warmup_steps=0,
                num_train_epochs=300, lr_drop_epochs=200, per_device_train_batch_size=2, backbone_weights="timm",
                augmentation=True, num_threads="0"),
}

# What identifies a preset's model in a saved config.json (the architecture; not dropout, init or query groups, which
# only change training): `arguments.model_preset` matches a model without a training record against these.
ARCHITECTURE_KEYS = ("backbone", "backbone_output_stride", "dilation", "d_model", "encoder_layers", "decoder_layers",
                     "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim",
                     "num_queries")

# A fine-tune (--model_name_or_path) takes the recipe of the preset its model was trained with and the changes below.
# A fine-tune is typically on a few hundred images, which the demo's model learns by heart within 20 epochs (training
# class error 0 %, validation AP50 0.56-0.61 on bench_finetune.py's 256 new shapes): flips both ways and shuffled
# colour channels raised it to 0.80 in 1,024 steps, more than a frozen backbone (0.49), dropout 0.1 (0.61) or DETR's
# multi-scale crops (0.25), which shrink 64 px shapes below the stride; with them, 48 epochs (x0.1 after 40) end at
# 0.86-0.89 over 3 seeds (BENCHMARKS.md). They were measured at batch 8 and lr 4e-4 (the demo's own then, before its
# batch 16) with a tenth of its warmup then (100 steps): the warmup is for learning from scratch, and a fine-tune
# starts from learned weights except the rows of its new classes.
FINETUNE_CHANGES: dict[str, dict[str, Any]] = {
    "demo": dict(fliplr=0.5, flipud=0.5, channel_shuffle=1.0, num_train_epochs=48, lr_drop_epochs=40,
                 per_device_train_batch_size=8, learning_rate=4e-4, backbone_learning_rate=4e-4, warmup_steps=100),
}


def finetune_recipe(preset: str) -> dict[str, Any]:
    """The training options of a fine-tune from a model of ``preset``: the preset's, with its `FINETUNE_CHANGES`."""
    return {**TRAINING_PRESETS[preset], **FINETUNE_CHANGES.get(preset, {})}
