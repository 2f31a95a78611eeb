"""benchmarks/bench_demo_time.py: the summary row, and a smoke run end to end (its fresh cache, what it records, a
rerun refused without touching the first measurement)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_demo_time as bench  # noqa: E402


def test_the_row_gives_each_seed_in_run_order_and_min_median_max() -> None:
    runs = [{"AP50": 0.874, "AP": 0.609, "command_min": 4.23, "train_min": 4.03},
            {"AP50": 0.866, "AP": 0.612, "command_min": 4.67, "train_min": 4.43},
            {"AP50": 0.935, "AP": 0.662, "command_min": 4.49, "train_min": 4.23}]
    assert bench.summary_row(runs, "AVX2, Some CPU", "2026-12-07") == (
        "| AVX2, Some CPU (2026-12-07) | 0.874 / 0.866 / 0.935 | 0.866 / 0.874 / 0.935 | 0.609 / 0.612 / 0.662 | "
        "4.23 / 4.67 / 4.49 min | 4.03 / 4.43 / 4.23 min |")


def test_a_smoke_run_records_the_run_and_a_rerun_never_overwrites_it(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    tiny = ["--max_steps", "2", "--synthetic_num_train", "16", "--synthetic_num_val", "8", "--picture_images", "0"]
    result = bench.main(["--output_dir", str(out), "--seeds", "3", "--", *tiny])
    (run,) = result["runs"]
    assert run["seed"] == 3 and isinstance(run["threads"], int) and run["threads"] >= 1
    assert run["command_min"] > run["train_min"] > 0 and 0 <= run["AP50"] <= 1
    recorded = json.loads((out / "seed3" / "training_args.json").read_text())
    assert (recorded["seed"], recorded["max_steps"]) == (3, 2), "the seed and the extra options reach train.py"
    assert not (out / ".cache_seed3").exists(), "each seed's fresh data cache is removed after its run"
    assert result["summary"]["row"] == bench.summary_row(result["runs"], result["cpu"],
                                                          result["environment"]["date"])
    saved = (out / "demo_time.json").read_text()
    assert json.loads(saved)["runs"] == result["runs"]
    with pytest.raises(SystemExit, match="seed3 exists: an earlier measurement"):
        bench.main(["--output_dir", str(out), "--seeds", "3", "--", *tiny])
    assert (out / "demo_time.json").read_text() == saved
