"""A training run's safety (issue 25): it holds its output folder, a resume keeps what the run is, a refused write
is one line saying what is intact, offline ImageNet weights are one line with the ways out, files follow the umask.

Runs are in-process (scripts/train.py's `main`), a few steps of the `tiny` preset on the synthetic shapes; the
folder's holder and the offline run are separate processes (a lock and HF_HOME are per process).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training import (  # noqa: F401 - fresh_accelerate_state is an autouse fixture
    TRAIN,
    fresh_accelerate_state,
    fresh_accelerate_state_reset,
    read_json,
    read_jsonl,
    tiny_run_args,
)

from modeling_detr_custom.folder_lock import LOCK_FILE, hold_folder, is_main_rank
from modeling_detr_custom.modeling_detr_custom import DetrCustomForObjectDetection
from modeling_detr_custom.training.monitor import MetricsLogger

REPO = Path(__file__).resolve().parents[1]
QUIET = ("--picture_images", "0", "--checkpointing_steps", "1")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir: Path) -> Path:
    """A finished 2-step tiny run (checkpoint-1, checkpoint-2) written under umask 022; tests work on copies."""
    out = tmp_path_factory.mktemp("finished") / "run"
    previous = os.umask(0o022)
    try:
        TRAIN["main"](tiny_run_args(out, cache_dir, *QUIET, steps=2))
    finally:
        os.umask(previous)
        fresh_accelerate_state_reset()
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- 1. a run holds its output folder


def start_holder(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder`` as train.py does (folder_lock.py alone: no torch to import)."""
    code = ("import runpy, sys, time\n"
            f"hold = runpy.run_path({str(REPO / 'modeling_detr_custom' / 'folder_lock.py')!r})['hold_folder']\n"
            "with hold(sys.argv[1], 'train.py'):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_held_folder_is_refused_before_anything_and_a_killed_holder_leaves_it_free(finished_run: Path,
                                                                                     cache_dir: Path,
                                                                                     tmp_path: Path) -> None:
    out = copy_run(finished_run, tmp_path)
    holder = start_holder(out)
    try:
        before = snapshot(out)
        in_use = (rf"^{re.escape(str(out))} is in use by train\.py \(pid {holder.pid}, since \d{{4}}-\d\d-\d\d "
                  r"\d\d:\d\d:\d\d\); wait for it to finish or choose another --output_dir$")
        # the lock comes before the previous-run check: a new run is told the folder is in use, not that it is old
        with pytest.raises(ValueError, match=in_use):
            TRAIN["main"](tiny_run_args(out, cache_dir, *QUIET, steps=3))
        fresh_accelerate_state_reset()
        with pytest.raises(ValueError, match=in_use):
            TRAIN["main"](tiny_run_args(out, cache_dir, *QUIET, "--resume_from_checkpoint", "latest", steps=3))
        fresh_accelerate_state_reset()
        assert snapshot(out) == before, "a refused run writes nothing"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / LOCK_FILE).is_file(), "SIGKILL leaves the lock file, but the kernel released its lock"
    results = TRAIN["main"](tiny_run_args(out, cache_dir, *QUIET, "--resume_from_checkpoint", "latest", steps=3))
    assert results["global_step"] == 3 and not (out / LOCK_FILE).exists(), "the run took it over and released it"


def test_only_the_main_process_holds_the_folder(tmp_path: Path, monkeypatch) -> None:
    """The other processes of a multi-process run (rank > 0) pass a folder their main process holds."""
    with hold_folder(tmp_path, "train.py"):
        monkeypatch.setenv("RANK", "1")
        assert not is_main_rank()
        with hold_folder(tmp_path, "train.py", enabled=is_main_rank()):
            pass
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(ValueError, match="is in use by train.py"):
            with hold_folder(tmp_path, "train.py", enabled=is_main_rank()):
                pass


# ----------------------------------------------------------------------------- 2. a resume keeps what the run is


