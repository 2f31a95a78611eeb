"""Shipping to the Hub (issue 5): the folder `push_to_hub.py --local_dir` builds, its model card, and the
failure paths of the upload. Nothing here reaches the network: uploads either fail for real (no network in
the test machine, offline mode, no token) or go to a fake HfApi.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
import torch
import yaml
from conftest import ROOT, tiny_config
from safetensors.torch import load_file, save_file

from modeling_detr_custom import hub
from modeling_detr_custom.hub import HubError, UploadError, VerificationError
from modeling_detr_custom.hub import folder as hub_folder  # where build_model_folder looks its helpers up
from modeling_detr_custom.image_processing_detr_custom import DetrCustomImageProcessor
from modeling_detr_custom.modeling_detr_custom import DetrCustomForObjectDetection

REPO_ID = "someone/detr-test"
# What train.py writes next to the model (-1: pycocotools found no small objects, so APs is undefined)
RESULTS = {"AP": 0.512, "AP50": 0.834, "AP75": 0.47, "APs": -1.0, "APm": 0.305, "APl": 0.66,
           "global_step": 1200, "num_processes": 1, "eval_split": "val", "eval_num_images": 16}
TRAINING_ARGS = {"model_config": "demo", "learning_rate": 2e-4, "backbone_learning_rate": 2e-4,
                 "per_device_train_batch_size": 8, "max_steps": 1200, "seed": 42, "synthetic_num_train": 64,
                 "output_dir": "outputs/x"}


def _load_script(name: str):
    """scripts/<name>.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PUSH = _load_script("push_to_hub")


def _save_model(folder: Path, with_records: bool = True) -> Path:
    """A tiny random model + processor (64-96 px inputs keep the checks fast), as train.py leaves them."""
    torch.manual_seed(0)
    DetrCustomForObjectDetection(tiny_config()).save_pretrained(folder)
    DetrCustomImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).save_pretrained(folder)
    if with_records:
        (folder / "all_results.json").write_text(json.dumps(RESULTS))
        (folder / "training_args.json").write_text(json.dumps(TRAINING_ARGS))
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return _save_model(tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="module")
def built(model_dir: Path, tmp_path_factory) -> Path:
    """The folder `push_to_hub.py --local_dir` builds (and verifies in a fresh process); no upload."""
    out = tmp_path_factory.mktemp("hub") / "detr-test"
    assert PUSH.main(["--model_dir", str(model_dir), "--repo_id", REPO_ID, "--local_dir", str(out)]) == 0
    return out


def _assert_complete(folder: Path) -> None:
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md", "configuration_detr_custom.py",
            "modeling_detr_custom.py", "loss_detr_custom.py", "image_processing_detr_custom.py"} <= names, names
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert {"AutoConfig", "AutoModel", "AutoModelForObjectDetection"} <= set(auto_map)
    assert "AutoImageProcessor" in json.loads((folder / "preprocessor_config.json").read_text())["auto_map"]


def test_local_dir_builds_every_file_and_nothing_from_the_run(built: Path) -> None:
    _assert_complete(built)
    # training records and checkpoints stay out of the upload
    assert not {"all_results.json", "training_args.json", "checkpoints"} & {p.name for p in built.iterdir()}


# Loads the folder as a Hub user would: another cwd, the project not importable, offline.
FRESH_LOAD = r"""
import importlib.util, sys, torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForObjectDetection, pipeline
folder, out = sys.argv[1:]
sys.modules["modeling_detr_custom"] = None  # even when installed (pip install -e), only the folder's code may load
images = [Image.new("RGB", (90, 60), (200, 30, 30)), Image.new("RGB", (50, 80), (30, 200, 30))]
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForObjectDetection.from_pretrained(folder, trust_remote_code=True).eval()
base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
inputs = processor(images=images, return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
    hidden = base(**inputs).last_hidden_state
found = pipeline("object-detection", model=folder, trust_remote_code=True)(images[0], threshold=0.0)
torch.save({"logits": logits, "hidden": hidden, "pipeline": found,
            "classes": [type(o).__module__ for o in (config, processor, model, base)]}, out)
"""


