"""The upload folder of a trained model: build it, verify it in a fresh process, upload it (`push_model_folder`).

Not remote code: nothing in the model, config or processor files imports this package. The steps, and what
each guarantees, are told in the package's docstring (`modeling_detr_custom.hub`); the model card is `card`'s.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..checks import follow_umask, load_checked, reporting_write_errors
from ..image_processing_detr_custom import DetrCustomImageProcessor
from ..modeling_detr_custom import DetrCustomForObjectDetection
from ..outputs import WEIGHTS_FILE
from .card import (
    DEFAULT_LICENSE,
    card_context,
    find_eval_file,
    is_rendered_card,
    read_json_object,
    read_metrics,
    read_training_info,
    render_model_card,
)
from .errors import HubError, UploadError, VerificationError

REMOTE_CODE_AUTO_CLASSES = ("AutoConfig", "AutoModel", "AutoModelForObjectDetection")
REQUIRED_FILES = (WEIGHTS_FILE, "config.json", "preprocessor_config.json", "README.md")
# Same code, same weights, same CPU: differences beyond float32 rounding mean the folder is not the model.
OUTPUT_ATOL = 1e-5
VERIFY_TIMEOUT_S = 900


# ----------------------------------------------------------------------------- arguments


def check_repo_id(repo_id: str) -> str:
    """Return ``repo_id`` if it is a syntactically valid model repo id (``name`` or ``namespace/name``).

    Cheap and offline, so `train.py --push_to_hub` can call it before training starts.
    Raises ValueError naming the bad id.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"invalid Hub repo id {repo_id!r}: {err}") from None
    return repo_id


def default_local_dir(model_dir: str | os.PathLike) -> Path:
    """Where the upload folder goes when none is given: ``<model_dir>-hub`` beside the model folder."""
    model_dir = Path(model_dir).resolve()
    return model_dir.with_name(model_dir.name + "-hub")


def _is_previous_build(folder: Path) -> bool:
    """A folder this package built before (safe to replace): config.json and a README.md it rendered."""
    return (folder / "config.json").is_file() and is_rendered_card(folder / "README.md")


def _prepare_local_dir(local_dir: Path, model_dir: Path) -> None:
    """Make ``local_dir`` an empty folder, refusing anything that could delete the user's files."""
    if local_dir == model_dir or local_dir in model_dir.parents:
        raise HubError(f"local_dir {local_dir} is or contains model_dir {model_dir}; choose a separate folder")
    if local_dir.exists() and not local_dir.is_dir():
        raise HubError(f"local_dir {local_dir} exists and is not a folder")
    if local_dir.is_dir() and any(local_dir.iterdir()):
        if not _is_previous_build(local_dir):
            raise HubError(f"local_dir {local_dir} is not empty and is not a previous upload folder; "
                           "choose a new or empty folder (nothing was deleted)")
        shutil.rmtree(local_dir)  # a stale build: rebuilt from scratch so no old file is uploaded
    local_dir.mkdir(parents=True, exist_ok=True)


# ----------------------------------------------------------------------------- build


def load_source(model_dir: Path) -> tuple[DetrCustomForObjectDetection, DetrCustomImageProcessor]:
    """The model (eval mode, CPU, float32) and image processor saved in ``model_dir``."""
    for name in ("config.json", "preprocessor_config.json"):
        if not (model_dir / name).is_file():
            raise HubError(f"{model_dir} has no {name}: save the model and its image processor there with "
                           "save_pretrained (train.py does both)")
    try:  # corrupt, incomplete or non-finite weights, an unreadable config: nothing to ship
        model = load_checked(DetrCustomForObjectDetection, model_dir, dtype=torch.float32).eval()
        processor = DetrCustomImageProcessor.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise HubError(f"cannot load the model in {model_dir}: {' '.join(str(err).split())}") from None
    return model, processor


