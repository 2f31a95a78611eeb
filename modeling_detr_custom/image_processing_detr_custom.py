"""Image processor for DETR (Carion et al. 2020), written for speed and for the original DETR's box convention.

Shipped as Hugging Face Hub remote code, so this file imports only torch, numpy, PIL and transformers at top level.

Differences from transformers' ``DetrImageProcessor`` (both of its backends):

* target boxes are normalised by each image's own UNPADDED resized size, as in the original DETR and as the
  pretrained weights expect (transformers normalises by the padded canvas when it pads a batch);
* all work is done on torch tensors, one pass per image into a batch tensor allocated once, on CPU or on a GPU
  (``device=``);
* PIL EXIF orientation is applied, to the image and to its annotation boxes (which are in the stored pixel grid,
  as COCO's); grayscale, RGBA, LA, palette and CMYK images become RGB (alpha is dropped, as
  ``PIL.Image.convert("RGB")`` does in the original DETR data loader); 16-bit and float grayscale PIL images are
  scaled to 8 bits (`pil_to_rgb8`), not clipped to white. With C != 3 values in ``image_mean`` / ``image_std``
  (a model with ``num_channels`` C), images are taken with their own C channels instead;
* float images are taken to be in [0, 1] already: ``do_rescale`` only rescales uint8 images;
* bad inputs raise ``ValueError`` naming the offending index and value: among them an image whose resize would
  have a side of 0 px (e.g. 5000x1 at the default size) or that has, as given or resized, more pixels than
  ``max_image_pixels()`` (PIL's decompression-bomb limit), and a ``pad_size`` that cannot hold the resized images
  (refused where it is set);
* ``post_process_object_detection`` clips boxes to the image and can keep the ``top_k`` best detections.

Resizing uses ``torch.nn.functional.interpolate(mode="bilinear", antialias=True, align_corners=False)``. On CPU a
uint8 image is resized in uint8 (PyTorch's vectorised channels-last kernel, the one torchvision uses; it rounds to
uint8 like PIL and the original DETR do, is about 5x faster than the float kernel on CPU, and never makes a float
copy of a huge image); float images and every image on a GPU are resized in float32.
"""

from __future__ import annotations

import numbers
import operator
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np  # a hard requirement of torch, transformers and scipy: never missing
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs
from transformers.utils import is_vision_available, logging

if is_vision_available():  # Pillow is optional for transformers; without it, tensors and arrays still work
    import PIL.Image
    import PIL.ImageOps


logger = logging.get_logger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SIZE = {"shortest_edge": 800, "longest_edge": 1333}
EXIF_ORIENTATION_TAG = 0x0112
EXPECTED_IMAGE = "expected a PIL.Image, a numpy array (H, W, C) or a torch tensor (C, H, W)"
OUR_KEYS = ("remove_crowd", "id2label")
RESIZE_SETTINGS = ("do_resize", "size", "pad_size")  # checked together where they are set


class DetrCustomImageProcessorKwargs(ImagesKwargs, total=False):
    """The processor's settings: transformers' image kwargs plus ours (lets `from_pretrained(..., key=value)`
    override them without a warning)."""

    remove_crowd: bool
    id2label: dict[int, str] | None


# ---------------------------------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------------------------------
def get_size_with_aspect_ratio(
    image_size: tuple[int, int], size: int, max_size: int | None = None
) -> tuple[int, int]:
    """Output `(height, width)` when the short side is resized to `size` with the long side at most `max_size`.

    Same arithmetic as `transformers.image_transforms.get_size_with_aspect_ratio` (which DetrImageProcessor uses)
    so that output sizes are identical. It differs from the original DETR code only when the long side limit
    applies: the original rounds the reduced short side first and derives the long side from the rounded value,
    transformers (and we) from the unrounded one, so the long side can differ by one pixel.
    """
    height, width = image_size
    raw_size = None
    if max_size is not None:
        min_original_size = float(min((height, width)))
        max_original_size = float(max((height, width)))
        if max_original_size / min_original_size * size > max_size:
            raw_size = max_size * min_original_size / max_original_size
            size = int(round(raw_size))
    if (height <= width and height == size) or (width <= height and width == size):
        return height, width
    long_scale = raw_size if raw_size is not None else size
    if width < height:
        return int(long_scale * height / width), size
    return size, int(long_scale * width / height)


def _validate_size(size: Any) -> dict[str, int]:
    """Normalise `size` to {"shortest_edge"[, "longest_edge"]} or {"height", "width"}; an int is a shortest edge."""
    if isinstance(size, int) and not isinstance(size, bool):
        size = {"shortest_edge": size}
    if not isinstance(size, Mapping):
        raise ValueError(f"size = {size!r}; expected a dict like {DEFAULT_SIZE} or {{'height': h, 'width': w}}")
    size = {k: v for k, v in dict(size).items() if v is not None}
    keys = set(size)
    if keys not in ({"shortest_edge"}, {"shortest_edge", "longest_edge"}, {"height", "width"}):
        raise ValueError(f"size = {size!r}; expected keys shortest_edge (+ longest_edge) or height and width")
    if not all(isinstance(v, int) and v > 0 for v in size.values()):
        raise ValueError(f"size = {size!r}; every value must be a positive int")
    return size


def _validate_pad_size(pad_size: Any) -> dict[str, int] | None:
    """`pad_size` is None (pad to the batch maximum) or {"height": int, "width": int}."""
    if pad_size is None:
        return None
    if not isinstance(pad_size, Mapping) or set(pad_size) != {"height", "width"}:
        raise ValueError(f"pad_size = {pad_size!r}; expected None or {{'height': int, 'width': int}}")
    if not all(isinstance(v, int) and v > 0 for v in pad_size.values()):
        raise ValueError(f"pad_size = {pad_size!r}; height and width must be positive ints")
    return dict(pad_size)