def test_built_folder_loads_offline_in_a_fresh_process(built: Path, model_dir: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run([sys.executable, "-I", "-c", FRESH_LOAD, str(built), str(tmp_path / "out.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert all(m.startswith("transformers_modules.") for m in loaded["classes"]), loaded["classes"]

    from PIL import Image
    images = [Image.new("RGB", (90, 60), (200, 30, 30)), Image.new("RGB", (50, 80), (30, 200, 30))]
    model = DetrCustomForObjectDetection.from_pretrained(model_dir).eval()
    inputs = DetrCustomImageProcessor.from_pretrained(model_dir)(images=images, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
        hidden = model.model(inputs["pixel_values"], inputs["pixel_mask"]).last_hidden_state
    torch.testing.assert_close(loaded["logits"], outputs.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(loaded["hidden"], hidden, rtol=0, atol=1e-5)
    assert len(loaded["pipeline"]) == model.config.num_queries  # threshold 0 keeps every query
    assert {d["label"] for d in loaded["pipeline"]} <= set(model.config.id2label.values())


def test_readme_front_matter_is_yaml_with_the_evaluation_metrics(built: Path) -> None:
    card = (built / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "object-detection"
    assert meta["license"] == "apache-2.0" and "object-detection" in meta["tags"]
    (result,) = meta["model-index"][0]["results"]
    assert result["task"]["type"] == "object-detection" and result["dataset"]["split"] == "val"
    metrics = {m["type"]: m["value"] for m in result["metrics"]}
    assert metrics == {k: RESULTS[k] for k in ("AP", "AP50", "AP75", "APm", "APl")}  # APs = -1: undefined, left out
    assert "datasets" not in meta  # synthetic data: no Hub dataset id to link


def test_readme_body_has_every_section_filled(built: Path) -> None:
    card = (built / "README.md").read_text()
    for needle in ("trust_remote_code=True", f'repo_id = "{REPO_ID}"', 'revision = "main"',
                   'pipeline("object-detection"', "## Training data", "synthetic", "| learning rate | 0.0002 |",
                   "| optimizer steps done | 1200 |", "| AP50 | IoU 0.50 | 83.4 |", "small objects", "500 COCO epochs",
                   "@inproceedings{carion2020detr", "`circle`, `square`, `triangle`"):
        assert needle in card, needle
    assert "TODO" not in card and "$" not in card and "{{" not in card


def test_card_without_run_records_says_so_and_has_no_model_index(tmp_path: Path) -> None:
    bare = _save_model(tmp_path / "bare", with_records=False)
    folder, _ = hub.build_model_folder(bare, REPO_ID, tmp_path / "out", verify=False)
    card = (folder / "README.md").read_text()
    assert "model-index" not in hub.front_matter(card)
    assert "No COCO evaluation was saved" in card and "was not recorded" in card
    assert "TODO" not in card and "$" not in card
    (folder / "stale.bin").write_text("left from an older build")  # a rebuild replaces a previous build whole
    hub.build_model_folder(bare, REPO_ID, tmp_path / "out", verify=False)
    assert not (folder / "stale.bin").exists() and (folder / "README.md").is_file()


def test_metrics_must_be_fractions(tmp_path: Path) -> None:
    path = tmp_path / "eval_results.json"
    path.write_text(json.dumps({"AP": 42.0}))
    with pytest.raises(HubError, match=r"eval_results.json: AP = 42.0; .*\[0, 1\]"):
        hub.read_metrics(path)
    path.write_text(json.dumps({"eval_AP": 0.25, "eval_AP50": float("nan")}))
    assert hub.read_metrics(path) == {"AP": 0.25}  # transformers' eval_ prefix; NaN = not evaluated


def test_bad_repo_id_and_local_dir_are_refused_before_anything_is_built(model_dir: Path, tmp_path: Path,
                                                                        capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        PUSH.main(["--model_dir", str(model_dir), "--repo_id", "not a/valid/id", "--local_dir", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and "invalid Hub repo id 'not a/valid/id'" in capsys.readouterr().err
    mine = tmp_path / "mine"  # someone's model folder, with a README of their own
    shutil.copytree(model_dir, mine)
    (mine / "README.md").write_text("# my notes")
    with pytest.raises(HubError, match="is not empty and is not a previous upload folder"):
        hub.build_model_folder(model_dir, REPO_ID, mine, verify=False)
    assert (mine / "README.md").read_text() == "# my notes"
    with pytest.raises(HubError, match="is or contains model_dir"):
        hub.build_model_folder(model_dir, REPO_ID, model_dir.parent, verify=False)
    missing = ["--model_dir", str(tmp_path / "nope"), "--repo_id", REPO_ID, "--local_dir", str(tmp_path / "o")]
    assert PUSH.main(missing) == 1
    assert "model folder not found" in capsys.readouterr().err


def _outputs_in_this_process(folder: Path) -> dict:
    """What verify_folder's fresh process reports, computed here (the fresh process itself is exercised by
    the `built` fixture): saves a process start per test."""
    model, processor = hub.load_source(folder)
    outputs = hub.reference_outputs(model, processor, hub.verification_images())
    outputs["pipeline"] = [{**d, "box": dict(zip(("xmin", "ymin", "xmax", "ymax"), d["box"]))}
                           for d in outputs["pipeline"]]
    return {**outputs, "classes": ["transformers_modules.x.y.DetrCustomConfig"]}


def test_verification_catches_a_folder_that_differs_from_the_model(built: Path, model_dir: Path, tmp_path: Path,
                                                                   monkeypatch) -> None:
    monkeypatch.setattr(hub_folder, "_run_fresh", lambda folder, *args: _outputs_in_this_process(folder))
    model, processor = hub.load_source(model_dir)
    hub.verify_folder(built, model, processor)  # the comparison accepts the true folder...
    tampered = tmp_path / "tampered"
    shutil.copytree(built, tampered)
    weights = load_file(tampered / "model.safetensors")
    weights["class_labels_classifier.bias"] += 0.5
    save_file(weights, tampered / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(VerificationError, match="logits: max abs difference 0.5"):  # ...and refuses a changed one
        hub.verify_folder(tampered, model, processor)


# The real upload path with a fake token: this machine has no network, so it must fail fast and clearly.
# A separate process with a hard timeout, so a network that hangs instead of failing cannot hang the suite.
UPLOAD_NO_NETWORK = r"""
import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from modeling_detr_custom.hub import UploadError, upload_folder
try:
    upload_folder(Path(sys.argv[2]), "someone/detr-test")
except UploadError as err:
    sys.exit(f"UploadError: {err}")
sys.exit("no error")
"""


def test_upload_without_network_fails_with_a_clear_error(built: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_OFFLINE", "PYTHON"))}
    env.update(HF_TOKEN="hf_fake_token_for_tests", HF_HOME=str(tmp_path / "hf_home"), HF_HUB_ETAG_TIMEOUT="3",
               HF_HUB_DOWNLOAD_TIMEOUT="3", HF_HUB_DISABLE_TELEMETRY="1")
    proc = subprocess.run([sys.executable, "-c", UPLOAD_NO_NETWORK, str(ROOT), str(built)], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # no network here; were there one, the fake token is what the Hub would reject
    assert "UploadError: cannot reach the Hugging Face Hub" in proc.stderr or "401" in proc.stderr, proc.stderr[-2000:]
    _assert_complete(built)


def test_failed_upload_exits_non_zero_naming_the_cause_and_keeps_the_folder(model_dir: Path, tmp_path: Path,
                                                                            monkeypatch, capsys) -> None:
    """push_to_hub.py --local_dir OUT --upload in offline mode (the environment of this suite)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_folder, "verify_folder", lambda *a, **k: None)  # the fresh-process check runs in `built`
    out = tmp_path / "upload"
    code = PUSH.main(["--model_dir", str(model_dir), "--repo_id", REPO_ID, "--local_dir", str(out), "--upload"])
    err = capsys.readouterr().err
    assert code == 1 and "offline mode is enabled" in err and f"kept at {out}" in err, err
    assert f"hf upload {REPO_ID} {out}" in err
    _assert_complete(out)


class FakeApi:
    """Records what push_model_folder asks of the Hub; `fail` makes create_repo raise it."""

    calls: list = []
    fail: Exception | None = None

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_repo", repo_id, kwargs))
        if FakeApi.fail is not None:
            raise FakeApi.fail
        return type("RepoUrl", (), {"repo_id": repo_id if "/" in repo_id else f"me/{repo_id}"})()

    def upload_folder(self, **kwargs):
        FakeApi.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return type("CommitInfo", (), {"oid": "0123456789abcdef0123456789abcdef01234567"})()

    def upload_file(self, **kwargs):
        FakeApi.calls.append(("upload_file", kwargs["repo_id"], kwargs))


@pytest.fixture
def fake_hub(monkeypatch):
    """Online mode with a token, HfApi replaced by FakeApi, and no fresh-process verification (tested above)."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(hub_folder, "verify_folder", lambda *a, **k: None)
    FakeApi.calls, FakeApi.fail = [], None
    return FakeApi


def test_upload_sends_the_built_folder_then_pins_the_revision_in_the_card(fake_hub, model_dir: Path,
                                                                          tmp_path: Path) -> None:
    folder = hub.push_model_folder(model_dir, "detr-test", private=True, commit_message="first model")
    assert folder == model_dir.with_name(model_dir.name + "-hub")  # the default: beside the model folder
    (create, upload, readme) = fake_hub.calls
    assert create[1] == "detr-test" and create[2]["private"] is True and create[2]["exist_ok"] is True
    assert upload[2]["folder_path"] == folder and upload[2]["commit_message"] == "first model"
    assert readme[0] == "upload_file" and readme[2]["path_in_repo"] == "README.md"
    card = (folder / "README.md").read_text()
    assert 'repo_id = "me/detr-test"' in card and 'revision = "0123456789abcdef0123456789abcdef01234567"' in card


def test_verification_failure_means_no_upload(fake_hub, model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    def differs(*args, **kwargs):
        raise VerificationError("logits differ")

    monkeypatch.setattr(hub_folder, "verify_folder", differs)
    with pytest.raises(VerificationError):
        hub.push_model_folder(model_dir, REPO_ID, local_dir=tmp_path / "out")
    assert fake_hub.calls == [] and (tmp_path / "out" / "model.safetensors").is_file()


def _http_error(status: int) -> Exception:
    from huggingface_hub.errors import HfHubHTTPError

    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    return HfHubHTTPError(f"{status} error", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize("status, expected", [(401, "rejected the token"),
                                              (403, "may not write to 'someone/detr-test'"),
                                              (400, "rejected the repo id 'someone/detr-test'")])
def test_hub_refusals_are_explained(fake_hub, built: Path, status: int, expected: str) -> None:
    fake_hub.fail = _http_error(status)
    with pytest.raises(UploadError, match=expected):
        hub.upload_folder(built, REPO_ID)


def test_offline_mode_and_missing_token_fail_before_any_request(fake_hub, built: Path, monkeypatch, tmp_path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UploadError, match="offline mode is enabled"):
        hub.upload_folder(built, REPO_ID)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"), raising=False)
    with pytest.raises(UploadError, match="no Hugging Face token"):
        hub.upload_folder(built, REPO_ID)
    assert fake_hub.calls == []


def test_train_push_to_hub_fails_before_training_when_it_cannot_upload(tmp_path, monkeypatch):
    """train.py --push_to_hub checks the repo id and the upload path first: no epoch is wasted."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_script", ROOT / "scripts" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    monkeypatch.setattr(train, "run_training", lambda args: pytest.fail("training started"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit, match="needs --hub_model_id"):
        train.main(["--output_dir", out, "--push_to_hub"])
    with pytest.raises(SystemExit, match="--push_to_hub: .*offline mode"):
        train.main(["--output_dir", out, "--push_to_hub", "--hub_model_id", "someone/detr-test"])
