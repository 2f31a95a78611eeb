"""Nothing lost, nothing broken by the tools' outputs (issue 25): predict.py, export_onnx.py, evaluate_model.py and
push_to_hub.py never lose another run's results, never read their own outputs back, never write over a model
folder's own files, skip unusable images one line each, report failed writes in one line and follow the umask.

A random tiny model (threshold 0: every query is a box) keeps each run to a second or two.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_config
from PIL import Image

from modeling_detr_custom import export
from modeling_detr_custom.checks import run_cli
from modeling_detr_custom.data.synthetic import generate_image
from modeling_detr_custom.hub import build_model_folder
from modeling_detr_custom.image_processing_detr_custom import DetrCustomImageProcessor
from modeling_detr_custom.modeling_detr_custom import DetrCustomForObjectDetection


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}_safety", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PREDICT, EXPORT, PUSH = _script("predict"), _script("export_onnx"), _script("push_to_hub")
EVALUATE = runpy.run_path(str(ROOT / "scripts" / "evaluate_model.py"), run_name="evaluate_safety")


# the tiny model's matrices are too small to share: a second thread only adds contention
pytestmark = pytest.mark.usefixtures("one_thread")


def save_model(folder: Path, pad_size: dict | None = None) -> Path:
    torch.manual_seed(0)
    DetrCustomForObjectDetection(tiny_config(num_queries=2)).save_pretrained(folder)
    DetrCustomImageProcessor(size={"shortest_edge": 48, "longest_edge": 80}, pad_size=pad_size).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """Pads every batch to 48x80: the export's default canvas."""
    return save_model(tmp_path_factory.mktemp("safety") / "model", pad_size={"height": 48, "width": 80})


def add_images(folder: Path, count: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image, _ = generate_image(np.random.default_rng(i), 64, 1, 2, (0, 1, 2))
        image.save(folder / f"img{i}.png")
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def error_lines(stderr: str) -> list[str]:
    """The ``error:`` lines of a script's stderr (transformers' loading progress bars share it), no traceback."""
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def predict(model: Path, *args: str) -> int:
    return PREDICT.main(["--model", str(model), "--threshold", "0", "--device", "cpu", *args])


# ----------------------------------------------------------------------------- 1. concurrent and repeated runs

# Holds a folder as a running predict.py does, until its stdin closes (folder_lock.py loads alone: no torch)
HOLDER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("folder_lock", sys.argv[1])
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)
with lock.hold_folder(sys.argv[2], "predict.py"):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_folder_held_by_a_running_predict_is_refused_naming_its_pid_and_a_rerun_needs_overwrite(
        model_dir: Path, tmp_path: Path, capsys) -> None:
    images, out = add_images(tmp_path / "images"), tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(ROOT / "modeling_detr_custom" / "folder_lock.py"),
                               str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert predict(model_dir, str(images), "--output_dir", str(out)) == 1
        (err,) = error_lines(capsys.readouterr().err)
        assert f"{out} is in use by predict.py (pid {holder.pid}" in err
        assert list(out.iterdir()) == [out / ".detr_custom.lock"], "the refused run wrote nothing"
    finally:
        holder.communicate("")
    assert predict(model_dir, str(images), "--output_dir", str(out)) == 0
    first = snapshot(out)
    assert predict(model_dir, str(images / "img0.png"), "--output_dir", str(out)) == 1
    (err,) = error_lines(capsys.readouterr().err)
    assert f"{out} holds the detections of an earlier predict.py run (detections.json); pass --overwrite" in err
    assert snapshot(out) == first, "the first run's results are intact"
    assert predict(model_dir, str(images / "img0.png"), "--output_dir", str(out), "--overwrite") == 0
    report = json.loads((out / "detections.json").read_text())
    assert [Path(i["path"]).name for i in report["images"]] == ["img0.png"]


# ----------------------------------------------------------------------------- 2. its own drawings are no input


