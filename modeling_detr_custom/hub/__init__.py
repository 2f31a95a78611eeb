"""Ship a trained detr-custom folder to the Hugging Face Hub: build the exact folder, check it, upload it.

Not remote code: nothing in the model, config or processor files imports this package.

`push_model_folder` is the one code path behind `scripts/push_to_hub.py` and `train.py --push_to_hub`:

1. build (`folder`): load the model and image processor from ``model_dir`` and ``save_pretrained`` both into
   ``local_dir`` (so the remote-code files and the ``auto_map`` entries come along), then render
   ``README.md`` from the package's ``hub/model_card.md`` with what the run recorded (`card`:
   ``training_args.json``, ``all_results.json`` / ``eval_results.json``);
2. verify (`folder`): load ``local_dir`` in a fresh Python process (``python -I``, another cwd, the package not
   importable, ``HF_HUB_OFFLINE=1``) through AutoConfig, AutoModel, AutoModelForObjectDetection,
   AutoImageProcessor and the object-detection pipeline with ``trust_remote_code=True``, and compare its
   outputs with the source model's on a padded test batch; any difference stops here;
3. upload (`folder`, optional): ``HfApi.create_repo(exist_ok=True)`` + ``upload_folder`` of exactly that folder,
   then a second small commit that pins the code/weights commit hash in the model card's loading snippet.

Every failure raises a `HubError` subclass (`errors`) whose message names the cause; the built folder is kept.
"""

from .card import (
                   CARD_MARKER,
                   CARD_METRICS,
                   DEFAULT_LICENSE,
                   EVAL_FILES,
                   MODEL_CARD_TEMPLATE,
                   card_context,
                   find_eval_file,
                   front_matter,
                   read_metrics,
                   read_training_info,
                   render_model_card,
)
from .errors import HubError, UploadError, VerificationError
from .folder import (
                   OUTPUT_ATOL,
                   REMOTE_CODE_AUTO_CLASSES,
                   REQUIRED_FILES,
                   VERIFY_TIMEOUT_S,
                   build_model_folder,
                   check_can_upload,
                   check_repo_id,
                   compare_outputs,
                   default_local_dir,
                   fresh_process_env,
                   load_source,
                   pin_card_revision,
                   push_model_folder,
                   reference_outputs,
                   save_folder,
                   upload_folder,
                   verification_images,
                   verify_folder,
)

__all__ = ["HubError", "VerificationError", "UploadError", "check_repo_id", "check_can_upload", "push_model_folder",
           "build_model_folder", "verify_folder", "upload_folder", "render_model_card", "front_matter", "read_metrics",
           "default_local_dir", "DEFAULT_LICENSE", "MODEL_CARD_TEMPLATE", "CARD_MARKER", "CARD_METRICS", "EVAL_FILES",
           "card_context", "find_eval_file", "read_training_info", "OUTPUT_ATOL", "REMOTE_CODE_AUTO_CLASSES",
           "REQUIRED_FILES", "VERIFY_TIMEOUT_S", "compare_outputs", "fresh_process_env", "load_source",
           "pin_card_revision", "reference_outputs", "save_folder", "verification_images"]