def _auto_map(config_file: Path) -> dict[str, Any]:
    """The ``auto_map`` of a saved config file; {} when the file does not exist."""
    return read_json_object(config_file).get("auto_map", {}) if config_file.is_file() else {}


def _check_folder(folder: Path) -> None:
    """The files and auto_map entries a remote-code folder needs; HubError naming what is missing."""
    missing = [n for n in REQUIRED_FILES if not (folder / n).is_file()]
    auto_map = _auto_map(folder / "config.json")
    missing += [f"config.json auto_map[{k}]" for k in REMOTE_CODE_AUTO_CLASSES if k not in auto_map]
    if (folder / "preprocessor_config.json").is_file() and \
            "AutoImageProcessor" not in _auto_map(folder / "preprocessor_config.json"):
        missing.append("preprocessor_config.json auto_map[AutoImageProcessor]")
    modules = {v.split(".")[0] for v in auto_map.values() if isinstance(v, str)}
    missing += [f"{m}.py" for m in sorted(modules) if not (folder / f"{m}.py").is_file()]
    if missing:
        raise HubError(f"the folder {folder} is incomplete: missing {', '.join(missing)}")


def save_folder(model: DetrCustomForObjectDetection, processor: DetrCustomImageProcessor, folder: Path) -> None:
    """save_pretrained of both: weights, configs with auto_map, and every remote-code file; modes as the umask
    gives any new file (safetensors writes its weights 0600)."""
    model.save_pretrained(folder)
    # Records AutoImageProcessor in preprocessor_config.json's auto_map and ships the processor's module;
    # idempotent, and harmless once image_processing_detr_custom.py registers itself.
    type(processor).register_for_auto_class("AutoImageProcessor")
    processor.save_pretrained(folder)
    follow_umask(folder)


# ----------------------------------------------------------------------------- verify in a fresh process

# Runs under `python -I` in an empty cwd: only the folder's own remote code can provide the classes.
_VERIFY_SCRIPT = r"""
import importlib.util, json, sys
import torch
from PIL import Image
from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForObjectDetection, pipeline)

folder, out_path, *image_paths = sys.argv[1:]
images = [Image.open(p).convert("RGB") for p in image_paths]
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
detector = AutoModelForObjectDetection.from_pretrained(folder, trust_remote_code=True).eval()
base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
inputs = processor(images=images, return_tensors="pt")
with torch.no_grad():
    outputs = detector(**inputs)
    base_outputs = base(**inputs)
found = pipeline("object-detection", model=folder, trust_remote_code=True)(images[0], threshold=0.0)
torch.save({
    "pixel_values": inputs["pixel_values"], "pixel_mask": inputs["pixel_mask"],
    "logits": outputs.logits, "pred_boxes": outputs.pred_boxes,
    "base_last_hidden_state": base_outputs.last_hidden_state,
    "pipeline": found,
    "classes": [type(o).__module__ + "." + type(o).__name__ for o in (config, processor, detector, base)],
    "package_importable": importlib.util.find_spec("modeling_detr_custom") is not None,
}, out_path)
"""


