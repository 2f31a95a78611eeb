"""Every use of a transformers internal in this repository, in one place, with why (issue 22).

"Internal" is anything outside transformers' public top-level API (`transformers.__all__`): a name imported
from a submodule (even one that is also public at the top level: the import path is what breaks), a mapping
table, a private (`_name`) hook or attribute of its base classes, a flag its code reads. transformers may move
or drop any of them in a minor release, so each one is here with the files that use it and a check.
`tests/test_transformers_internals.py` fails naming the internal when a check fails, and fails when a file
of the repository uses an internal that this table does not list.

When a new transformers breaks loading or training, run

    python -m modeling_detr_custom._transformers_internals

which prints the installed versions and every internal that is gone or changed; pin `transformers<X` (X the
version that broke it) and report it. `python -m pytest -m transformers_compat` runs the tests that guard
loading, saving, the pipeline and transformers' conventions against whatever transformers is installed.

This module is tooling: the remote-code files never import it (a Hub user does not have it).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

REMOTE_MODELING = "modeling_detr_custom.py"
REMOTE_PROCESSOR = "image_processing_detr_custom.py"


@dataclass(frozen=True)
class Internal:
    """One internal: `name` is its dotted path ("transformers.sub.module.NAME" or "transformers.Class._attr"),
    `used_by` the repository files (paths below the repository root; remote-code files by their name) that rely
    on it, `why` what breaks without it, `public_as` the public name of the same object where there is one, and
    `probe` an optional check of its behaviour (raises AssertionError saying what changed)."""

    name: str
    used_by: tuple[str, ...]
    why: str
    public_as: str | None = None
    probe: Callable[[], None] | None = None
    importable: bool = True  # False for a protocol (a flag on objects): the probe alone checks it

    @property
    def attribute(self) -> str:
        return self.name.split(" ")[0].rsplit(".", 1)[-1]

    def problem(self) -> str | None:
        """None while the internal is there and behaves as relied on; otherwise one line naming it."""
        try:
            if self.importable:
                resolve(self.name)
            if self.probe is not None:
                self.probe()
        except (ImportError, AttributeError, AssertionError, TypeError) as error:
            import transformers

            return (f"transformers {transformers.__version__}: {self.name} is gone or changed "
                    f"({type(error).__name__}: {error}); used by {', '.join(self.used_by)} for: {self.why}")
        return None


def resolve(name: str) -> object:
    """The object at a dotted path: the longest importable module prefix, then attributes."""
    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for i, attribute in enumerate(parts[split:], start=split):
            if not hasattr(obj, attribute):
                raise AttributeError(f"{'.'.join(parts[:i])} has no attribute {attribute!r}")
            obj = getattr(obj, attribute)
        return obj
    raise ImportError(f"no module {parts[0]!r}")


# ----------------------------------------------------------------------------- probes of behaviour


def _probe_is_hf_initialized() -> None:
    """transformers.initialization's functions leave a tensor marked `_is_hf_initialized` as it is."""
    import torch
    from transformers import initialization as init

    marked, plain = torch.ones(3), torch.ones(3)
    marked._is_hf_initialized = True
    init.zeros_(marked)
    init.zeros_(plain)
    assert torch.equal(marked, torch.ones(3)), "init.zeros_ overwrote a tensor marked _is_hf_initialized"
    assert torch.equal(plain, torch.zeros(3)), "init.zeros_ did not initialise an unmarked tensor"


def _probe_model():
    """A tiny PreTrainedModel with a submodule that has a `gradient_checkpointing` attribute, as the backbone."""
    from torch import nn
    from transformers import PreTrainedConfig, PreTrainedModel

    class ProbeConfig(PreTrainedConfig):
        model_type = "detr_custom_internals_probe"

    class Flagged(nn.Module):
        def __init__(self):
            super().__init__()
            self.gradient_checkpointing = False
            self.linear = nn.Linear(2, 2)

    class ProbeModel(PreTrainedModel):
        config_class = ProbeConfig
        supports_gradient_checkpointing = True

        def __init__(self, config):
            super().__init__(config)
            self.flagged = Flagged()
            self.initialised: list[str] = []
            self.post_init()

        def _init_weights(self, module):
            self.initialised.append(type(module).__name__)

    return ProbeModel(ProbeConfig())