@pytest.mark.parametrize("extra, option, saved, new", [
    (("--synthetic_num_train", "16"), "synthetic_num_train", "8", "16"),
    (("--config_overrides", "num_query_groups=2"), "config_overrides", "unset", "num_query_groups=2"),
    (("--contiguous_labels",), "contiguous_labels", "False", "True"),
    (("--no_augmentation",), "augmentation", "True", "False"),
    (("--coco_dir", "{tmp}"), "coco_dir", "unset", "{tmp}"),
])
def test_a_resume_that_changes_the_data_or_the_model_is_refused(finished_run: Path, cache_dir: Path, tmp_path: Path,
                                                                 extra, option, saved, new) -> None:
    out = copy_run(finished_run, tmp_path)
    before = snapshot(out)
    extra, new = [e.format(tmp=tmp_path) for e in extra], new.format(tmp=tmp_path)
    with pytest.raises(ValueError) as error:
        TRAIN["main"](tiny_run_args(out, cache_dir, *QUIET, "--resume_from_checkpoint", "latest", *extra, steps=3))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"cannot resume with --{option} {new}: the run used --{option} {saved} "
                              f"({out / 'training_args.json'})"), message
    assert snapshot(out) == before, "training_args.json and the checkpoints are untouched"


@pytest.mark.parametrize("ema_at_start, ema_at_resume", [(None, "0.99"), ("0.99", None)])
def test_switching_the_ema_on_or_off_at_resume_is_refused_naming_ema_decay(cache_dir: Path, tmp_path: Path,
                                                                           ema_at_start, ema_at_resume) -> None:
    out = tmp_path / "run"
    ema = lambda value: ("--ema_decay", value) if value else ()  # noqa: E731
    TRAIN["main"](tiny_run_args(out, cache_dir, *QUIET, *ema(ema_at_start), steps=1))
    fresh_accelerate_state_reset()
    before = snapshot(out)
    with pytest.raises(ValueError, match=rf"^cannot resume with --ema_decay {ema_at_resume or 'unset'}: the run used "
                                         rf"--ema_decay {ema_at_start or 'unset'} .*switch the moving average of the "
                                         r"weights on or off; resume with the run's --ema_decay"):
        TRAIN["main"](tiny_run_args(out, cache_dir, *QUIET, "--resume_from_checkpoint", "latest",
                                    *ema(ema_at_resume), steps=2))
    assert snapshot(out) == before


def test_options_that_may_change_at_resume_are_used_logged_and_recorded(finished_run: Path, cache_dir: Path,
                                                                        tmp_path: Path, caplog) -> None:
    """The run's synthetic defaults spelt out are the same data (not refused); the lr and the length are used."""
    out = copy_run(finished_run, tmp_path)
    TRAIN["main"](tiny_run_args(out, cache_dir, *QUIET, "--resume_from_checkpoint", "latest", "--synthetic_seed", "0",
                                "--config_overrides", "", "--learning_rate", "5e-5", steps=3))
    messages = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert any(level == "WARNING" and "options changed from the run's" in m and "--learning_rate 0.0001 -> 5e-05" in m
               for level, m in messages), messages
    assert any(level == "INFO" and "--max_steps 2 -> 3" in m for level, m in messages), messages
    record = read_json(out / "training_args.json")
    assert (record["learning_rate"], record["max_steps"], record["synthetic_seed"]) == (5e-5, 3, 0)


# ----------------------------------------------------------------------------- 3. writes the OS refuses


def full_disk_torch_save(original):
    """torch.save as it fails on a full disk: two chained RuntimeErrors from its zip writer, no errno."""
    def save(obj, f, *args, **kwargs):
        if ".tmp-checkpoint-2" not in str(f):
            return original(obj, f, *args, **kwargs)
        try:
            raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")
        except RuntimeError:
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")  # noqa: B904
    return save


def test_a_full_disk_while_checkpointing_is_one_line_and_the_last_checkpoint_resumes(cache_dir: Path, tmp_path: Path,
                                                                                     monkeypatch) -> None:
    out = tmp_path / "run"
    monkeypatch.setattr(torch, "save", full_disk_torch_save(torch.save))
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=4096))  # a full disk
    with pytest.raises(ValueError) as error:
        TRAIN["main"](tiny_run_args(out, cache_dir, *QUIET, steps=3))
    checkpoints = out / "checkpoints"
    assert str(error.value) == (
        f"cannot write the checkpoint {checkpoints / 'checkpoint-2'}: No space left on device (ENOSPC); the last "
        f"complete checkpoint is {checkpoints / 'checkpoint-1'}; free space and resume with --resume_from_checkpoint "
        "latest")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-1"], "the partial checkpoint is deleted"
    monkeypatch.undo()
    fresh_accelerate_state_reset()
    assert TRAIN["main"](tiny_run_args(out, cache_dir, *QUIET, "--resume_from_checkpoint", "latest",
                                       steps=3))["global_step"] == 3