def _channel_floats(values: Sequence[float] | float, name: str) -> list[float]:
    """`image_mean` / `image_std` as a list of floats, one per channel; a single number stands for R, G and B."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        array = np.zeros((0, 0))
    array = np.repeat(array, 3) if array.ndim == 0 else array
    if array.ndim != 1 or not array.size or not np.isfinite(array).all() or (name == "image_std" and array.min() <= 0):
        raise ValueError(f"{name} = {values!r}; expected finite numbers, one per image channel (3 for RGB), std > 0")
    return [float(v) for v in array]


def _output_size(image_hw: tuple[int, int], size: dict[str, int] | None) -> tuple[int, int]:
    """Resized `(height, width)` of one image; `size=None` means no resize."""
    if size is None:
        return image_hw
    if "height" in size:
        return size["height"], size["width"]
    return get_size_with_aspect_ratio(image_hw, size["shortest_edge"], size.get("longest_edge"))


def _padded_size(sizes: list[tuple[int, int]], pad_size: dict[str, int] | None) -> tuple[int, int]:
    """Canvas `(height, width)`: the batch maximum, or the fixed `pad_size` (which must fit every image)."""
    if pad_size is None:
        return max(h for h, _ in sizes), max(w for _, w in sizes)
    for i, (h, w) in enumerate(sizes):
        if h > pad_size["height"] or w > pad_size["width"]:
            raise ValueError(
                f"images[{i}] is {h}x{w} (height x width) after resizing, larger than pad_size = {pad_size}"
            )
    return pad_size["height"], pad_size["width"]


def _largest_resized_sizes(size: dict[str, int]) -> list[tuple[int, int]]:
    """(height, width) sizes that the resized images of one orientation fit in, one of which a fixed canvas must
    hold: exactly {height} x {width}; with a longest edge L, short side s' = min(shortest_edge, L): s' x L
    (landscape) or L x s' (portrait); without one, a square image's shortest_edge x shortest_edge."""
    if "height" in size:
        return [(size["height"], size["width"])]
    longest = size.get("longest_edge")
    if longest is None:
        return [(size["shortest_edge"], size["shortest_edge"])]
    short = min(size["shortest_edge"], longest)
    return [(short, longest), (longest, short)]


def _check_pad_size_holds_resized_images(size: dict[str, int], pad_size: dict[str, int] | None,
                                         do_resize: bool) -> None:
    """ValueError naming both sizes when a fixed `pad_size` cannot hold the images `size` resizes to (in landscape
    or in portrait, see `_largest_resized_sizes`). Without resizing, images keep their own sizes: nothing to check."""
    if pad_size is None or not do_resize:
        return
    sizes = _largest_resized_sizes(size)
    if any(pad_size["height"] >= h and pad_size["width"] >= w for h, w in sizes):
        return
    described = " or ".join(f"{h}x{w}" for h, w in sizes)
    raise ValueError(f"pad_size = {pad_size} is smaller than the resize size of size = {size}: up to {described} "
                     "(height x width); expected a pad_size at least that large, or None (pad each batch to its "
                     "largest image)")


# PIL's decompression-bomb limit at its default (PIL.Image.MAX_IMAGE_PIXELS = 89,478,485; PIL refuses to open an
# image of more than twice that): the limit when PIL is not installed
DEFAULT_MAX_IMAGE_PIXELS = 2 * 89_478_485


def max_image_pixels() -> int | None:
    """The most pixels an image may have, as given or resized: PIL's decompression-bomb limit, twice
    `PIL.Image.MAX_IMAGE_PIXELS` (178,956,970 px by default; the same limit the data check of training skips
    images by), or None when that is set to None (PIL's check off). Larger images are refused before any work."""
    if not is_vision_available():
        return DEFAULT_MAX_IMAGE_PIXELS
    return 2 * PIL.Image.MAX_IMAGE_PIXELS if PIL.Image.MAX_IMAGE_PIXELS else None


def _check_image_size(index: int, image_hw: tuple[int, int], resized_hw: tuple[int, int], size: dict[str, int] | None,
                      limit: int | None) -> None:
    """ValueError naming the image and its size when its resize has a side of 0 px, or when it has more than
    `limit` pixels as given or resized."""
    (height, width), (new_height, new_width) = image_hw, resized_hw
    where = f"images[{index}] is {height}x{width} (height x width)"
    if min(new_height, new_width) < 1:
        raise ValueError(f"{where}: resizing it to size = {size} gives {new_height}x{new_width}, a side of 0 px; "
                         "expected an image whose resize keeps every side at least 1 px (a less elongated one)")
    if limit is not None and max(height * width, new_height * new_width) > limit:
        resized = "" if (new_height, new_width) == (height, width) else f", {new_height}x{new_width} resized"
        raise ValueError(f"{where}{resized}: more than the {limit} pixels an image may have (PIL's decompression-bomb "
                         "limit, twice PIL.Image.MAX_IMAGE_PIXELS)")


def _id2label_with_int_keys(id2label: Mapping | None) -> dict[int, str] | None:
    """JSON turns int keys into strings; convert them back so category ids can be looked up."""
    if id2label is None:
        return None
    try:
        return {int(k): v for k, v in dict(id2label).items()}
    except (TypeError, ValueError) as err:
        raise ValueError(f"id2label keys must be ints (class ids); got {list(id2label)[:10]!r}") from err


# ---------------------------------------------------------------------------------------------------------------
# images -> (C, H, W) tensors, C = 3 (RGB) unless image_mean / image_std have another length
# ---------------------------------------------------------------------------------------------------------------
def _as_image_list(images: Any) -> list[Any]:
    """One image, a list/tuple of images, or a 4-D batch (torch (B, C, H, W) / numpy (B, H, W, C)) -> a list."""
    if isinstance(images, (list, tuple)):
        items = list(images)
    elif isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        items = list(images)
    else:
        items = [images]
    if not items:
        raise ValueError("images is empty; expected at least one image")
    return items


def _is_pil(image: Any) -> bool:
    return is_vision_available() and isinstance(image, PIL.Image.Image)


def _exif_orientation(image: Any) -> int:
    """The EXIF orientation (1-8) of a PIL image; 1 (as stored) for anything else."""
    return (image.getexif().get(EXIF_ORIENTATION_TAG) or 1) if _is_pil(image) else 1


def _pil_to_rgb(image: PIL.Image.Image, index: int = 0) -> PIL.Image.Image:
    """Apply EXIF orientation and convert to 8-bit RGB. Copies only when something has to change (big images)."""
    if _exif_orientation(image) != 1:
        image = PIL.ImageOps.exif_transpose(image)
    return pil_to_rgb8(image, f"images[{index}]")


# PIL modes of more than 8 bits per pixel: `convert("RGB")` clips their values to 255, a white image.
# Each maps to its full-scale value: 16-bit modes (and "I", which PIL also uses for 16-bit PNGs) 65535, "F" 1.0.
HIGH_BIT_DEPTH_FULL_SCALE = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0,
                             "I": 65535.0, "F": 1.0}


