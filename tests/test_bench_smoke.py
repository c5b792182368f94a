"""The benchmarks in smoke mode (tiny frames, a few seconds each): every subcommand runs end to
end through ``bench.cli`` and writes well-formed JSON with the documented keys, the report
turns them into Markdown, and the harness arithmetic (clock offset, stages, rate search,
verdicts) is right. Nothing here asserts speed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.baseline import central_roi, numpy_psd, radial_bins
from bench.cli import main
from bench.latency import STAGE_NAMES, analyze, clock_offset_ns, stage_times_ms
from bench.throughput import evaluate, next_rate, parse_sizes

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PERCENTILE_KEYS = {"p50", "p90", "p99", "max"}


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench_out")


@pytest.fixture(scope="module")
def kernels_json(out_dir) -> dict:
    path = out_dir / "kernels.json"
    assert main(["kernels", "--size", "64", "--roi", "32", "--repeats", "2",
                 "--json", str(path)]) == 0
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def latency_json(out_dir) -> dict:
    path = out_dir / "latency.json"
    assert main(["latency", "--size", "64", "--fps", "200", "--frames", "30",
                 "--warmup-frames", "5", "--baseline-frames", "20", "--json", str(path)]) == 0
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def throughput_json(out_dir) -> dict:
    path = out_dir / "throughput.json"
    assert main(["throughput", "--sizes", "64", "--trial-s", "0.2", "--min-frames", "8",
                 "--max-trials", "2", "--start-fps", "40", "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_kernels_json(kernels_json):
    assert kernels_json["kind"] == "kernels"
    assert kernels_json["settings"] == {"size": 64, "roi": 32, "repeats": 2}
    machine = kernels_json["machine"]
    assert machine["usable_cores"] >= 1 and machine["copy_gb_per_s"] > 0
    names = [case["name"] for case in kernels_json["cases"]]
    assert names == ["correct N=1", "correct N=4", "psd 32", "register 32", "centroid 64",
                     "bin 8 64", "all metrics 64"]
    for case in kernels_json["cases"]:
        roles = [row["role"] for row in case["variants"]]
        assert roles.count("kernel") == roles.count("numpy") == roles.count("floor") == 1
        for row in case["variants"]:
            assert len(row["samples_ms"]) == 2 and row["median_ms"] > 0
            assert row["numpy_over_this"] > 0 and row["this_over_floor"] > 0
        floor = next(r for r in case["variants"] if r["role"] == "floor")
        assert floor["this_over_floor"] == pytest.approx(1.0)


def _check_target(run: dict, frames: int, stages: set[str]) -> None:
    assert run["results"] == frames and run["missing_results"] == 0
    assert stages <= set(run["stages_ms"]) <= set(STAGE_NAMES)
    stages = set(run["stages_ms"])
    for stats in (*run["stages_ms"].values(), run["end_to_end_ms"]):
        assert set(stats) == PERCENTILE_KEYS
        assert 0 <= stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]
    assert run["counters"]["dropped"] == 0 and run["counters"]["rejected_total"] == 0
    assert run["counters"]["gaps"] == 0
    assert run["sender"]["sent"]["data"] == frames and run["process"]["returncode"] == 0
    per_frame = run["per_frame"]
    assert len(per_frame["end_to_end_ms"]) == len(per_frame["seq"]) == frames
    # the stages of every frame add up to its end-to-end latency, up to the clock offset jitter
    for k, e2e in enumerate(per_frame["end_to_end_ms"]):
        total = sum(per_frame[name][k] for name in stages if per_frame[name][k] is not None)
        assert total == pytest.approx(e2e, abs=run["clock_offset_jitter_ms"] + 0.01)


def test_latency_json(latency_json):
    assert latency_json["kind"] == "latency"
    assert latency_json["settings"]["fps"] == 200 and latency_json["settings"]["size"] == 64
    run = latency_json["runs"][0]
    _check_target(run["product"], 30, {"receive", "queue", "correct", "metrics", "publish"})
    _check_target(run["baseline"], 20, {"receive", "correct", "metrics", "publish"})
    assert run["product"]["warmup"]["frames"] == 5
    assert 0 <= run["product"]["own_metrics_fraction"] <= 1
    assert run["baseline"]["own_metrics_fraction"] is None
    summary = latency_json["summary"]
    assert summary["runs"] == 1
    assert set(summary["baseline_over_product"]) == PERCENTILE_KEYS
    assert summary["product"]["end_to_end_ms"] == run["product"]["end_to_end_ms"]


@pytest.mark.skipif(not (DATA / "dls-savu-projections").is_dir(),
                    reason="shared data folder dls-savu-projections is absent")
def test_latency_replays_a_recorded_series(tmp_path):
    path = tmp_path / "latency.json"
    assert main(["latency", "--input", str(DATA / "dls-savu-projections"), "--fps", "200",
                 "--frames", "20", "--warmup-frames", "2", "--baseline-frames", "0",
                 "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    run = report["runs"][0]
    assert "baseline" not in run and report["settings"]["size"] is None
    product = run["product"]
    assert product["results"] == 20 and product["missing_results"] == 0
    # the recorded dark and flat went with the warm-up series, so every data frame was corrected
    assert product["sender"]["sent"] == {"dark": 0, "flat": 0, "data": 20}
    assert product["counters"]["uncorrected"] == 0


def test_throughput_json(throughput_json):
    assert throughput_json["kind"] == "throughput"
    assert throughput_json["settings"]["sizes"] == [64]
    for target in ("product", "baseline"):
        found = throughput_json["runs"][0][target]["64"]
        assert found["size"] == 64 and found["pixels"] == 64 * 64
        assert 1 <= len(found["trials"]) <= 2
        for trial in found["trials"]:
            assert {"fps", "frames", "sender_fps", "missing_results", "dropped",
                    "end_to_end_ms", "stages_p50_ms", "sustained", "reasons"} <= set(trial)
            assert trial["sustained"] == (not trial["reasons"])
            assert trial["frames"] >= 8
        sustained = [t["fps"] for t in found["trials"] if t["sustained"]]
        assert found["max_fps"] == max(sustained, default=0.0)
        if found["max_fps"]:
            assert found["ns_per_px"] == pytest.approx(1e9 / (found["max_fps"] * 64 * 64))
    row = throughput_json["summary"]["sizes"][0]
    assert row["size"] == 64 and {"product", "baseline"} <= set(row)


def test_report_markdown(out_dir, kernels_json, latency_json, throughput_json, tmp_path):
    results = tmp_path / "RESULTS.md"
    assert main(["report", "--out-dir", str(out_dir), "--results", str(results)]) == 0
    text = results.read_text()
    for heading in ("## Machine", "## Targets", "## Latency", "## Throughput", "## Kernels",
                    "## Plots"):
        assert heading in text
    assert "| stage (ms) | product p50 |" in text and "baseline / product p99" in text
    assert "| frame | product fps |" in text and "product / baseline" in text
    assert "| psd 32 | RadialPsd" in text
    assert "GB/s" in text and "load" in text


def test_plots_when_matplotlib_is_installed(latency_json, throughput_json, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is optional; plots are not drawn")
    from bench.latency import plot_latency
    from bench.throughput import plot_throughput

    for path in (plot_latency(latency_json, tmp_path / "latency.png"),
                 plot_throughput(throughput_json, tmp_path / "throughput.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_usage_errors_exit_2():
    for argv in (["latency", "--fps", "0"], ["throughput", "--sizes", "a,b"],
                 ["kernels", "--roi", "16"], ["nonsense"]):
        with pytest.raises(SystemExit) as err:
            main(argv)
        assert err.value.code == 2


def _result(seq: int, t_ns: int, offset_ns: int, stage_ms: dict[str, float]) -> dict:
    """A result whose stamps sit ``stage_ms`` apart on a monotonic clock ``offset_ns`` behind."""
    mono = t_ns - offset_ns
    stamps = {}
    for stamp, ms in stage_ms.items():
        mono += round(ms * 1e6)
        stamps[stamp] = mono
    return {"seq": seq, "seq_first": seq, "seq_last": seq, "t_ns": t_ns, "stamps": stamps,
            "latency_ms": (stamps["publish"] + offset_ns - t_ns) / 1e6, "counters": {}}


def test_clock_offset_and_stages():
    offset = 1_700_000_000_000_000_000 - 5_000_000_000
    stages = {"recv": 1.5, "dequeue": 0.25, "correct": 4.0, "metrics": 2.0, "publish": 0.5}
    results = [_result(k, 1_700_000_000_000_000_000 + k * 10_000_000, offset, stages)
               for k in range(5)]
    assert clock_offset_ns(results) == offset
    times = stage_times_ms(results[0], offset)
    assert times == pytest.approx({"receive": 1.5, "queue": 0.25, "correct": 4.0,
                                   "metrics": 2.0, "publish": 0.5})
    stats = analyze(results[1:], range(0, 5))
    assert stats["results"] == 4 and stats["missing_results"] == 1
    assert stats["end_to_end_ms"]["p50"] == pytest.approx(8.25)
    assert "average" not in stats["stages_ms"]
    with pytest.raises(ValueError, match="no results"):
        clock_offset_ns([])


def test_rate_search_and_verdicts():
    assert next_rate(100.0, 100.0, None) == 200.0
    assert next_rate(100.0, None, 100.0) == 50.0
    assert next_rate(150.0, 100.0, 400.0) == pytest.approx(200.0)
    stats = {"missing_results": 0, "end_to_end_ms": {"p50": 2.0, "p90": 3.0, "p99": 4.0,
                                                      "max": 5.0},
             "stages_ms": {}, "own_metrics_fraction": None, "counters_last": {"dropped": 3}}
    sent = {"fps": 99.5, "max_lag_s": 0.001}
    ok = evaluate(100.0, 300, sent, stats, {"dropped": 3}, latency_periods=3,
                  latency_floor_ms=5)
    assert ok["sustained"] and ok["dropped"] == 0 and ok["latency_limit_ms"] == 30.0
    bad = evaluate(1000.0, 300, {"fps": 900.0, "max_lag_s": 0.1}, stats, {"dropped": 1},
                   latency_periods=3, latency_floor_ms=3)
    assert not bad["sustained"] and bad["dropped"] == 2
    assert any("sender" in r for r in bad["reasons"]) and any("p99" in r for r in bad["reasons"])
    assert parse_sizes("512, 1024") == [512, 1024]
    with pytest.raises(ValueError, match="sizes"):
        parse_sizes("4")


def test_baseline_psd_of_white_noise_reads_its_variance():
    rng = np.random.default_rng(3)
    image = rng.normal(100.0, 4.0, (256, 300))
    roi = central_roi(image, 128)
    assert roi.shape == (128, 128)
    psd = numpy_psd(roi, radial_bins(roi.shape))
    assert psd.shape == (64,)
    assert np.median(psd) == pytest.approx(16.0, rel=0.1)


def test_feedback_comparison_smoke(out_dir):
    # Accuracy, not speed: one start per dose and a short beam hold, scored by the simulator.
    path = out_dir / "feedback.json"
    assert main(["feedback", "--starts", "1", "--beam-seconds", "5", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["kind"] == "feedback"
    for dose in ("normal", "low"):
        block = report["autofocus"]["doses"][dose]
        assert block["runs"][0]["autofocus"]["verdict"] == "resolved"
        assert block["autofocus"]["max_error_dof"] <= 0.2
        assert block["hill_climb"]["median_frames"] >= 5
    assert report["shaker"]["tuned"]["cv"] <= 0.02 < report["shaker"]["rule_of_thumb"]["cv"]
    for method in ("pi", "fixed_step"):
        assert {"rms_px", "settled_rms_px", "moves"} <= set(report["beam"][method])
    from bench.report import feedback_section
    assert any("hill-climber" in line for line in feedback_section(out_dir))