def verification_images() -> list[Image.Image]:
    """Two RGB test images of different aspect ratios (so the batch is padded), deterministic."""
    rng = np.random.default_rng(0)
    images = []
    for h, w in ((96, 128), (120, 72)):
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        image = Image.fromarray(pixels, mode="RGB")
        ImageDraw.Draw(image).rectangle([w // 4, h // 4, w // 2, h // 2], fill=(255, 0, 0))
        images.append(image)
    return images


def fresh_process_env(modules_cache: Path) -> dict[str, str]:
    """Environment of the verifying process: offline, no PYTHONPATH, its own remote-code module cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(modules_cache),
               TOKENIZERS_PARALLELISM="false")
    return env


def _run_fresh(folder: Path, work: Path, image_paths: list[Path], timeout: float) -> dict[str, Any]:
    out_path = work / "outputs.pt"
    cmd = [sys.executable, "-I", "-c", _VERIFY_SCRIPT, str(folder), str(out_path), *map(str, image_paths)]
    try:
        proc = subprocess.run(cmd, cwd=work, env=fresh_process_env(work / "modules"), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise VerificationError(f"loading {folder} in a fresh process took more than {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise VerificationError(f"{folder} does not load in a fresh offline process with trust_remote_code=True "
                                f"(exit {proc.returncode}):\n{tail}")
    return torch.load(out_path, weights_only=True)


@torch.no_grad()
def reference_outputs(model: DetrCustomForObjectDetection, processor: DetrCustomImageProcessor,
                      images: list[Image.Image]) -> dict[str, Any]:
    """What the fresh process must reproduce: batch tensors, outputs and the pipeline's view of images[0]."""
    inputs = processor(images=images, return_tensors="pt")
    outputs = model(**inputs)
    base_outputs = model.model(inputs["pixel_values"], inputs["pixel_mask"])
    single = model(**processor(images=images[:1], return_tensors="pt"))
    (found,) = processor.post_process_object_detection(single, threshold=0.0,
                                                       target_sizes=[(images[0].height, images[0].width)])
    return {"pixel_values": inputs["pixel_values"], "pixel_mask": inputs["pixel_mask"], "logits": outputs.logits,
            "pred_boxes": outputs.pred_boxes, "base_last_hidden_state": base_outputs.last_hidden_state,
            "pipeline": [{"score": float(s), "label": model.config.id2label[int(label_id)], "box": b.tolist()}
                         for s, label_id, b in zip(found["scores"], found["labels"], found["boxes"])]}


def compare_outputs(reference: Mapping[str, Any], loaded: Mapping[str, Any], atol: float = OUTPUT_ATOL) -> list[str]:
    """Differences between the source model's outputs and the fresh process's; [] when they agree.

    Pipeline boxes are integers (the pipeline truncates xyxy pixels), so they may differ by 1 px.
    """
    problems = []
    for key in ("pixel_values", "pixel_mask", "logits", "pred_boxes", "base_last_hidden_state"):
        ref, got = reference[key], loaded[key]
        if ref.shape != got.shape:
            problems.append(f"{key}: shape {tuple(got.shape)} != source {tuple(ref.shape)}")
        elif not bool(torch.isfinite(ref.float()).all() & torch.isfinite(got.float()).all()):
            problems.append(f"{key}: NaN or Inf in the outputs (no tolerance check can pass them)")
        elif (ref.float() - got.float()).abs().max() > atol:
            problems.append(f"{key}: max abs difference {(ref.float() - got.float()).abs().max():.3g} > {atol}")
    ref_found, got_found = reference["pipeline"], loaded["pipeline"]
    if len(ref_found) != len(got_found):
        problems.append(f"pipeline: {len(got_found)} detections != source {len(ref_found)}")
    for i, (ref, got) in enumerate(zip(ref_found, got_found)):
        box = [got["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")]
        if got["label"] != ref["label"] or abs(got["score"] - ref["score"]) > atol or \
                max(abs(a - b) for a, b in zip(box, ref["box"])) > 1.0:
            problems.append(f"pipeline detection {i}: {got} != source {ref}")
            break
    return problems


def verify_folder(folder: str | os.PathLike, model: DetrCustomForObjectDetection,
                  processor: DetrCustomImageProcessor, timeout: float = VERIFY_TIMEOUT_S) -> dict[str, Any]:
    """Load ``folder`` in a fresh offline process through the Auto classes and the pipeline
    (trust_remote_code=True) and check its outputs equal ``model``'s on a padded test batch.

    Returns the fresh process's report; raises VerificationError naming every difference.
    """
    folder = Path(folder).resolve()
    images = verification_images()
    with tempfile.TemporaryDirectory(prefix="detr_custom_verify_") as tmp:
        work = Path(tmp)
        paths = [work / f"image{i}.png" for i in range(len(images))]
        for image, path in zip(images, paths):
            image.save(path)
        loaded = _run_fresh(folder, work, paths, timeout)
    not_remote = [c for c in loaded["classes"] if not c.startswith("transformers_modules.")]
    problems = [f"{c} was not loaded from the folder's remote code" for c in not_remote]
    problems += compare_outputs(reference_outputs(model, processor, images), loaded)
    if problems:
        raise VerificationError(f"{folder} loaded in a fresh process differs from the source model:\n  "
                                + "\n  ".join(problems))
    return loaded


# ----------------------------------------------------------------------------- upload


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exception types meaning 'could not reach the server' for the HTTP client huggingface_hub uses."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _keep_note(folder: Path, repo_id: str) -> str:
    return f"The folder is complete and kept at {folder}; upload it later with `hf upload {repo_id} {folder}`."


def _explain_http_error(err: Exception, repo_id: str) -> str:
    status = getattr(getattr(err, "response", None), "status_code", None)
    reasons = {401: "the Hub rejected the token (401 Unauthorized): log in again with `hf auth login` or set "
                    "HF_TOKEN to a valid token with write access",
               403: f"the token may not write to {repo_id!r} (403 Forbidden): check the namespace (your user or an "
                    "organisation you can write to) and that the token has write access",
               400: f"the Hub rejected the repo id {repo_id!r} (400 Bad Request)",
               422: f"the Hub rejected the repo id {repo_id!r} (422)"}
    return reasons.get(status, f"the Hub answered HTTP {status}") + f": {err}"


def check_can_upload(token: str | None = None) -> str:
    """The token to upload with; UploadError when offline mode is on or no token is configured (no network)."""
    from huggingface_hub import constants, get_token

    if constants.is_offline_mode():
        raise UploadError("cannot upload: offline mode is enabled (HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1); "
                          "unset it to upload")
    token = token or get_token()
    if not token:
        raise UploadError("cannot upload: no Hugging Face token; run `hf auth login` or set HF_TOKEN "
                          "to a token with write access")
    return token


def upload_folder(folder: Path, repo_id: str, private: bool = False, commit_message: str | None = None,
                  token: str | None = None) -> tuple[str, str]:
    """create_repo(exist_ok=True) + upload_folder; returns (full repo id, commit hash).

    Raises UploadError naming the cause (offline, no token, network, token rejected, repo id rejected).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    token = check_can_upload(token)
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=url.repo_id, folder_path=folder, repo_type="model",
                                 commit_message=commit_message or f"Upload detr-custom model from {folder.name}")
    except HfHubHTTPError as err:
        raise UploadError(f"upload to {repo_id!r} failed: {_explain_http_error(err, repo_id)}") from None
    except OfflineModeIsEnabled:
        raise UploadError("cannot upload: offline mode is enabled (HF_HUB_OFFLINE=1)") from None
    except _network_errors() as err:
        raise UploadError(f"cannot reach the Hugging Face Hub (no network?): {type(err).__name__}: {err}") from None
    return url.repo_id, info.oid


def pin_card_revision(folder: Path, repo_id: str, revision: str, context: dict[str, str],
                      token: str | None = None) -> None:
    """Re-render README.md with the uploaded commit and the full repo id, locally and on the Hub.

    Best effort: the model is already uploaded, so a failure here is only reported.
    """
    from huggingface_hub import HfApi

    context = {**context, "repo_id": repo_id, "revision": revision}
    (folder / "README.md").write_text(render_model_card(context))
    try:
        HfApi(token=token).upload_file(path_or_fileobj=folder / "README.md", path_in_repo="README.md",
                                       repo_id=repo_id, commit_message=f"Model card: pin revision {revision[:10]}")
    except Exception as err:  # noqa: BLE001 - the upload itself succeeded; say what is left to do
        print(f"warning: the model is uploaded, but updating README.md with the pinned revision failed: {err}",
              file=sys.stderr)


# ----------------------------------------------------------------------------- the whole path


def build_model_folder(model_dir: str | os.PathLike, repo_id: str, local_dir: str | os.PathLike | None = None,
                       metrics_file: str | os.PathLike | None = None,
                       training_info: Mapping[str, Any] | None = None, license: str = DEFAULT_LICENSE,
                       verify: bool = True) -> tuple[Path, dict[str, str]]:
    """Build (and by default verify) the upload folder; returns (folder, model card context)."""
    check_repo_id(repo_id)
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]*", license):
        raise ValueError(f"license {license!r} must be a Hub license id such as 'apache-2.0' or 'mit'")
    model_dir = Path(model_dir).resolve()
    if not model_dir.is_dir():
        raise HubError(f"model folder not found: {model_dir}")
    folder = Path(local_dir).resolve() if local_dir is not None else default_local_dir(model_dir)
    eval_file = find_eval_file(model_dir, metrics_file)
    metrics = read_metrics(eval_file)  # before touching local_dir: a bad metrics file deletes nothing
    info = read_training_info(model_dir, training_info, eval_file)
    model, processor = load_source(model_dir)
    context = card_context(model, processor, repo_id, metrics, eval_file, info, license=license)
    with reporting_write_errors(folder):  # a read-only place or a full disk: one line naming the path
        _prepare_local_dir(folder, model_dir)
        save_folder(model, processor, folder)
        (folder / "README.md").write_text(render_model_card(context))
    _check_folder(folder)
    if verify:
        verify_folder(folder, model, processor)
    return folder, context


def push_model_folder(model_dir: str | os.PathLike, repo_id: str, local_dir: str | os.PathLike | None = None,
                      private: bool = False, commit_message: str | None = None,
                      metrics_file: str | os.PathLike | None = None, training_info: Mapping[str, Any] | None = None,
                      upload: bool = True, token: str | None = None, license: str = DEFAULT_LICENSE) -> Path:
    """Build the exact upload folder from ``model_dir``, verify it in a fresh process, then upload it.

    Args:
        model_dir: a folder written by model.save_pretrained + processor.save_pretrained (train.py's output_dir),
            optionally with ``training_args.json`` and ``all_results.json`` / ``eval_results.json``.
        repo_id: ``name`` or ``namespace/name`` on the Hub.
        local_dir: where to build the folder (default ``<model_dir>-hub``); replaced if it is a previous build,
            refused if it holds anything else.
        private: create the repo private (an existing repo keeps its visibility).
        commit_message: message of the upload commit.
        metrics_file: evaluation JSON with COCO AP, AP50, AP75, APs, APm, APl in [0, 1]
            (default: the first of all_results.json, eval_results.json in model_dir).
        training_info: training arguments to show in the card, overriding model_dir/training_args.json.
        upload: False stops after building and verifying (no network, no token needed).
        token: Hub token (default: HF_TOKEN or the stored login).
        license: Hub license id for the card's metadata.

    Returns the folder. Raises ValueError for a bad repo id or license, HubError (VerificationError,
    UploadError) with a message naming the cause; the folder is kept whenever it was built.
    """
    folder, context = build_model_folder(model_dir, repo_id, local_dir, metrics_file, training_info, license)
    if upload:
        try:
            full_id, revision = upload_folder(folder, repo_id, private, commit_message, token)
        except UploadError as err:
            raise UploadError(f"{err}\n{_keep_note(folder, repo_id)}") from None
        pin_card_revision(folder, full_id, revision, context, token)
    return folder


__all__ = ["REMOTE_CODE_AUTO_CLASSES", "REQUIRED_FILES", "OUTPUT_ATOL", "VERIFY_TIMEOUT_S", "check_repo_id",
           "default_local_dir", "load_source", "save_folder", "verification_images", "fresh_process_env",
           "reference_outputs", "compare_outputs", "verify_folder", "check_can_upload", "upload_folder",
           "pin_card_revision", "build_model_folder", "push_model_folder"]
