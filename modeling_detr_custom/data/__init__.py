"""Detection data for training and evaluation: sources, checks, augmentation, batches, synthetic shapes.

Not remote code: nothing in the model/config/processor files imports this package (it imports them).

One module per idea, read in this order:

* :mod:`.schema`: the rows every source yields, the label mapping, and the one name of the class id at each
  stage (``objects["category"]`` -> ``class_labels`` -> COCO ``category_id``);
* :mod:`.boxes`: the one box conversion (COCO xywh <-> xyxy) and the one clip / drop-empty rule;
* :mod:`.box_format`: the box formats a source may declare (``--box_format``) and the recognition of another one;
* :mod:`.coco_checks` and :mod:`.coco`: local COCO folders, checked up-front, with a bad-data report;
* :mod:`.yolo`: ultralytics YOLO folders (data.yaml, images/, labels/), the same checks and rows as COCO folders;
* :mod:`.sources`: Hub datasets, saved datasets and COCO folders behind one call;
* :mod:`.inspection`: the one data check of every source (per-split statistics, what would break a run);
* :mod:`.pictures`: sample images with their boxes, as stored and as the model sees them after the transforms;
* :mod:`.transforms`: DETR's training augmentation;
* :mod:`.collate`: rows -> batches (the collator) and the seeded epoch sampler;
* :mod:`.synthetic`: the synthetic shapes COCO (or YOLO) folder, and the cached built-in dataset.
"""

from .box_format import BOX_FORMATS, BoxFormat, check_box_format, find_box_format, to_xywh
from .coco import CocoSplit, find_coco_splits, load_coco_folder, load_coco_folder_with_info
from .coco_checks import REPORT_KEYS
from .collate import (
    DetrCollator,
    EpochShuffleSampler,
    coco_objects_to_target,
    derived_seed,
    pil_to_uint8_chw,
    target_to_coco_annotation,
    without_image_decoding,
)
from .inspection import CheckSettings, DataReport, SplitSummary, check_dataset
from .pictures import data_picture, training_inputs_picture
from .schema import (
    BoxColumns,
    DetectionData,
    LabelMapping,
    box_columns,
    category_feature,
    detection_features,
    label_mapping_from_categories,
    label_mapping_from_features,
    metric_references,
    objects_as_columns,
    validate_detection_schema,
)
from .sources import find_split, load_detection_dataset
from .synthetic import SYNTHETIC_DEFAULTS, default_cache_dir, generate_image, make_synthetic_coco, synthetic_coco_dir
from .transforms import (
    Compose,
    make_eval_transforms,
    make_flip_colour_transforms,
    make_train_transforms,
    scaled_train_transform_kwargs,
)
from .yolo import YOLO_REPORT_KEYS, load_yolo_folder, load_yolo_folder_with_info

__all__ = [
    "BOX_FORMATS", "BoxColumns", "BoxFormat", "CheckSettings", "DataReport", "SplitSummary", "box_columns",
    "category_feature", "check_box_format", "check_dataset", "data_picture", "find_box_format", "to_xywh",
    "training_inputs_picture",
    "REPORT_KEYS", "CocoSplit", "Compose", "DetectionData", "DetrCollator", "EpochShuffleSampler", "LabelMapping",
    "SYNTHETIC_DEFAULTS", "coco_objects_to_target", "default_cache_dir", "derived_seed", "detection_features",
    "find_coco_splits", "find_split", "generate_image", "label_mapping_from_categories",
    "label_mapping_from_features", "load_coco_folder", "load_coco_folder_with_info", "load_detection_dataset",
    "make_eval_transforms", "make_flip_colour_transforms", "make_synthetic_coco", "make_train_transforms",
    "metric_references",
    "objects_as_columns", "pil_to_uint8_chw", "scaled_train_transform_kwargs", "synthetic_coco_dir",
    "target_to_coco_annotation", "validate_detection_schema", "without_image_decoding",
    "YOLO_REPORT_KEYS", "load_yolo_folder", "load_yolo_folder_with_info",
]