def pil_to_rgb8(image: PIL.Image.Image, what: str = "the image") -> PIL.Image.Image:
    """Any PIL image -> 8-bit RGB (no EXIF handling); the one conversion of the processor, training and predict.

    High bit-depth grayscale (`HIGH_BIT_DEPTH_FULL_SCALE`) is scaled to 0-255 by its full-scale value instead of
    being clipped; values outside [0, full scale] (or NaN) raise ValueError naming ``what``, the mode and the range.
    """
    full_scale = HIGH_BIT_DEPTH_FULL_SCALE.get(image.mode)
    if full_scale is None:
        return image if image.mode == "RGB" else image.convert("RGB")
    array = np.asarray(image).astype(np.float32)
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if not (0.0 <= low and high <= full_scale):  # also False for NaN
        raise ValueError(f"{what} has PIL mode {image.mode} with values in [{low:g}, {high:g}]; expected values in "
                         f"[0, {full_scale:g}] for that mode (16-bit images 0-65535, float images 0-1)")
    gray = np.rint(array * np.float32(255.0 / full_scale)).astype(np.uint8)
    return PIL.Image.fromarray(gray).convert("RGB")


def _numpy_to_tensor(array: np.ndarray) -> torch.Tensor:
    """Zero-copy numpy -> torch, also for the read-only arrays PIL hands out (we never write into inputs)."""
    if any(stride < 0 for stride in array.strides):  # e.g. a flipped view; torch cannot wrap those
        array = np.ascontiguousarray(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _channels_first(tensor: torch.Tensor, channels_last_first: bool, index: int, channels: int = 3) -> torch.Tensor:
    """(H, W), (H, W, C) or (C, H, W) -> (C, H, W) as a view; C must be 1, 3, 4 or the processor's `channels`.

    `channels_last_first` says which layout to try first when both would fit (numpy arrays are usually HWC,
    torch tensors CHW).
    """
    if tensor.ndim == 2:
        return tensor.unsqueeze(0)
    if tensor.ndim != 3:
        raise ValueError(f"images[{index}] has shape {tuple(tensor.shape)}; {EXPECTED_IMAGE}")
    sizes = sorted({1, 3, 4, channels})
    is_hwc, is_chw = tensor.shape[-1] in sizes, tensor.shape[0] in sizes
    if is_hwc and (channels_last_first or not is_chw):
        return tensor.permute(2, 0, 1)
    if is_chw:
        return tensor
    shape = tuple(tensor.shape)
    raise ValueError(f"images[{index}] has shape {shape}: no axis of {sizes} channels; {EXPECTED_IMAGE}")


def _to_rgb_chw(image: Any, index: int, channels: int = 3) -> torch.Tensor:
    """Any supported image -> (channels, H, W) uint8 or float tensor on its original device, a view where possible.

    With 3 channels every image becomes RGB; with another count (a model with that `num_channels`) images are
    taken with their own channels, which must be that many (a PIL image with its EXIF orientation applied).
    """
    if _is_pil(image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"images[{index}] has size {image.height}x{image.width} (height x width); it is empty")
        if channels == 3:
            tensor = _numpy_to_tensor(np.asarray(_pil_to_rgb(image, index))).permute(2, 0, 1)
        else:
            array = np.asarray(PIL.ImageOps.exif_transpose(image))
            tensor = _channels_first(_numpy_to_tensor(array), channels_last_first=True, index=index, channels=channels)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):  # also str/object arrays
            raise ValueError(f"images[{index}] has dtype {image.dtype}; expected uint8 (0-255) or float (0-1)")
        tensor = _channels_first(_numpy_to_tensor(image), channels_last_first=True, index=index, channels=channels)
    elif isinstance(image, torch.Tensor):
        tensor = _channels_first(image.detach(), channels_last_first=False, index=index, channels=channels)
    else:
        raise ValueError(f"images[{index}] is a {type(image)}; {EXPECTED_IMAGE}")
    return _checked_channels(tensor, index, channels)


def _checked_channels(tensor: torch.Tensor, index: int, channels: int) -> torch.Tensor:
    """Check size, dtype and channels. For RGB (3): 1 channel -> 3 (a view), 4 channels -> drop alpha (a view);
    any other processor channel count must be the image's."""
    if tensor.shape[-2] == 0 or tensor.shape[-1] == 0:
        raise ValueError(
            f"images[{index}] has size {tensor.shape[-2]}x{tensor.shape[-1]} (height x width); it is empty"
        )
    if tensor.dtype != torch.uint8 and not tensor.is_floating_point():
        raise ValueError(f"images[{index}] has dtype {tensor.dtype}; expected uint8 (0-255) or float (0-1)")
    if channels == 3 and tensor.shape[0] == 1:
        return tensor.expand(3, -1, -1)
    if channels == 3 and tensor.shape[0] == 4:
        return tensor[:3]
    if tensor.shape[0] != channels:
        raise ValueError(f"images[{index}] has {tensor.shape[0]} channels; expected {channels}, one per value of "
                         "image_mean / image_std (the model's num_channels)")
    return tensor


# ---------------------------------------------------------------------------------------------------------------
# resize and normalise into the batch tensor
# ---------------------------------------------------------------------------------------------------------------
def _resize_in_uint8(image: torch.Tensor) -> bool:
    """uint8 on CPU: PyTorch's fast channels-last uint8 antialias kernel; elsewhere float32 (CUDA has none)."""
    return image.dtype == torch.uint8 and image.device.type == "cpu"


