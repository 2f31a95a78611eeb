"""benchmarks/bench_cpu_inference.py (issue 21 items 2-3): FLOP counts, the peak, bf16 drift, and a quick run's JSON."""

from __future__ import annotations

import copy
import io
import json
import sys
from contextlib import redirect_stderr, redirect_stdout
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT

from modeling_detr_custom.image_processing_detr_custom import DetrCustomImageProcessor

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_cpu_inference as bench  # noqa: E402

AMD_ZEN4 = {"vendor_id": "AuthenticAMD", "cpu family": "25", "flags": "fma avx2 avx512f avx512_bf16"}
INTEL_AVX512 = {"vendor_id": "GenuineIntel", "cpu family": "6", "flags": "fma avx2 avx512f"}
INTEL_AVX2 = {"vendor_id": "GenuineIntel", "cpu family": "6", "flags": "fma avx2"}


def test_flops_of_a_linear_and_a_convolution_are_two_per_multiply_add() -> None:
    m, k, n = 3, 5, 7
    linear = torch.nn.Linear(k, n).requires_grad_(False)
    assert bench.count_flops(lambda: linear(torch.randn(m, k))) == 2 * m * n * k
    conv = torch.nn.Conv2d(4, 6, kernel_size=3, padding=1).requires_grad_(False)
    # (2, 4, 8, 10) -> (2, 6, 8, 10): every output value sums 4 * 3 * 3 products
    assert bench.count_flops(lambda: conv(torch.randn(2, 4, 8, 10))) == 2 * (2 * 6 * 8 * 10) * (4 * 3 * 3)


def test_flops_count_under_inference_mode_with_a_parameter_passed_to_a_submodule() -> None:
    # the model passes its query embedding (a parameter) to the decoder; FlopCounterMode's module tracker fails on
    # an input requiring grad under inference_mode, hence requires_grad_(False) in build_model
    model = bench.build_model("demo")
    assert not any(p.requires_grad for p in model.parameters())
    pixel_values = torch.randn(1, 3, 64, 64)

    def forward():
        with torch.inference_mode():
            return model(pixel_values=pixel_values)

    assert bench.count_flops(forward) > 0


@pytest.mark.parametrize("fields, per_cycle", [(AMD_ZEN4, 32), (INTEL_AVX512, 64), (INTEL_AVX2, 32),
                                               ({**AMD_ZEN4, "cpu family": "26"}, 64),
                                               ({"flags": "avx sse4_2"}, None)])
def test_flop_per_cycle_follows_the_stated_assumption(fields: dict[str, str], per_cycle: int | None) -> None:
    found, assumption = bench.flop_per_cycle(fields)
    assert found == per_cycle
    assert assumption  # always says why


def test_theoretical_peak_is_threads_times_clock_times_flop_per_cycle(monkeypatch) -> None:
    monkeypatch.setattr(bench, "cpu_clock_mhz", lambda: (2500.0, "test"))
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 8)
    peak = bench.theoretical_peak(2, AMD_ZEN4)
    assert peak["gflop_per_s"] == pytest.approx(2 * 2.5 * 32) and peak["cores"] == 2
    assert bench.theoretical_peak(16, AMD_ZEN4)["cores"] == 8  # no more cores than the machine has
    monkeypatch.setattr(bench, "cpu_clock_mhz", lambda: (None, "no clock"))
    assert bench.theoretical_peak(2, AMD_ZEN4)["gflop_per_s"] is None


def test_a_measured_figure_above_the_theoretical_peak_is_explained() -> None:
    result = {"machine": {"theoretical_fp32_peak": {"gflop_per_s": 80.0, "clock_mhz": 2500.0, "clock_source": "test"},
                          "sgemm": {"gflop_per_s": 70.0}},
              "models": {"r50": {"paths": {"onnxruntime": {"gflop_per_s": 60.0}, "eager_bf16": {}}}}}
    assert bench.peak_note(result) is None
    result["models"]["r50"]["paths"]["onnxruntime"]["gflop_per_s"] = 90.0
    assert bench.peak_note(result).startswith("r50 onnxruntime (90.0 GFLOP/s) beats") and "2500 MHz" in \
        bench.peak_note(result)
    result["machine"]["sgemm"]["gflop_per_s"] = 95.0
    assert bench.peak_note(result).startswith("sgemm (95.0 GFLOP/s)")


