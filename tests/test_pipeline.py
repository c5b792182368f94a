"""The pipeline runtime on in-memory sources: correction, averaging, counters, shutdown."""

from __future__ import annotations

import time

import numpy as np
import pytest

from stream.frame import Frame
from stream.pipeline import Pipeline, percentiles_ms
from stream.publish import Publisher
from stream.source import MemorySource
from stream.wire import encode
from txmlive.config import Config

SHAPE = (32, 48)


def _frames(rng: np.random.Generator, n_data: int, *, energy_ev: float = 8000.0,
            start_seq: int = 0) -> tuple[list[Frame], np.ndarray, np.ndarray, list[np.ndarray]]:
    dark = rng.integers(90, 110, size=(3, *SHAPE)).astype(np.uint16)
    flat = rng.integers(4000, 5000, size=(3, *SHAPE)).astype(np.uint16)
    data = [rng.integers(200, 4000, size=SHAPE).astype(np.uint16) for _ in range(n_data)]
    frames, seq = [], start_seq
    for kind, stack in (("dark", list(dark)), ("flat", list(flat)), ("data", data)):
        for image in stack:
            frames.append(Frame(seq=seq, t_ns=seq, kind=kind, image=image, exposure_s=0.1,
                                energy_ev=energy_ev, attrs={"pixel_nm": 10.0}))
            seq += 1
    return frames, dark, flat, data


def _oracle(raw: np.ndarray, dark: np.ndarray, flat: np.ndarray) -> np.ndarray:
    d = dark.astype(np.float64).mean(0)
    return ((raw - d) / (flat.astype(np.float64).mean(0) - d)).astype(np.float32)


def _run(items, config: Config | None = None, **kw) -> tuple[dict, list[tuple[dict, np.ndarray]]]:
    config = config or Config()
    out: list[tuple[dict, np.ndarray]] = []
    pipeline = Pipeline(MemorySource(items), Publisher(None, None), config,
                        on_result=lambda r, b: out.append((r, b.image.copy())), **kw)
    return pipeline.run(), out


def test_corrects_every_frame_against_numpy_oracle():
    frames, dark, flat, data = _frames(np.random.default_rng(1), 10)
    summary, out = _run(frames)
    assert summary["frames"] == 10 and len(out) == 10
    for (result, image), raw in zip(out, data, strict=True):
        assert result["corrected"] and result["flags"] == []
        np.testing.assert_allclose(image, _oracle(raw, dark, flat), rtol=2e-6, atol=1e-6)
    c = summary["counters"]
    # 16 frames and the end frame
    assert (c["darks"], c["flats"], c["received"], c["dropped"], c["gaps"]) == (3, 3, 17, 0, 0)
    assert summary["errors"] == []


def test_block_average_and_seq_range():
    config = Config()
    config.averaging.frames = 4
    frames, dark, flat, data = _frames(np.random.default_rng(2), 10)
    summary, out = _run(frames, config)
    assert [(r["seq_first"], r["seq_last"], r["n_frames"]) for r, _ in out] == [
        (6, 9, 4), (10, 13, 4), (14, 15, 2)]
    assert "partial_block" in " ".join(out[-1][0]["flags"])
    expected = np.mean([_oracle(d, dark, flat) for d in data[:4]], axis=0)
    np.testing.assert_allclose(out[0][1], expected, rtol=1e-5, atol=1e-6)


def test_no_reference_passes_uncorrected_and_flagged():
    rng = np.random.default_rng(3)
    frames, *_ = _frames(rng, 3)
    other = Frame(seq=len(frames), t_ns=0, kind="data", image=np.full(SHAPE, 7, np.uint16),
                  exposure_s=0.1, energy_ev=9000.0)
    summary, out = _run([*frames, other])
    result, image = out[-1]
    assert not result["corrected"] and any("9000.0" in f for f in result["flags"])
    np.testing.assert_array_equal(image, 7.0)
    assert summary["counters"]["uncorrected"] == 1