def test_predict_into_its_input_folder_twice_never_reads_its_own_drawings(model_dir: Path, tmp_path: Path,
                                                                             capsys) -> None:
    folder = add_images(tmp_path / "images")
    assert predict(model_dir, str(folder), "--output_dir", str(folder)) == 0
    drawn = {i["output_image"] for i in json.loads((folder / "detections.json").read_text())["images"]}
    assert drawn == {"img0_1.png", "img1_1.png"}
    capsys.readouterr()
    assert predict(model_dir, str(folder), "--output_dir", str(folder), "--overwrite") == 0
    out = capsys.readouterr().out
    assert "left out 2 image(s) drawn by an earlier predict.py run" in out
    report = json.loads((folder / "detections.json").read_text())
    assert [Path(i["path"]).name for i in report["images"]] == ["img0.png", "img1.png"]
    assert {i["output_image"] for i in report["images"]} == drawn  # the earlier run's names, replaced
    assert sorted(p.name for p in folder.iterdir()) == ["detections.json", "img0.png", "img0_1.png", "img1.png",
                                                        "img1_1.png"]
    assert predict(model_dir, str(folder), "--output_dir", str(tmp_path / "elsewhere")) == 0
    assert len(json.loads((tmp_path / "elsewhere" / "detections.json").read_text())["images"]) == 2


# ----------------------------------------------------------------------------- 3. a model folder's own files


def test_no_output_replaces_a_file_of_a_model_folder_even_with_overwrite(tmp_path: Path, capsys) -> None:
    model = save_model(tmp_path / "model")
    before = snapshot(model)
    assert EXPORT.main(["--model", str(model), "--output", str(model / "config.onnx"), "--overwrite"]) == 1
    (err,) = error_lines(capsys.readouterr().err)
    assert f"{model / 'config.json'} is a file of the model folder {model} and is never overwritten" in err
    with pytest.raises(ValueError, match="preprocessor_config.json is a file of the model folder"):
        export.export_onnx(model, model / "preprocessor_config.onnx", overwrite=True)
    with pytest.raises(ValueError, match=r"model.safetensors is a file of the model folder"):
        EVALUATE["main"](["--model", str(model), "--output_file", str(model / "model.safetensors"),
                          "--overwrite_output_file"])
    assert snapshot(model) == before


# ----------------------------------------------------------------------------- 4. extreme images


def test_images_predict_cannot_use_are_skipped_one_line_each_and_the_rest_processed(model_dir: Path, tmp_path: Path,
                                                                                     capsys) -> None:
    folder = add_images(tmp_path / "images", count=1)
    Image.new("RGB", (1000, 1), (200, 30, 30)).save(folder / "thin.png")  # resized to 0 pixels high
    Image.new("1", (20000, 10000)).save(folder / "huge.png")  # 2e8 pixels: over PIL's decompression-bomb limit
    out = tmp_path / "out"
    assert predict(model_dir, str(folder), "--output_dir", str(out)) == 0
    captured = capsys.readouterr()
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 2 and not error_lines(captured.err), captured.err
    huge, thin = sorted(skipped)
    assert huge.startswith(f"skipped {folder / 'huge.png'}: ") and "decompression-bomb limit" in huge
    assert "MAX_IMAGE_PIXELS" in huge and "200000000 pixels" in huge
    assert thin.startswith(f"skipped {folder / 'thin.png'}: ") and "1000" in thin
    report = json.loads((out / "detections.json").read_text())
    assert [Path(i["path"]).name for i in report["images"]] == ["img0.png"]
    assert sorted(Path(s["path"]).name for s in report["skipped"]) == ["huge.png", "thin.png"]
    assert "1 image(s) processed, 2 skipped" in captured.out


# ----------------------------------------------------------------------------- 5. failed writes


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_output_folder_is_one_line(model_dir: Path, tmp_path: Path, capsys) -> None:
    images, out = add_images(tmp_path / "images"), tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert predict(model_dir, str(images), "--output_dir", str(out)) == 1
        assert EXPORT.main(["--model", str(model_dir), "--output", str(out / "detr.onnx")]) == 1
    finally:
        out.chmod(0o755)
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 2 and all("Permission denied" in line for line in err), err