def _resize_batch(images: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, h, w), bilinear with antialiasing; uint8 stays uint8 on CPU, otherwise float32.

    Pixel values keep their scale (0-255 for uint8 inputs, 0-1 for float inputs).
    """
    if _resize_in_uint8(images):
        # the fast uint8 kernel wants channels-last memory; HWC inputs (PIL, numpy) already are, for free
        images = images.contiguous(memory_format=torch.channels_last)
    else:
        # one float32 copy (never float64); the float kernel is fastest on contiguous NCHW
        images = images.to(torch.float32, memory_format=torch.contiguous_format)
    if tuple(images.shape[-2:]) == tuple(out_hw):
        return images
    return F.interpolate(images, size=out_hw, mode="bilinear", antialias=True, align_corners=False)


def _stack_group(images: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Same-shape (C, H, W) images -> (N, C, H, W) on `device`, channels-last in memory (HWC inputs copy once)."""
    moved = [image.to(device) for image in images]
    if len(moved) == 1:
        return moved[0].unsqueeze(0)
    return torch.stack([image.permute(1, 2, 0) for image in moved]).permute(0, 3, 1, 2)


def _group_by_shape(images: list[torch.Tensor], out_sizes: list[tuple[int, int]]) -> dict[tuple, list[int]]:
    """Indices of images that can be resized in one call: same input shape, dtype and output size."""
    groups: dict[tuple, list[int]] = {}
    for i, (image, out_hw) in enumerate(zip(images, out_sizes)):
        groups.setdefault((tuple(image.shape), image.dtype, out_hw), []).append(i)
    return groups


def _affine_constants(
    is_uint8: bool,
    do_rescale: bool,
    rescale_factor: float,
    do_normalize: bool,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, bias), shape (C, 1, 1) float32 (C = len(mean)), so that rescale + normalise is one
    `x * scale + bias`.

    Float images are already in [0, 1], so `do_rescale` applies to uint8 images only.
    """
    rescale = rescale_factor if (do_rescale and is_uint8) else 1.0
    if do_normalize:
        scale = [rescale / s for s in std]
        bias = [-m / s for m, s in zip(mean, std)]
    else:
        scale, bias = [rescale] * len(mean), [0.0] * len(mean)
    as_tensor = lambda v: torch.tensor(v, dtype=torch.float32, device=device).view(-1, 1, 1)  # noqa: E731
    return as_tensor(scale), as_tensor(bias)


def _write_into_canvas(canvas: torch.Tensor, resized: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> None:
    """Write one resized (C, h, w) image into the top-left of its (C, H, W) canvas slot, rescale and normalise in
    place, and zero the bottom/right padding (the canvas is allocated uninitialised to save a pass)."""
    h, w = resized.shape[-2:]
    slot = canvas[:, :h, :w]
    slot.copy_(resized)  # converts uint8 -> float32 and channels-last -> planar in the same pass
    slot.mul_(scale).add_(bias)
    canvas[:, h:, :].zero_()
    canvas[:, :h, w:].zero_()


def _write_mask(mask: torch.Tensor, image_hw: tuple[int, int]) -> None:
    """(H, W) int64 mask: 1 on the image at the top left, 0 on the padding (written once, allocated uninitialised)."""
    h, w = image_hw
    mask[:h, :w] = 1
    mask[:h, w:] = 0
    mask[h:, :] = 0


# ---------------------------------------------------------------------------------------------------------------
# annotations
# ---------------------------------------------------------------------------------------------------------------
def _as_annotation_list(annotations: Any, num_images: int) -> list[Mapping]:
    """One dict per image (a single dict is allowed for a single image)."""
    if isinstance(annotations, Mapping):
        annotations = [annotations]
    if not isinstance(annotations, (list, tuple)):
        raise ValueError(f"annotations is a {type(annotations)}; expected a list with one dict per image")
    if len(annotations) != num_images:
        raise ValueError(
            f"got {num_images} images but {len(annotations)} annotations; pass exactly one annotation dict per image"
        )
    return list(annotations)


def _validate_annotation(annotation: Any, index: int, id2label: dict[int, str] | None) -> None:
    """Check one COCO detection annotation: {"image_id": int, "annotations": [{"bbox": [x, y, w, h], ...}]}."""
    where = f"annotations[{index}]"
    if not isinstance(annotation, Mapping) or not isinstance(annotation.get("annotations"), (list, tuple)):
        raise ValueError(
            f"{where} = {annotation!r:.200}; expected a COCO detection dict "
            "{'image_id': int, 'annotations': [{'bbox': [x, y, w, h], 'category_id': int, ...}, ...]}"
        )
    if not _is_int(annotation.get("image_id")):
        raise ValueError(f"{where}['image_id'] = {annotation.get('image_id')!r}; expected an int")
    for j, obj in enumerate(annotation["annotations"]):
        _validate_object(obj, f"{where}['annotations'][{j}]", id2label)


def _is_int(value: Any) -> bool:
    """Python, numpy or 0-d torch integers (anything with __index__), but not bools."""
    if isinstance(value, (bool, np.bool_)):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _validate_object(obj: Any, where: str, id2label: dict[int, str] | None) -> None:
    """One COCO object: bbox four finite numbers with width, height >= 0; category_id an int known to id2label."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where} is a {type(obj)}; expected a dict with 'bbox' and 'category_id'")
    bbox = obj.get("bbox")
    try:
        values = np.asarray(bbox, dtype=np.float64)
    except (TypeError, ValueError):
        values = np.zeros(0)
    if values.shape != (4,) or not np.isfinite(values).all():
        raise ValueError(
            f"{where}['bbox'] = {bbox!r}; expected four finite numbers [x, y, width, height] "
            "in absolute pixels of the original image (COCO format)"
        )
    if values[2] < 0 or values[3] < 0:
        raise ValueError(
            f"{where}['bbox'] = {bbox!r} has a negative width or height; COCO boxes are [x, y, width, height] "
            "with width, height >= 0 (was it given as [x0, y0, x1, y1]?)"
        )
    category_id = obj.get("category_id")
    if not _is_int(category_id):
        raise ValueError(f"{where}['category_id'] = {category_id!r}; expected an int")
    if id2label is not None and int(category_id) not in id2label:
        known = sorted(id2label)
        raise ValueError(
            f"{where}['category_id'] = {category_id!r} is not in id2label (ids {known[:20]}"
            f"{' ...' if len(known) > 20 else ''})"
        )


