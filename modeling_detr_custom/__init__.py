"""detr-custom: DETR as a Hugging Face Hub remote-code plugin.

Importing the installed package registers the classes with transformers' Auto classes, so an
installed user loads saved folders without `trust_remote_code`. The files of this folder that
the model, config and image processor import are what `save_pretrained` ships as remote code.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForObjectDetection

from .configuration_detr_custom import DetrCustomConfig
from .image_processing_detr_custom import DetrCustomImageProcessor
from .modeling_detr_custom import DetrCustomForObjectDetection, DetrCustomModel

AutoConfig.register(DetrCustomConfig.model_type, DetrCustomConfig, exist_ok=True)
AutoModel.register(DetrCustomConfig, DetrCustomModel, exist_ok=True)
AutoModelForObjectDetection.register(DetrCustomConfig, DetrCustomForObjectDetection, exist_ok=True)
# One torch-based processor serves both backends AutoImageProcessor may ask for.
AutoImageProcessor.register(DetrCustomConfig, exist_ok=True, image_processor_classes={
    "torchvision": DetrCustomImageProcessor, "pil": DetrCustomImageProcessor})

__all__ = ["DetrCustomConfig", "DetrCustomModel", "DetrCustomForObjectDetection", "DetrCustomImageProcessor"]