def _probe_init_weights() -> None:
    model = _probe_model()
    assert "Linear" in model.initialised, f"post_init did not call _init_weights on a Linear: {model.initialised}"


def _probe_gradient_checkpointing_flag() -> None:
    model = _probe_model()
    model.activation_checkpointing_enable()
    assert model.flagged.gradient_checkpointing is True, \
        "activation_checkpointing_enable() no longer sets `gradient_checkpointing` on a submodule that has it"


def _probe_object_detection_names() -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES as names

    assert isinstance(names, Mapping) and hasattr(names, "setdefault"), f"not a mutable mapping: {type(names)}"
    assert names.get("detr") == "DetrForObjectDetection", "no longer maps model types to detector class names"


def _probe_attention_interface() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert callable(getattr(ALL_ATTENTION_FUNCTIONS, "get_interface", None)), "has no get_interface()"


def _probe_attn_implementation() -> None:
    from transformers import PreTrainedConfig

    config = PreTrainedConfig()
    config._attn_implementation = "eager"
    assert config._attn_implementation == "eager", "config._attn_implementation cannot be set and read"


# ----------------------------------------------------------------------------- the table


INTERNALS: tuple[Internal, ...] = (
    # --- remote code: modeling_detr_custom.py
    Internal("transformers.models.auto.modeling_auto.MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES", (REMOTE_MODELING,),
             "pipeline('object-detection') accepts a model only if its class name is in this table (the classes "
             "registered with AutoModelForObjectDetection do not count) and logs an error listing every detector "
             "otherwise; importing the modeling file adds ours under its model_type",
             probe=_probe_object_detection_names),
    Internal("transformers.initialization", (REMOTE_MODELING,),
             "`_init_weights` initialises through its functions (xavier_uniform_, kaiming_normal_, zeros_, "
             "constant_, uniform_, copy_), which skip loaded tensors, so a checkpoint's values are kept"),
    Internal("torch.Tensor._is_hf_initialized (read by transformers.initialization)", (REMOTE_MODELING,),
             "the flag on a tensor that transformers.initialization skips: the backbone marks the tensors timm "
             "initialised at construction, so post_init keeps timm's init",
             probe=_probe_is_hf_initialized, importable=False),
    Internal("transformers.modeling_layers.GradientCheckpointingLayer", (REMOTE_MODELING,),
             "base class of the encoder and decoder layers: activation checkpointing recomputes them",
             public_as="transformers.GradientCheckpointingLayer"),
    Internal("transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS", (REMOTE_MODELING,),
             "an attn_implementation other than sdpa/eager runs the function registered with AttentionInterface",
             probe=_probe_attention_interface),
    Internal("transformers.utils.ModelOutput", (REMOTE_MODELING,),
             "base of the output dataclasses (the pipeline rebuilds a ModelOutput; return_dict=False gives tuples)"),
    Internal("transformers.utils.logging", (REMOTE_MODELING, REMOTE_PROCESSOR),
             "the loggers of the remote-code files", public_as="transformers.logging"),
    Internal("transformers.PreTrainedModel._init_weights", (REMOTE_MODELING, "tests/test_model.py"),
             "overridden: post_init and from_pretrained call it for every module a checkpoint did not fill",
             probe=_probe_init_weights),
    Internal("nn.Module.gradient_checkpointing (set by PreTrainedModel.activation_checkpointing_enable)",
             (REMOTE_MODELING,),
             "activation_checkpointing_enable() (transformers >= 5.23) sets `gradient_checkpointing` on every "
             "submodule that has the attribute: the backbone's property turns timm's own checkpointing on",
             probe=_probe_gradient_checkpointing_flag, importable=False),
    Internal("transformers.PreTrainedModel._no_split_modules", (REMOTE_MODELING,),
             "device_map='auto' keeps each encoder and decoder layer on one device"),
    Internal("transformers.PreTrainedModel._keys_to_ignore_on_load_unexpected", (REMOTE_MODELING,),
             "a Group DETR checkpoint loaded with fewer query groups drops the extra queries without a warning"),
    Internal("transformers.PreTrainedModel._supports_sdpa", (REMOTE_MODELING,),
             "attn_implementation='sdpa' is allowed (and the default) for the model"),
    Internal("transformers.PreTrainedConfig._attn_implementation", (REMOTE_MODELING, "tests/test_conventions.py"),
             "the attention layers read which implementation to run from the config",
             probe=_probe_attn_implementation),
    # --- remote code: image_processing_detr_custom.py
    Internal("transformers.image_processing_utils.BaseImageProcessor", (REMOTE_PROCESSOR,),
             "base class of the image processor", public_as="transformers.BaseImageProcessor"),
    Internal("transformers.image_processing_utils.BatchFeature", (REMOTE_PROCESSOR,),
             "what the processor returns", public_as="transformers.BatchFeature"),
    Internal("transformers.processing_utils.ImagesKwargs", (REMOTE_PROCESSOR,),
             "base of the processor's kwargs TypedDict (`valid_kwargs`)", public_as="transformers.ImagesKwargs"),
    Internal("transformers.utils.is_vision_available", (REMOTE_PROCESSOR,),
             "Pillow is imported only where transformers says it is there",
             public_as="transformers.is_vision_available"),
    Internal("transformers.PreTrainedModel._initialize_weights", ("tests/test_conventions.py",),
             "wrapped to seed or skip the init of each module (it runs `_init_weights` on one module), as "
             "transformers' own weight-init tests do"),
    Internal("transformers.ImageProcessingMixin._auto_class", ("tests/test_image_processor.py",),
             "a test sets it to save a processor with its auto_map as register_for_auto_class does"),
    # --- tests and benchmarks: transformers' own DETR as the reference
    Internal("transformers.models.detr.modeling_detr.DetrModelOutput", ("tests/test_conventions.py",),
             "our output fields must be transformers' DETR fields in its order"),
    Internal("transformers.models.detr.modeling_detr.DetrObjectDetectionOutput", ("tests/test_conventions.py",),
             "our detector's output fields must be transformers' DETR fields in its order"),
    Internal("transformers.loss.loss_for_object_detection.ForObjectDetectionLoss",
             ("tests/test_parity.py", "benchmarks/bench_model.py"),
             "the reference DETR loss our set criterion is compared with and timed against"),
    Internal("transformers.loss.loss_for_object_detection.HungarianMatcher", ("tests/test_parity.py",),
             "the reference matcher our matcher is compared with"),
    Internal("transformers.image_transforms.get_size_with_aspect_ratio", ("tests/test_image_processor.py",),
             "the reference resize arithmetic our processor's output sizes are compared with"),
)


def problems() -> list[str]:
    """One line per internal that is gone or changed in the installed transformers."""
    return [problem for internal in INTERNALS if (problem := internal.problem()) is not None]


def main() -> int:
    import importlib.metadata

    for package in ("transformers", "torch", "timm", "accelerate", "huggingface_hub"):
        try:
            print(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            print(f"{package} not installed")
    found = problems()
    for line in found:
        print(f"error: {line}")
    print(f"{len(INTERNALS) - len(found)} of {len(INTERNALS)} transformers internals as relied on"
          + ("" if not found else ": install a transformers in pyproject.toml's tested range (README, 'Supported "
                                  "versions'); if a newer release broke it, pin transformers below it and report it"))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
