"""Hub remote code: a saved folder loads through the Auto classes in a fresh process that
cannot import this package, offline, and gives outputs identical to the original objects."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_config
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoModelForObjectDetection

from modeling_detr_custom import DetrCustomForObjectDetection, DetrCustomImageProcessor

PHOTO = ROOT / "tests" / "data" / "grace_hopper.jpg"
REMOTE_CODE_FILES = {"configuration_detr_custom.py", "modeling_detr_custom.py", "loss_detr_custom.py",
                     "image_processing_detr_custom.py"}

FRESH_PROCESS = r"""
import sys
sys.modules["modeling_detr_custom"] = None  # the installed package must not be what loads
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForObjectDetection

folder, image_path, out = sys.argv[1:4]
loaded = {
    "config": AutoConfig.from_pretrained(folder, trust_remote_code=True),
    "base": AutoModel.from_pretrained(folder, trust_remote_code=True).eval(),
    "detector": AutoModelForObjectDetection.from_pretrained(folder, trust_remote_code=True).eval(),
    "processor": AutoImageProcessor.from_pretrained(folder, trust_remote_code=True),
}
inputs = loaded["processor"](images=[Image.open(image_path)], return_tensors="pt")
with torch.no_grad():
    detections = loaded["detector"](**inputs)
    base = loaded["base"](**inputs)
torch.save({
    "classes": {k: (type(v).__name__, type(v).__module__) for k, v in loaded.items()},
    "pixel_values": inputs["pixel_values"], "pixel_mask": inputs["pixel_mask"],
    "logits": detections.logits, "pred_boxes": detections.pred_boxes,
    "last_hidden_state": base.last_hidden_state,
}, out)
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "detr-tiny"
    torch.manual_seed(0)
    model = DetrCustomForObjectDetection(tiny_config()).eval()
    processor = DetrCustomImageProcessor(size={"shortest_edge": 160, "longest_edge": 256})
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor, folder


def test_folder_holds_auto_maps_and_every_code_file(saved):
    _, _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_detr_custom.DetrCustomConfig",
        "AutoModel": "modeling_detr_custom.DetrCustomModel",
        "AutoModelForObjectDetection": "modeling_detr_custom.DetrCustomForObjectDetection"}
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["auto_map"] == {"AutoImageProcessor": "image_processing_detr_custom.DetrCustomImageProcessor"}
    assert REMOTE_CODE_FILES <= {p.name for p in folder.iterdir()}


def test_fresh_offline_process_without_the_package_gives_identical_outputs(saved, tmp_path):
    model, processor, folder = saved
    script = tmp_path / "load.py"
    script.write_text(FRESH_PROCESS)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    subprocess.run([sys.executable, str(script), str(folder), str(PHOTO), str(tmp_path / "out.pt")],
                   cwd=tmp_path, env=env, check=True, timeout=300)
    remote = torch.load(tmp_path / "out.pt")
    for name, (cls, module) in remote["classes"].items():
        assert module.startswith("transformers_modules"), (name, cls, module)
    inputs = processor(images=[Image.open(PHOTO)], return_tensors="pt")
    with torch.no_grad():
        local = model(**inputs)
    assert torch.equal(remote["pixel_values"], inputs["pixel_values"])
    assert torch.equal(remote["pixel_mask"], inputs["pixel_mask"])
    assert torch.equal(remote["logits"], local.logits) and torch.equal(remote["pred_boxes"], local.pred_boxes)
    assert torch.equal(remote["last_hidden_state"], local.last_hidden_state)


def test_installed_package_needs_no_trust_remote_code(saved):
    model, _, folder = saved
    detector = AutoModelForObjectDetection.from_pretrained(folder)
    assert type(detector).__module__ == "modeling_detr_custom.modeling_detr_custom"
    assert type(AutoModel.from_pretrained(folder)).__name__ == "DetrCustomModel"
    assert isinstance(AutoImageProcessor.from_pretrained(folder), DetrCustomImageProcessor)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), detector.state_dict().values()))