def test_the_sgemm_peak_keeps_the_better_of_the_two_measurements() -> None:
    start, end = {"gflop_per_s": 50.0, "per_size": {"2048": 50.0}}, {"gflop_per_s": 60.0, "per_size": {"2048": 60.0}}
    assert bench.best_peak(start, end) == {"gflop_per_s": 60.0, "per_size": {"2048": 60.0},
                                           "gflop_per_s_at_start": 50.0, "gflop_per_s_at_end": 60.0}


def outputs(logits: torch.Tensor, boxes: torch.Tensor) -> SimpleNamespace:
    return SimpleNamespace(logits=logits, pred_boxes=boxes)


def test_bf16_drift_measures_scores_normalised_boxes_and_pixels() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 5, 4, generator=generator)
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2]] * 5])  # well inside the image: no clipping
    shifted = boxes.clone()
    shifted[0, 2, 0] += 0.01  # one centre moves right by 1% of the width
    # bf16 logits as autocast gives them; the boxes stay float32 so that the shift is exact
    fp32, bf16 = outputs(logits, boxes), outputs(logits.to(torch.bfloat16), shifted)
    drift = bench.bf16_drift(fp32, bf16, DetrCustomImageProcessor(), canvas=(100, 200))
    assert drift["max_abs_box_diff_cxcywh"] == pytest.approx(0.01, rel=1e-4)
    assert drift["max_abs_box_diff_px"] == pytest.approx(0.01 * 200, rel=1e-4)  # x0 and x1 move by 2 px
    assert 0 < drift["max_abs_score_diff"] < 1e-2  # only bf16's rounding of the logits
    assert drift["detections"] == [5, 5] and drift["label_changes"] == 0
    same = bench.bf16_drift(fp32, fp32, DetrCustomImageProcessor(), canvas=(100, 200))
    assert same["max_abs_score_diff"] == same["max_abs_box_diff_cxcywh"] == same["max_abs_box_diff_px"] == 0


def test_bf16_is_skipped_with_the_reason_where_the_cpu_or_the_module_lacks_it(monkeypatch) -> None:
    precision = pytest.importorskip("modeling_detr_custom.precision")

    def refuse(dtype: str, device: str) -> None:
        raise ValueError("--dtype bf16 needs a CPU with native bfloat16; this CPU has AVX2")

    monkeypatch.setattr(precision, "check_inference_dtype", refuse)
    assert bench.bf16_autocast() == (None, "--dtype bf16 needs a CPU with native bfloat16; this CPU has AVX2")
    monkeypatch.setitem(sys.modules, "modeling_detr_custom.precision", None)  # import raises ImportError
    factory, reason = bench.bf16_autocast()
    assert factory is None and reason.startswith("modeling_detr_custom.precision not importable")


def test_bad_options_are_refused_in_one_line(capsys) -> None:
    for argv, message in ((["--threads", "0"], "--threads must be at least 1; got 0"),
                          (["--repeats", "0"], "--repeats must be at least 1; got 0"),
                          (["--sgemm_sizes", "0"], "--sgemm_sizes must be positive; got [0]")):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> tuple[dict, dict, str, str]:
    """One quick run of the demo model on one thread: (returned result, JSON file, stdout, stderr)."""
    output = tmp_path_factory.mktemp("bench") / "cpu.json"
    threads = torch.get_num_threads()
    capture = pytest.MonkeyPatch()
    capture.setattr(bench.os, "getloadavg", lambda: (0.75, 0.5, 0.25))  # a busy machine, as far as it knows
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            result = bench.main(["--quick", "--models", "demo", "--threads", "1", "--repeats", "3",
                                 "--sgemm_sizes", "128", "--output", str(output)])
    finally:
        capture.undo()
        torch.set_num_threads(threads)
    return result, json.loads(output.read_text()), out.getvalue(), err.getvalue()