# Where EXIF orientation k (2-8) moves the point (x, y) of a stored image of size (w, h): the point maps of
# PIL.ImageOps.exif_transpose's flips and rotations (6 turns the image 90 degrees clockwise, 8 counter-clockwise).
_EXIF_POINT_MAPS = {
    2: lambda x, y, w, h: (w - x, y),
    3: lambda x, y, w, h: (w - x, h - y),
    4: lambda x, y, w, h: (x, h - y),
    5: lambda x, y, w, h: (y, x),
    6: lambda x, y, w, h: (h - y, x),
    7: lambda x, y, w, h: (h - y, w - x),
    8: lambda x, y, w, h: (y, w - x),
}


def _exif_rotated_box(bbox: Any, orientation: int, width: int, height: int) -> list[float]:
    """COCO [x, y, w, h] absolute pixels of the stored (width x height) image -> the same box on the image
    with its EXIF ``orientation`` applied, also [x, y, w, h]."""
    x, y, w, h = (float(v) for v in np.asarray(bbox, dtype=np.float64))
    move = _EXIF_POINT_MAPS[orientation]
    (ax, ay), (bx, by) = move(x, y, width, height), move(x + w, y + h, width, height)
    return [min(ax, bx), min(ay, by), abs(bx - ax), abs(by - ay)]


def _exif_rotated_annotation(annotation: Mapping, image: Any) -> Mapping:
    """The annotation of ``image`` with its boxes turned like the image when it is an EXIF-rotated PIL image.

    COCO boxes are in the stored pixel grid (as pycocotools and the original DETR read images); the processor
    applies the EXIF orientation to the pixels, so the boxes must follow or they would mark the wrong places.
    """
    orientation = _exif_orientation(image)
    if orientation not in _EXIF_POINT_MAPS:
        return annotation
    width, height = image.size
    objects = [{**obj, "bbox": _exif_rotated_box(obj["bbox"], orientation, width, height)}
               for obj in annotation["annotations"]]
    return {**annotation, "annotations": objects}


def _prepare_target(
    annotation: Mapping,
    orig_hw: tuple[int, int],
    new_hw: tuple[int, int],
    remove_crowd: bool,
) -> tuple[dict[str, torch.Tensor], int]:
    """COCO annotation of one image -> DETR target dict (CPU tensors) and the number of empty boxes dropped.

    Float32 arithmetic in the same order as transformers' DetrImageProcessor, so unpadded labels are identical.
    """
    objects = [o for o in annotation["annotations"] if not (remove_crowd and o.get("iscrowd", 0) == 1)]
    (orig_h, orig_w), (new_h, new_w) = orig_hw, new_hw
    # via numpy: bboxes may be lists, arrays or tensors; each number is rounded to float32 as transformers does
    boxes = torch.from_numpy(np.asarray([np.asarray(o["bbox"]) for o in objects], dtype=np.float32).reshape(-1, 4))
    boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy, absolute pixels of the original image
    boxes[:, 0::2] = boxes[:, 0::2].clip(min=0, max=orig_w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(min=0, max=orig_h)
    keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
    ratio_h, ratio_w = new_h / orig_h, new_w / orig_w
    boxes = boxes[keep] * torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h], dtype=torch.float32)
    boxes = _xyxy_to_cxcywh(boxes) / torch.tensor([new_w, new_h, new_w, new_h], dtype=torch.float32)
    area = [float(o["area"]) if "area" in o else float(o["bbox"][2]) * float(o["bbox"][3]) for o in objects]
    target = {
        "image_id": torch.tensor([int(annotation["image_id"])], dtype=torch.int64),
        "class_labels": torch.tensor([int(o["category_id"]) for o in objects], dtype=torch.int64)[keep],
        "boxes": boxes,
        "area": torch.tensor(area, dtype=torch.float32)[keep] * (ratio_w * ratio_h),
        "iscrowd": torch.tensor([int(o.get("iscrowd", 0)) for o in objects], dtype=torch.int64)[keep],
        "orig_size": torch.tensor([orig_h, orig_w], dtype=torch.int64),
        "size": torch.tensor([new_h, new_w], dtype=torch.int64),
    }
    return target, int((~keep).sum())