def test_bad_messages_gaps_and_end():
    rng = np.random.default_rng(4)
    frames, *_ = _frames(rng, 20)
    items = []
    for i, frame in enumerate(frames):
        if i == 10:
            continue  # a lost frame: one sequence gap
        items.append(encode(frame))
        if i % 4 == 0:
            items.append([b"garbage"])
        if i % 7 == 0:
            items.append([b"\x81\xa1v\x09", b""])
    end = Frame(seq=99, t_ns=0, kind="end", image=np.empty((0, 0), np.uint16))
    summary, out = _run([*items, encode(end), encode(frames[-1])])
    c = summary["counters"]
    assert summary["frames"] == 19 and c["gaps"] == 1
    assert c["rejected"] == {"parts": 7, "version": 4} and c["rejected_total"] == 11
    assert c["ends"] == 1 and len(out) == 19  # nothing after the end frame


def test_max_frames_stops_and_reports_leftovers():
    frames, *_ = _frames(np.random.default_rng(5), 30)
    summary, out = _run(frames, max_frames=12)
    assert summary["frames"] == 12 and len(out) == 12


def test_references_retaken_midstream_replace_old_ones():
    rng = np.random.default_rng(6)
    first, dark1, flat1, data1 = _frames(rng, 2)
    second, dark2, flat2, data2 = _frames(rng, 2, start_seq=len(first))
    _, out = _run([*first, *second])
    assert out[0][0]["reference_id"] != out[-1][0]["reference_id"]
    np.testing.assert_allclose(out[-1][1], _oracle(data2[-1], dark2, flat2), rtol=2e-6,
                               atol=1e-6)


def test_percentiles():
    assert percentiles_ms([]) == {"p50": None, "p90": None, "p99": None, "max": None}
    p = percentiles_ms(list(range(101)))
    assert p["p50"] == pytest.approx(50) and p["max"] == 100


class _CapturingPublisher(Publisher):
    """Keeps every result as it would be sent (the real sending thread, no sockets)."""

    def __init__(self) -> None:
        super().__init__(None, None)
        self.sent: list[dict] = []

    def _send_result(self, result: dict) -> None:
        super()._send_result(result)
        self.sent.append(result)


class _SlowSource(MemorySource):
    def recv(self, timeout_s: float):
        time.sleep(0.03)
        return super().recv(timeout_s)


@pytest.mark.parametrize("slow", [False, True])
def test_roi_metrics_stage_keeps_order_and_says_which_frame(slow):
    from stream.metrics import METRIC_KEYS, MetricsConfig, MetricsEngine

    frames, *_ = _frames(np.random.default_rng(7), 40)
    publisher = _CapturingPublisher()
    source = (_SlowSource if slow else MemorySource)(frames)
    engine = MetricsEngine(MetricsConfig(roi=(0, 0, 32, 48)))
    summary = Pipeline(source, publisher, Config(), metrics=engine).run()
    assert [r["seq"] for r in publisher.sent] == list(range(46))  # references too, in order
    refs = [r for r in publisher.sent if r["kind"] != "data"]
    assert [r["kind"] for r in refs] == ["dark"] * 3 + ["flat"] * 3
    measured_refs = [r for r in refs if not r["flags"]]  # skipped, and flagged, when behind
    assert all(r["flags"] == ["metrics skipped: the metrics stage is behind"]
               for r in refs if r["flags"])
    for r in measured_refs:  # raw frame-wide metrics, no ROI metrics
        assert r["metrics"]["mean_counts"] > 0 and "brenner" not in r["metrics"]
        assert not r["corrected"] and r["metrics_seq"] == r["seq"]
    if slow:
        assert len(measured_refs) == 6
        assert refs[3]["metrics"]["mean_counts"] > 10 * refs[0]["metrics"]["mean_counts"]
    assert summary["counters"]["metrics_errors"] == 0
    for r in [r for r in publisher.sent if r["kind"] == "data"]:
        assert set(METRIC_KEYS) <= set(r["metrics"])
        assert r["metrics_seq"] is None or r["metrics_seq"] <= r["seq"]
        assert r["stamps"]["metrics"] >= r["stamps"]["correct"]
    measured = [r for r in publisher.sent if r["kind"] == "data" and r["metrics_seq"] == r["seq"]]
    skipped_refs = len(refs) - len(measured_refs)
    assert summary["counters"]["metrics_skipped"] == 40 - len(measured) + skipped_refs
    if slow:  # a stage that keeps up measures every frame itself
        assert len(measured) == 40