def test_quick_run_writes_the_environment_the_machine_and_the_load(quick_demo) -> None:
    _, saved, _, err = quick_demo
    env, machine = saved["environment"], saved["machine"]
    for key in ("date", "command", "argv", "torch", "onnxruntime", "timm", "cpu_kind"):
        assert env[key], key
    assert env["argv"][1:3] == ["benchmarks/bench_cpu_inference.py", "--quick"]
    assert machine["cpu_kind"] in ("AVX-512", "AVX2") and machine["threads"] == 1
    assert machine["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(machine["flags"]) >= {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
    for key in ("cpu_model_name", "nproc", "theoretical_fp32_peak"):
        assert key in machine, key
    assert machine["sgemm"]["name"] == "sgemm GFLOP/s, measured" and machine["sgemm"]["gflop_per_s"] > 0
    assert list(machine["sgemm"]["per_size"]) == ["128"] and "peak_note" in machine
    assert machine["sgemm"]["gflop_per_s"] == max(machine["sgemm"]["gflop_per_s_at_start"],
                                                  machine["sgemm"]["gflop_per_s_at_end"])
    assert saved["load_average_start"] == saved["load_average_end"] == [0.75, 0.5, 0.25]
    assert "not an idle machine" in err and saved["repeats"] == {"demo": 3}


def test_quick_run_ratios_and_gflops_follow_from_the_medians(quick_demo) -> None:
    demo = quick_demo[1]["models"]["demo"]
    paths, flops = demo["paths"], demo["flops"]
    assert set(paths) | set(demo["skipped"]) == set(bench.PATHS)
    eager = paths["eager_fp32"]["median_ms"]
    for name, p in paths.items():
        assert p["repeats"] == 3 == len(p["wall_s"])
        assert p["median_ms"] == pytest.approx(sorted(p["wall_s"])[1] * 1e3)
        assert p["q1_ms"] <= p["median_ms"] <= p["q3_ms"] and p["iqr_ms"] == pytest.approx(p["q3_ms"] - p["q1_ms"])
        assert p["ratio_to_eager_fp32"] == pytest.approx(p["median_ms"] / eager), name
    assert flops["eager_fp32"] == flops["onnxruntime"] > flops["timm_body"] > 0
    for name in ("eager_fp32", "onnxruntime", "timm_body"):
        p = paths[name]
        assert p["gflop_per_s"] == pytest.approx(flops[name] / 1e9 / (p["median_ms"] / 1e3))
        assert p["fraction_of_sgemm_peak"] == pytest.approx(
            p["gflop_per_s"] / quick_demo[1]["machine"]["sgemm"]["gflop_per_s"])
    target = demo["target"]
    assert target["limit"] == 3.0 and target["eager_fp32_over_onnxruntime"] == pytest.approx(
        eager / paths["onnxruntime"]["median_ms"])
    assert demo["onnx_max_abs_diff"]["logits"] < 1e-4


def test_quick_run_has_the_bf16_drift_or_the_reason_it_was_skipped(quick_demo) -> None:
    demo = quick_demo[1]["models"]["demo"]
    if "eager_bf16" in demo["skipped"]:
        assert demo["bf16_drift"] == {"skipped": demo["skipped"]["eager_bf16"]} and demo["skipped"]["eager_bf16"]
    else:
        drift = demo["bf16_drift"]
        assert set(drift) >= {"max_abs_score_diff", "max_abs_box_diff_cxcywh", "max_abs_box_diff_px"}
        assert 0 < drift["max_abs_score_diff"] < 0.1 and drift["detections"] == [10, 10]


def test_the_table_names_the_cpu_the_command_and_every_path(quick_demo) -> None:
    result, saved, out, _ = quick_demo
    table = out[out.index(saved["environment"]["date"] + ", "):]
    assert saved["machine"]["cpu_kind"] in table and saved["environment"]["command"] in table
    for path in bench.PATHS:
        assert f"| demo | 64x64 | {path} |" in table
    skipped = copy.deepcopy(result)  # as an AVX2 machine reports it
    del skipped["models"]["demo"]["paths"]["eager_bf16"]
    skipped["models"]["demo"]["skipped"] = {"eager_bf16": "no bf16 here"}
    skipped["models"]["demo"]["bf16_drift"] = {"skipped": "no bf16 here"}
    assert "| demo | 64x64 | eager_bf16 | skipped: no bf16 here |" in bench.markdown(skipped)
    assert "bf16 skipped: no bf16 here" in bench.markdown(skipped)


def test_the_timm_body_is_the_models_backbone_at_its_stride() -> None:
    model = bench.build_model("demo")
    body = bench.build_timm_body(model.config)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        ours = model.model.backbone.body(x)[-1]
        theirs = body(x)[-1]
    assert ours.shape == theirs.shape == (1, model.model.backbone.num_channels, 8, 8)  # stride 8