def test_failed_writes_name_the_path_and_the_os_reason_in_one_line(model_dir: Path, tmp_path: Path, monkeypatch,
                                                                   capsys) -> None:
    """A full disk (predict's drawing, export's temporary files) and a path under a file (push's folder)."""
    images = add_images(tmp_path / "images")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(Image.Image, "save", disk_full)
        assert predict(model_dir, str(images), "--output_dir", str(tmp_path / "out")) == 1
    assert error_lines(capsys.readouterr().err) == [
        f"error: cannot write {tmp_path / 'out' / 'img0.png'}: No space left on device"]
    with monkeypatch.context() as patch:
        patch.setattr(export.tempfile, "mkstemp", disk_full)
        assert EXPORT.main(["--model", str(model_dir), "--output", str(tmp_path / "detr.onnx")]) == 1
    assert error_lines(capsys.readouterr().err) == [
        f"error: cannot write {tmp_path / 'detr.onnx'}: No space left on device"]
    (tmp_path / "a_file").write_text("")
    local_dir = tmp_path / "a_file" / "hub"
    assert PUSH.main(["--model_dir", str(model_dir), "--repo_id", "someone/x", "--local_dir", str(local_dir)]) == 1
    assert error_lines(capsys.readouterr().err) == [f"error: cannot write {local_dir}: Not a directory"]


# ----------------------------------------------------------------------------- 6. the umask


def test_written_files_follow_the_umask(model_dir: Path, tmp_path: Path) -> None:
    """mkstemp and safetensors write 0600 whatever the umask: an export or a Hub folder others cannot read."""
    previous = os.umask(0o022)
    try:
        export.export_onnx(model_dir, tmp_path / "detr.onnx")
        folder, _ = build_model_folder(model_dir, "someone/x", tmp_path / "hub", verify=False)
    finally:
        os.umask(previous)
    for path in (tmp_path / "detr.onnx", tmp_path / "detr.json", folder / "model.safetensors",
                 folder / "config.json"):
        assert oct(path.stat().st_mode & 0o777) == oct(0o644), path


# ----------------------------------------------------------------------------- 7. a model folder that does not load


@pytest.mark.parametrize("config_text", ["{not json", None])
def test_a_model_folder_that_does_not_load_is_one_line_in_every_tool(tmp_path: Path, config_text: str | None,
                                                                     capsys) -> None:
    """A corrupt config.json, and a config naming a backbone timm does not have (None)."""
    model = save_model(tmp_path / "model")
    if config_text is None:
        config = json.loads((model / "config.json").read_text())
        config_text = json.dumps({**config, "backbone": "no_such_backbone"})
    (model / "config.json").write_text(config_text)
    image = add_images(tmp_path / "images", count=1) / "img0.png"
    codes = [PREDICT.main(["--model", str(model), str(image), "--output_dir", str(tmp_path / "out")]),
             EXPORT.main(["--model", str(model), "--output", str(tmp_path / "detr.onnx")]),
             PUSH.main(["--model_dir", str(model), "--repo_id", "someone/x", "--local_dir", str(tmp_path / "hub")])]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: EVALUATE["main"](["--model", str(model), "--output_file", str(tmp_path / "eval.json")]))
    codes.append(exit_info.value.code)
    err = capsys.readouterr().err
    assert codes == [1, 1, 1, 1], err
    lines = error_lines(err)
    assert len(lines) == 4 and all("config" in line or "backbone" in line for line in lines), err


def test_debug_shows_the_traceback_instead_of_the_line(tmp_path: Path) -> None:
    """--debug re-raises the error the line would have reported (its traceback is what a bug report needs)."""
    from modeling_detr_custom.hub import HubError
    from modeling_detr_custom.predict import ModelLoadError

    missing = str(tmp_path / "no_model")
    with pytest.raises(ModelLoadError, match="model folder not found"):
        PREDICT.main(["--model", missing, str(tmp_path), "--debug"])
    with pytest.raises(ModelLoadError, match="model folder not found"):
        EXPORT.main(["--model", missing, "--output", str(tmp_path / "detr.onnx"), "--debug"])
    with pytest.raises(HubError, match="model folder not found"):
        PUSH.main(["--model_dir", missing, "--repo_id", "someone/x", "--local_dir", str(tmp_path / "hub"), "--debug"])