def _xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(n, 4) (x0, y0, x1, y1) -> (n, 4) (cx, cy, w, h), same units."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def _cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) (cx, cy, w, h) -> (..., 4) (x0, y0, x1, y1), same units."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def _detection_outputs(outputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, pred_boxes) of model outputs (attributes), a dict with those keys or a (logits, pred_boxes) pair.

    numpy arrays (what onnxruntime returns) are wrapped as CPU tensors without a copy; tensors pass unchanged.
    """
    if hasattr(outputs, "logits") and hasattr(outputs, "pred_boxes"):
        pair = outputs.logits, outputs.pred_boxes
    elif isinstance(outputs, Mapping) and "logits" in outputs and "pred_boxes" in outputs:
        pair = outputs["logits"], outputs["pred_boxes"]
    elif isinstance(outputs, (tuple, list)) and len(outputs) == 2:
        pair = tuple(outputs)
    else:
        raise ValueError(
            f"outputs is a {type(outputs).__name__}; expected model outputs with `logits` and `pred_boxes`, a dict "
            "with those keys or a (logits, pred_boxes) pair"
        )
    tensors = []
    for name, value in zip(("logits", "pred_boxes"), pair):
        if isinstance(value, np.ndarray):
            value = _numpy_to_tensor(value)
        elif not isinstance(value, torch.Tensor):
            raise ValueError(f"outputs {name} is a {type(value).__name__}; expected a torch tensor or a numpy array")
        tensors.append(value)
    return tensors[0], tensors[1]


def _check_threshold(threshold: Any) -> None:
    """ValueError naming `threshold` unless it is a real number (or a one-value real tensor) in [0, 1]; NaN is not."""
    if isinstance(threshold, torch.Tensor):
        is_number = threshold.numel() == 1 and not threshold.is_complex()
    else:
        is_number = isinstance(threshold, numbers.Real)
    if not (is_number and 0.0 <= float(threshold) <= 1.0):  # False for NaN too
        raise ValueError(f"threshold = {threshold!r}; expected a number in [0, 1] (detections scoring above it are "
                         "kept; scores are probabilities)")


def _to_numpy(value: Any) -> Any:
    """Tensors (also inside dicts/lists) -> numpy, for return_tensors="np"."""
    if isinstance(value, torch.Tensor):
        return value.cpu().numpy()
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_numpy(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------------------
# the processor
# ---------------------------------------------------------------------------------------------------------------
class DetrCustomImageProcessor(BaseImageProcessor):
    r"""DETR image processor: resize, rescale, normalise, pad to a batch and convert COCO boxes to DETR targets.

    Outputs (a `BatchFeature`):
        pixel_values (`torch.FloatTensor` of shape `(batch, C, H, W)`): normalised RGB (C = 3), or the images' own
            C channels when `image_mean` / `image_std` have C != 3 values; zero in the padding; `H, W` is the
            largest resized image of the batch (or `pad_size`); each image sits at the top left.
        pixel_mask (`torch.LongTensor` of shape `(batch, H, W)`): 1 on real pixels, 0 on padding.
        labels (`list[dict]`, only with `annotations`): per image
            class_labels (`int64 (n,)`), boxes (`float32 (n, 4)`: (cx, cy, w, h) normalised to [0, 1] by the
            UNPADDED resized image size, as in the original DETR), area (`float32 (n,)`: pixels of the resized
            image), iscrowd (`int64 (n,)`), orig_size (`int64 (2,)`: (h, w) before resizing), size (`int64 (2,)`:
            (h, w) after resizing, without padding), image_id (`int64 (1,)`).

    Args:
        do_resize: resize so that the short side is `size["shortest_edge"]` and the long side at most
            `size["longest_edge"]` (aspect ratio kept), or to exactly `size["height"] x size["width"]`.
        size: see `do_resize`; defaults to {"shortest_edge": 800, "longest_edge": 1333} (DETR evaluation).
        do_rescale: multiply uint8 pixels by `rescale_factor` (1/255). Float images are taken to be in [0, 1].
        rescale_factor: see `do_rescale`.
        do_normalize: subtract `image_mean` and divide by `image_std` (per channel, ImageNet by default).
        image_mean, image_std: one float per channel: 3 for RGB (ImageNet's by default; a single number is used
            for all three), or C for a model with `num_channels` C, which then takes C-channel images as they are
            (as transformers' DetrImageProcessor takes 4-channel images).
        do_pad: pad bottom/right with zeros to the batch maximum, or to `pad_size` if given.
        pad_size: optional fixed canvas {"height": int, "width": int}. With `do_resize`, it must hold the images
            `size` resizes to in at least one orientation: {height} x {width} for an exact size; s' x L or L x s'
            with s' = min(shortest_edge, longest_edge), L = longest_edge (e.g. 48 x 80 for {"shortest_edge": 48,
            "longest_edge": 80}: every landscape image fits); shortest_edge x shortest_edge without a longest edge.
            A smaller one is a ValueError where it is set (constructor, `from_dict` / `from_pretrained`, or assigning
            `pad_size`, `size` or `do_resize`). A batch image that still does not fit is a ValueError naming it.
        remove_crowd: drop COCO crowd boxes (`iscrowd == 1`) from the targets, as the original DETR does.
        id2label: optional {class id: name}; if given, every annotation's category_id must be one of its keys.

    Images: a resize that would leave a side of 0 px (an image more elongated than its resize can keep, e.g. 5000x1
    at the default size) and an image of more than `max_image_pixels()` pixels as given or resized (PIL's
    decompression-bomb limit, 178,956,970 px by default) are ValueErrors naming the image and its size.

    After each call, `last_num_dropped_boxes` holds, per image, how many boxes were dropped because they were
    empty after clipping to the image (crowd boxes are not counted); a warning is logged when any were dropped.
    """

    model_input_names = ["pixel_values", "pixel_mask"]
    valid_kwargs = DetrCustomImageProcessorKwargs

    def __init__(
        self,
        do_resize: bool = True,
        size: dict[str, int] | int | None = None,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        do_pad: bool = True,
        pad_size: dict[str, int] | None = None,
        remove_crowd: bool = True,
        id2label: Mapping[int, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.do_resize = bool(do_resize)
        self.size = _validate_size(DEFAULT_SIZE if size is None else size)
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.image_mean, self.image_std = self._mean_and_std(IMAGENET_MEAN if image_mean is None else image_mean,
                                                             IMAGENET_STD if image_std is None else image_std)
        self.do_pad = bool(do_pad)
        self.pad_size = _validate_pad_size(pad_size)
        self.remove_crowd = bool(remove_crowd)
        self.id2label = _id2label_with_int_keys(id2label)
        self.last_num_dropped_boxes: list[int] = []

    def __setattr__(self, name: str, value: Any) -> None:
        """`do_resize`, `size` and `pad_size` are checked together wherever they are set (the constructor,
        `from_dict` and plain assignment): a `pad_size` that cannot hold the resized images is refused, and the
        attribute keeps its old value."""
        if name in RESIZE_SETTINGS:
            value = {"do_resize": bool, "size": _validate_size, "pad_size": _validate_pad_size}[name](value)
            settings = {key: self.__dict__.get(key) for key in RESIZE_SETTINGS} | {name: value}
            if settings["size"] is not None:
                _check_pad_size_holds_resized_images(settings["size"], settings["pad_size"], settings["do_resize"])
        super().__setattr__(name, value)

    @staticmethod
    def _mean_and_std(mean: Sequence[float] | float, std: Sequence[float] | float) -> tuple[list[float], list[float]]:
        """Mean and std as JSON-friendly lists of floats, one per image channel, as many of each."""
        mean, std = _channel_floats(mean, "image_mean"), _channel_floats(std, "image_std")
        if len(mean) != len(std):
            raise ValueError(f"image_mean has {len(mean)} values and image_std {len(std)}; expected as many of each, "
                             "one per image channel")
        return mean, std

    def to_dict(self) -> dict[str, Any]:
        """Settings only (JSON-serialisable); the per-call statistics are not saved."""
        output = super().to_dict()
        output.pop("last_num_dropped_boxes", None)
        return output

    def __call__(self, images: Any, annotations: Any = None, **kwargs: Any) -> BatchFeature:
        """Same as `preprocess`."""
        return self.preprocess(images, annotations=annotations, **kwargs)

    def preprocess(
        self,
        images: Any,
        annotations: Mapping | Sequence[Mapping] | None = None,
        return_tensors: str | None = "pt",
        do_resize: bool | None = None,
        size: dict[str, int] | int | None = None,
        do_rescale: bool | None = None,
        do_normalize: bool | None = None,
        do_pad: bool | None = None,
        pad_size: dict[str, int] | None = None,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Turn images (and optional COCO annotations) into DETR model inputs.

        Args:
            images: one image or a list. Each is a `PIL.Image.Image` (any mode; EXIF orientation applied), a
                numpy array `(H, W, C)` / `(H, W)` or a torch tensor `(C, H, W)` / `(H, W)`, with C in 1, 3, 4
                (RGB processing) or C = len(image_mean), dtype uint8 (0-255) or float (0-1). A 4-D torch
                `(B, C, H, W)` / numpy `(B, H, W, C)` batch works too.
            annotations: for training, one COCO detection dict per image: {"image_id": int, "annotations":
                [{"bbox": [x, y, w, h] (absolute pixels of the original image as stored: an EXIF-rotated PIL
                image has its boxes rotated with it), "category_id": int,
                "area": float (optional, defaults to w * h), "iscrowd": 0 or 1 (optional)}, ...]}.
            return_tensors: "pt" (or None) for torch tensors, "np" for numpy arrays.
            do_resize, size, do_rescale, do_normalize, do_pad, pad_size: override the processor's settings.
            device: where to do the work and return the tensors ("cpu", "cuda", ...). Default: the device of the
                first image if it is a torch tensor, else CPU.
            **kwargs: `remove_crowd`, `id2label`, `rescale_factor`, `image_mean`, `image_std` override settings.

        Returns:
            `BatchFeature` with `pixel_values` (B, C, H, W) float32, `pixel_mask` (B, H, W) int64 and, with
            annotations, `labels` (see the class docstring).
        """
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors = {return_tensors!r}; expected 'pt', 'np' or None")
        opts = self._options(do_resize, size, do_rescale, do_normalize, do_pad, pad_size, kwargs)
        image_list = _as_image_list(images)
        annotation_list = None
        if annotations is not None:
            annotation_list = _as_annotation_list(annotations, len(image_list))
            for i, annotation in enumerate(annotation_list):
                _validate_annotation(annotation, i, opts["id2label"])
            annotation_list = [_exif_rotated_annotation(a, image) for a, image in zip(annotation_list, image_list)]
        tensors = [_to_rgb_chw(image, i, len(opts["image_mean"])) for i, image in enumerate(image_list)]
        target_device = self._target_device(device, tensors)
        orig_sizes = [tuple(t.shape[-2:]) for t in tensors]
        new_sizes = [_output_size(hw, opts["size"] if opts["do_resize"] else None) for hw in orig_sizes]
        limit = max_image_pixels()
        for i, (orig_hw, new_hw) in enumerate(zip(orig_sizes, new_sizes)):
            _check_image_size(i, orig_hw, new_hw, opts["size"] if opts["do_resize"] else None, limit)
        pixel_values, pixel_mask = self._build_batch(tensors, new_sizes, opts, target_device)
        data = {"pixel_values": pixel_values, "pixel_mask": pixel_mask}
        if annotation_list is not None:
            data["labels"] = self._targets(annotation_list, orig_sizes, new_sizes, opts, target_device)
        if return_tensors == "np":
            data = {k: _to_numpy(v) for k, v in data.items()}
        return BatchFeature(data=data)

    def _options(
        self,
        do_resize: bool | None,
        size: Any,
        do_rescale: bool | None,
        do_normalize: bool | None,
        do_pad: bool | None,
        pad_size: Any,
        kwargs: dict[str, Any],
    ) -> dict[str, Any]:
        """Per-call settings: the arguments given, the processor's attributes for the rest."""
        pick = lambda value, name: getattr(self, name) if value is None else value  # noqa: E731
        unknown = set(kwargs) - {"remove_crowd", "id2label", "rescale_factor", "image_mean", "image_std"}
        if unknown:
            logger.warning_once(f"DetrCustomImageProcessor ignores the arguments {sorted(unknown)}")
        image_mean, image_std = self._mean_and_std(pick(kwargs.get("image_mean"), "image_mean"),
                                                   pick(kwargs.get("image_std"), "image_std"))
        return {
            "do_resize": pick(do_resize, "do_resize"),
            "size": _validate_size(pick(size, "size")),
            "do_rescale": pick(do_rescale, "do_rescale"),
            "rescale_factor": float(pick(kwargs.get("rescale_factor"), "rescale_factor")),
            "do_normalize": pick(do_normalize, "do_normalize"),
            "image_mean": image_mean,
            "image_std": image_std,
            "do_pad": pick(do_pad, "do_pad"),
            "pad_size": _validate_pad_size(pick(pad_size, "pad_size")),
            "remove_crowd": pick(kwargs.get("remove_crowd"), "remove_crowd"),
            "id2label": _id2label_with_int_keys(pick(kwargs.get("id2label"), "id2label")),
        }

    @staticmethod
    def _target_device(device: str | torch.device | None, tensors: list[torch.Tensor]) -> torch.device:
        """The requested device, else the first image's (a tensor already on a GPU stays there)."""
        return torch.device(device) if device is not None else tensors[0].device

    def _build_batch(
        self,
        tensors: list[torch.Tensor],
        new_sizes: list[tuple[int, int]],
        opts: dict[str, Any],
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Resize every image straight into one preallocated (B, C, H, W) float32 canvas; build the (B, H, W) mask."""
        if opts["do_pad"]:
            canvas_hw = _padded_size(new_sizes, opts["pad_size"])
        elif len(set(new_sizes)) > 1:
            raise ValueError(
                f"do_pad=False but the resized images differ in size ({sorted(set(new_sizes))}); "
                "they cannot be stacked into one batch: use do_pad=True"
            )
        else:
            canvas_hw = new_sizes[0]
        channels = len(opts["image_mean"])
        pixel_values = torch.empty((len(tensors), channels, *canvas_hw), dtype=torch.float32, device=device)
        # both uninitialised: every element is written exactly once below (fresh memory is costly to touch twice)
        pixel_mask = torch.empty((len(tensors), *canvas_hw), dtype=torch.int64, device=device)
        for (_, dtype, out_hw), indices in _group_by_shape(tensors, new_sizes).items():
            resized = _resize_batch(_stack_group([tensors[i] for i in indices], device), out_hw)
            scale, bias = _affine_constants(
                dtype == torch.uint8,
                opts["do_rescale"],
                opts["rescale_factor"],
                opts["do_normalize"],
                opts["image_mean"],
                opts["image_std"],
                device,
            )
            for k, i in enumerate(indices):
                _write_into_canvas(pixel_values[i], resized[k], scale, bias)
                _write_mask(pixel_mask[i], out_hw)
        return pixel_values, pixel_mask

    def _targets(
        self,
        annotations: list[Mapping],
        orig_sizes: list[tuple[int, int]],
        new_sizes: list[tuple[int, int]],
        opts: dict[str, Any],
        device: torch.device,
    ) -> list[dict[str, torch.Tensor]]:
        """DETR targets for every image, on `device`; records and logs the number of empty boxes dropped."""
        labels, dropped = [], []
        for annotation, orig_hw, new_hw in zip(annotations, orig_sizes, new_sizes):
            target, num_dropped = _prepare_target(annotation, orig_hw, new_hw, opts["remove_crowd"])
            labels.append({k: v.to(device) for k, v in target.items()})
            dropped.append(num_dropped)
        self.last_num_dropped_boxes = dropped
        if sum(dropped):
            where = ", ".join(f"images[{i}]: {n}" for i, n in enumerate(dropped) if n)
            logger.warning(f"Dropped {sum(dropped)} box(es) with zero area after clipping to the image ({where})")
        return labels

    def post_process_object_detection(
        self,
        outputs: Any,
        threshold: float = 0.5,
        target_sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
        top_k: int | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """DETR outputs -> detections per image.

        Args:
            outputs: an object with `logits` `(B, Q, C + 1)` (the last class is "no object") and `pred_boxes`
                `(B, Q, 4)`, (cx, cy, w, h) normalised to [0, 1] by each image's own unpadded size; or a dict with
                those keys, or a (logits, pred_boxes) pair. Torch tensors or numpy arrays (e.g. onnxruntime's
                outputs, which give the same results as the equal torch tensors).
            threshold: keep detections whose score is strictly above it; a number in [0, 1] (a score is a
                probability), anything else (NaN included) is a ValueError naming it.
            target_sizes: `(B, 2)` tensor or list of (height, width): the size to express boxes in, normally each
                image's original size. None keeps normalised coordinates.
            top_k: keep at most this many detections per image, the best first.

        Returns:
            One dict per image of tensors: `scores` float32 (n,), `labels` int64 (n,), `boxes` float32 (n, 4)
            (x0, y0, x1, y1) in absolute pixels of `target_sizes` (or normalised), clipped to the image.
            Detections are in query order, or sorted by score when `top_k` is given.
        """
        _check_threshold(threshold)
        logits, pred_boxes = _detection_outputs(outputs)
        # softmax over all C + 1 classes, then ignore "no object": a score is P(class) for the best real class
        scores, labels = logits.float().softmax(-1)[..., :-1].max(-1)
        boxes = _cxcywh_to_xyxy(pred_boxes.float())
        limits = self._box_limits(target_sizes, len(logits), boxes.device)  # (B, 4): w, h, w, h
        boxes = torch.minimum((boxes * limits[:, None, :]).clamp(min=0), limits[:, None, :])
        results = []
        for image_scores, image_labels, image_boxes in zip(scores, labels, boxes):
            keep = torch.nonzero(image_scores > threshold).squeeze(1)
            if top_k is not None:
                keep = keep[image_scores[keep].argsort(descending=True)[:top_k]]
            results.append({"scores": image_scores[keep], "labels": image_labels[keep], "boxes": image_boxes[keep]})
        return results

    @staticmethod
    def _box_limits(target_sizes: Any, batch_size: int, device: torch.device) -> torch.Tensor:
        """(B, 4) float32 (w, h, w, h) scale and clip limits; all ones when target_sizes is None."""
        if target_sizes is None:
            return torch.ones((batch_size, 4), device=device)
        if isinstance(target_sizes, torch.Tensor):
            sizes = target_sizes.to(device=device, dtype=torch.float32)
        else:
            sizes = torch.tensor([[float(h), float(w)] for h, w in target_sizes], device=device)
        if sizes.shape != (batch_size, 2):
            raise ValueError(
                f"target_sizes has shape {tuple(sizes.shape)}; expected ({batch_size}, 2): one (height, width) "
                "per image of the batch"
            )
        height, width = sizes.unbind(1)
        return torch.stack([width, height, width, height], dim=1)


DetrCustomImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["DetrCustomImageProcessor", "get_size_with_aspect_ratio", "pil_to_rgb8"]