def test_a_full_disk_writing_the_metrics_is_one_line(cache_dir: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "run"
    original = MetricsLogger.log

    def log(self, metrics, step):
        if step == 2 and "train_loss_ce" in metrics:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, metrics, step)
    monkeypatch.setattr(MetricsLogger, "log", log)
    with pytest.raises(ValueError, match=re.escape(
            f"cannot write the metrics {out / 'metrics.jsonl'}: No space left on device (ENOSPC); the last complete "
            f"checkpoint is {out / 'checkpoints' / 'checkpoint-1'}; free space and resume")):
        TRAIN["main"](tiny_run_args(out, cache_dir, *QUIET, steps=3))


def test_a_read_only_final_save_is_one_line_and_a_rerun_writes_the_model_without_training(
        cache_dir: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "run"

    def read_only(self, folder, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(Path(folder) / "model.safetensors"))
    monkeypatch.setattr(DetrCustomForObjectDetection, "save_pretrained", read_only)
    with pytest.raises(ValueError) as error:
        TRAIN["main"](tiny_run_args(out, cache_dir, *QUIET, steps=2))
    assert str(error.value) == (
        f"cannot write the final model {out / 'model.safetensors'}: Read-only file system (EROFS); training finished "
        f"and its final state is the complete checkpoint {out / 'checkpoints' / 'checkpoint-2'}; make {out} writable "
        "and rerun with --resume_from_checkpoint latest to write the model and results (no step is trained again)")
    monkeypatch.undo()
    fresh_accelerate_state_reset()
    TRAIN["main"](tiny_run_args(out, cache_dir, *QUIET, "--resume_from_checkpoint", "latest", steps=2))
    final, last = load_file(out / "model.safetensors"), load_file(out / "checkpoints" / "checkpoint-2" /
                                                                  "model.safetensors")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    assert [d["step"] for d in read_jsonl(out / "metrics.jsonl") if "train_loss_ce" in d] == [1, 2]


# ----------------------------------------------------------------------------- 4. offline ImageNet weights


def test_backbone_weights_that_cannot_be_fetched_offline_are_one_line_with_the_ways_out(cache_dir: Path,
                                                                                       tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PYTHONWARNINGS": "ignore"}
    args = tiny_run_args(tmp_path / "run", cache_dir, *QUIET, "--backbone_weights", "timm", "--num_threads", "1",
                         steps=1)
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *args], capture_output=True, text=True,
                          env=env, cwd=str(tmp_path), timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --backbone_weights timm: the ImageNet weights of the backbone 'test_resnet' "
                           "(timm/test_resnet.r160_in1k on the Hugging Face Hub) cannot be fetched: offline mode is "
                           "on"), last
    for way_out in ("--backbone_weights PATH", "--backbone_weights none", "fetch them once while online"):
        assert way_out in last


def test_a_resume_loads_no_backbone_weights(cache_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """The checkpoint replaces every weight: a resume of a run from ImageNet weights needs neither them nor the
    network."""
    import timm
    from safetensors.torch import save_file

    weights = tmp_path / "test_resnet.safetensors"
    save_file(timm.create_model("test_resnet").state_dict(), str(weights))
    out = tmp_path / "run"
    TRAIN["main"](tiny_run_args(out, cache_dir, *QUIET, "--backbone_weights", str(weights), steps=1))
    fresh_accelerate_state_reset()

    def unreachable(self, checkpoint=None):
        raise OSError(errno.ENETUNREACH, "Network is unreachable")
    monkeypatch.setattr(DetrCustomForObjectDetection, "load_pretrained_backbone", unreachable)
    results = TRAIN["main"](tiny_run_args(out, cache_dir, *QUIET, "--backbone_weights", str(weights),
                                          "--resume_from_checkpoint", "latest", steps=2))
    assert results["global_step"] == 2


# ----------------------------------------------------------------------------- 5. the umask


def test_the_files_of_a_run_follow_the_umask(finished_run: Path) -> None:
    """Under umask 022 every file is 0644: safetensors alone would leave model.safetensors 0600."""
    modes = {str(p.relative_to(finished_run)): oct(p.stat().st_mode & 0o777)
             for p in finished_run.rglob("*") if p.is_file()}
    assert "model.safetensors" in modes and "checkpoints/checkpoint-2/model.safetensors" in modes
    assert {k: v for k, v in modes.items() if v != "0o644"} == {}
    assert json.loads((finished_run / "all_results.json").read_text())["global_step"] == 2
