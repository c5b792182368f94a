"""The HDF5 recorder: real files in tmp_path, a real SWMR reader in another process."""

from __future__ import annotations

import datetime
import json
import logging
import subprocess
import sys
import textwrap
import time
from collections import namedtuple
from pathlib import Path

import h5py
import numpy as np
import pytest

from stream.recorder import (
    FLAGS_BYTES,
    MIN_FREE_BYTES,
    TXMLIVE_VERSION,
    Recorder,
    RecorderClosedError,
    RecorderError,
    rollover_path,
)

REPO = Path(__file__).resolve().parents[1]
T0_NS = 1_700_000_000_000_000_000


def meta(seq: int, **extra) -> dict:
    """Metadata of frame ``seq``; every value depends on ``seq`` so mix-ups show."""
    return {"seq": seq, "t_ns": T0_NS + 1000 * seq, "energy_ev": 8000.0 + seq,
            "exposure_s": 0.05 + seq / 1000, "positions": {"zp_z_um": 0.5 * seq,
                                                           "sample_x_um": -1.0 * seq},
            "moving": seq % 2 == 1, **extra}


def frame(value: float, shape=(6, 5), dtype=np.uint16) -> np.ndarray:
    rng = np.random.default_rng(int(value))
    return (rng.integers(0, 100, shape) + value).astype(dtype)


def wait_for(predicate, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.mark.parametrize(("mode", "dtype"), [("raw", np.uint16), ("processed", np.float32)])
def test_round_trip_of_data_dark_flat_with_metadata(tmp_path, mode, dtype):
    path = tmp_path / "scan.h5"
    config = {"correction": {"reference_frames": 10}, "averaging": {"frames": 4}}
    darks = [frame(1, dtype=dtype), frame(2, dtype=dtype)]
    flats = [frame(1000, dtype=dtype)]
    datas = [frame(500 + i, dtype=dtype) for i in range(3)]
    with Recorder(path, flush_interval_s=0.1, attrs={"mode": mode, "config": config,
                                                     "pixel_nm": 10.0}) as rec:
        for i, image in enumerate(darks):
            rec.submit("dark", image, meta(i, reference_id=7))
        rec.submit("flat", flats[0], meta(2, reference_id=7, n_frames=10, seq_first=2,
                                          seq_last=11))
        for i, image in enumerate(datas):
            rec.submit("data", image, meta(20 + 4 * i, seq_first=20 + 4 * i,
                                           seq_last=23 + 4 * i, n_frames=4, reference_id=7,
                                           flags=["moving", "low_flux"] if i == 1 else []))
        rec.submit("data", datas[0], meta(40))  # no optional keys: the documented defaults
    summary = rec.close()
    assert summary["submitted"] == summary["written"] == 7
    assert summary["backlog"] == 0 and summary["files"] == [str(path)]
    assert summary["error"] is None

    with h5py.File(path, "r") as f:
        assert f.attrs["mode"] == mode
        assert json.loads(f.attrs["config"]) == config
        assert f.attrs["pixel_nm"] == 10.0
        assert f.attrs["txmlive_version"] == TXMLIVE_VERSION
        assert datetime.datetime.fromisoformat(f.attrs["created"]).tzinfo is not None
        ex = f["exchange"]
        for name, images in [("data", datas + [datas[0]]), ("data_dark", darks),
                             ("data_white", flats)]:
            ds = ex[name]
            assert ds.dtype == dtype
            assert ds.chunks == (1, 6, 5) and ds.maxshape == (None, 6, 5)
            np.testing.assert_array_equal(ds[:], np.stack(images))
        np.testing.assert_array_equal(ex["seq"][:], [20, 24, 28, 40])
        np.testing.assert_array_equal(ex["t_ns"][:], [T0_NS + 1000 * s for s in (20, 24, 28, 40)])
        np.testing.assert_allclose(ex["energy_ev"][:], [8020, 8024, 8028, 8040])
        np.testing.assert_allclose(ex["exposure_s"][:], [0.07, 0.074, 0.078, 0.09])
        np.testing.assert_array_equal(ex["moving"][:], [False] * 4)
        assert list(ex["positions"].attrs["roles"]) == ["sample_x_um", "zp_z_um"]
        np.testing.assert_allclose(ex["positions"][:],
                                   [[-s, 0.5 * s] for s in (20, 24, 28, 40)])
        np.testing.assert_array_equal(ex["seq_first"][:], [20, 24, 28, 40])
        np.testing.assert_array_equal(ex["seq_last"][:], [23, 27, 31, 40])
        np.testing.assert_array_equal(ex["n_frames"][:], [4, 4, 4, 1])
        np.testing.assert_array_equal(ex["reference_id"][:], [7, 7, 7, -1])
        assert list(ex["flags"][:]) == [b"", b"moving; low_flux", b"", b""]
        assert ex["flags"].dtype == np.dtype(f"S{FLAGS_BYTES}")
        assert ex["t_ns"].attrs["units"] == "ns" and ex["energy_ev"].attrs["units"] == "eV"
        # darks and flats carry the same metadata under their prefixes
        np.testing.assert_array_equal(ex["dark_seq"][:], [0, 1])
        np.testing.assert_array_equal(ex["dark_moving"][:], [False, True])
        np.testing.assert_allclose(ex["dark_energy_ev"][:], [8000, 8001])
        np.testing.assert_array_equal(ex["white_seq"][:], [2])
        np.testing.assert_array_equal(ex["white_n_frames"][:], [10])
        np.testing.assert_array_equal(ex["white_seq_last"][:], [11])
        np.testing.assert_allclose(ex["white_positions"][:], [[-2.0, 1.0]])
        # a reader finds the references each data frame was corrected with
        used = ex["reference_id"][1]
        dark_rows = np.flatnonzero(ex["dark_reference_id"][:] == used)
        white_rows = np.flatnonzero(ex["white_reference_id"][:] == used)
        np.testing.assert_array_equal(dark_rows, [0, 1])
        np.testing.assert_array_equal(white_rows, [0])


READER = textwrap.dedent("""
    import json, sys, time
    import h5py
    path, want = sys.argv[1], int(sys.argv[2])
    deadline = time.monotonic() + 60
    f = None
    while f is None and time.monotonic() < deadline:
        try:
            f = h5py.File(path, "r", libver="latest", swmr=True)
        except OSError:  # not created yet, or not yet switched to SWMR
            time.sleep(0.02)
    data, seq = f["exchange/data"], f["exchange/seq"]
    seen = []
    while time.monotonic() < deadline:
        data.refresh()
        seq.refresh()
        if not seen or data.shape[0] != seen[-1]:
            seen.append(data.shape[0])
        if data.shape[0] >= want:
            print(json.dumps({"seen": seen, "seq": seq[:want].tolist(),
                              "pixel": data[:want, 0, 0].tolist()}))
            sys.exit(0)
        time.sleep(0.02)
    sys.exit(f"only saw {seen}")
""")


def test_swmr_reader_sees_frames_while_recorder_is_open(tmp_path):
    path = tmp_path / "live.h5"
    rec = Recorder(path, flush_interval_s=0.2)
    rec.start()
    rec.submit("data", np.full((4, 4), 100, np.uint16), meta(0))
    reader = subprocess.Popen([sys.executable, "-c", READER, str(path), "4"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: rec.counters["written"] == 1)
        for i in range(1, 4):  # then the stream pauses: the idle flush must show them
            rec.submit("data", np.full((4, 4), 100 + i, np.uint16), meta(i))
        out, err = reader.communicate(timeout=90)
    finally:
        reader.kill()
    assert reader.returncode == 0, err
    seen = json.loads(out)
    assert seen["seq"] == [0, 1, 2, 3]
    assert seen["pixel"] == [100, 101, 102, 103]
    assert rec.counters["written"] == 4  # ... all while the recorder is still open
    assert rec.close()["written"] == 4


def test_burst_of_1000_frames_is_written_completely_in_order(tmp_path):
    path = tmp_path / "burst.h5"
    rec = Recorder(path, warn_backlog_frames=10_000)
    rec.start()
    image = np.empty((8, 8), np.uint16)
    for i in range(1000):
        image[:] = i  # the caller reuses one buffer, like the pipeline
        rec.submit("data", image, meta(i))
    summary = rec.close()
    assert summary["submitted"] == summary["written"] == 1000
    assert summary["backlog"] == 0 and 1 <= summary["max_backlog"] <= 1000
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["exchange/seq"][:], np.arange(1000))
        data = f["exchange/data"][:]
        np.testing.assert_array_equal(data, np.broadcast_to(np.arange(1000)[:, None, None],
                                                            (1000, 8, 8)))


def test_shape_or_lossy_dtype_change_rolls_over_to_a_new_file(tmp_path, caplog):
    path = tmp_path / "scan.h5"
    caplog.set_level(logging.WARNING, logger="stream.recorder")
    with Recorder(path) as rec:
        rec.submit("data", frame(1), meta(0))
        rec.submit("data", frame(2, dtype=np.uint8), meta(1))  # fits uint16 losslessly
        rec.submit("data", frame(3, shape=(12, 10)), meta(2))
        rec.submit("data", frame(4, shape=(12, 10)), meta(3))
        rec.submit("data", frame(5, shape=(12, 10), dtype=np.float32), meta(4))
    summary = rec.counters
    assert summary["written"] == 5
    assert summary["files"] == [str(path), str(rollover_path(path, 1)),
                                str(rollover_path(path, 2))]
    assert Path(summary["files"][1]).name == "scan_0001.h5"
    assert "shape (12, 10)" in summary["rollovers"][0]["reason"]
    assert "float32" in summary["rollovers"][1]["reason"]
    assert sum("rolls over" in r.message for r in caplog.records) == 2
    with h5py.File(path) as f:
        np.testing.assert_array_equal(f["exchange/seq"][:], [0, 1])
        np.testing.assert_array_equal(f["exchange/data"][1], frame(2, dtype=np.uint8))
    with h5py.File(rollover_path(path, 1)) as f:
        assert f["exchange/data"].shape == (2, 12, 10)
        assert f.attrs["previous_file"] == "scan.h5" and f.attrs["file_index"] == 1
        np.testing.assert_array_equal(f["exchange/data"][:], [frame(3, (12, 10)),
                                                             frame(4, (12, 10))])
    with h5py.File(rollover_path(path, 2)) as f:
        assert f["exchange/data"].dtype == np.float32
        np.testing.assert_array_equal(f["exchange/seq"][:], [4])


def test_new_positions_role_rolls_over_and_carries_the_references(tmp_path):
    path = tmp_path / "scan.h5"
    with Recorder(path) as rec:
        rec.submit("dark", frame(1), meta(0, reference_id=3))
        rec.submit("dark", frame(2), meta(1, reference_id=3))
        rec.submit("flat", frame(900), meta(2, reference_id=3))
        rec.submit("data", frame(10), meta(3, reference_id=3))
        with_role = meta(4, reference_id=3)
        with_role["positions"] = {**with_role["positions"], "shaker_hz": 50.0}
        rec.submit("data", frame(11), with_role)
        rec.submit("data", frame(12), meta(5, reference_id=3))  # old roles fit the new file
    summary = rec.counters
    assert len(summary["files"]) == 2 and summary["written"] == 6
    assert "shaker_hz" in summary["rollovers"][0]["reason"]
    assert summary["carried_references"] == 3
    with h5py.File(rollover_path(path, 1)) as f:
        ex = f["exchange"]
        assert list(ex["positions"].attrs["roles"]) == ["sample_x_um", "zp_z_um", "shaker_hz"]
        np.testing.assert_allclose(ex["positions"][:], [[-4, 2, 50], [-5, 2.5, np.nan]])
        np.testing.assert_array_equal(ex["seq"][:], [4, 5])
        # the file names its references itself
        assert f.attrs["carried_dark_frames"] == 2 and f.attrs["carried_white_frames"] == 1
        np.testing.assert_array_equal(ex["data_dark"][:], [frame(1), frame(2)])
        np.testing.assert_array_equal(ex["data_white"][:], [frame(900)])
        np.testing.assert_array_equal(ex["dark_reference_id"][:], [3, 3])
        np.testing.assert_array_equal(ex["white_seq"][:], [2])
        np.testing.assert_allclose(ex["dark_positions"][:], [[0, 0, np.nan], [-1, 0.5, np.nan]])


def test_close_drains_the_queue_and_submit_after_close_raises(tmp_path):
    path = tmp_path / "drain.h5"
    rec = Recorder(path)
    rec.start()
    for i in range(200):
        rec.submit("data", frame(i, shape=(32, 32)), meta(i))
    summary = rec.close()
    assert summary["written"] == 200 and summary["backlog"] == 0
    with h5py.File(path) as f:
        assert f["exchange/data"].shape == (200, 32, 32)
    with pytest.raises(RecorderClosedError, match="closed"):
        rec.submit("data", frame(0, shape=(32, 32)), meta(200))
    assert rec.close() == summary  # closing twice is harmless
    assert rec.counters["submitted"] == 200


def test_copy_protects_the_frame_from_buffer_reuse(tmp_path):
    path = tmp_path / "copy.h5"
    rec = Recorder(path)
    # Frames submitted before start() wait in the queue: the writer cannot have written them
    # before the caller reuses its buffers, whatever the timing.
    copied = np.full((4, 4), 7, np.uint16)
    rec.submit("data", copied, meta(0))
    copied[:] = 99
    shared = np.full((4, 4), 7, np.uint16)
    rec.submit("data", shared, meta(1), copy=False)
    shared[:] = 99
    rec.start()
    rec.close()
    with h5py.File(path) as f:
        assert (f["exchange/data"][0] == 7).all()  # copy=True: the submitted values
        assert (f["exchange/data"][1] == 99).all()  # copy=False: the caller's promise broken


def test_steady_state_recording_reuses_pooled_buffers(tmp_path):
    rec = Recorder(tmp_path / "pool.h5")
    rec.start()
    image = np.zeros((16, 16), np.uint16)
    for i in range(50):
        rec.submit("data", image, meta(i))
        assert wait_for(lambda i=i: rec.counters["written"] == i + 1)
    assert rec.close()["buffers_allocated"] == 1


def test_backlog_warns_at_the_level_and_each_doubling(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="stream.recorder")
    rec = Recorder(tmp_path / "slow.h5", warn_backlog_frames=8)
    for i in range(40):  # not started yet: a writer that cannot keep up at all
        rec.submit("data", frame(i), meta(i))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [int(r.getMessage().split(": ")[1].split()[0]) for r in warnings] == [9, 17, 33]
    assert rec.counters["backlog"] == rec.counters["max_backlog"] == 40
    rec.start()
    summary = rec.close()
    assert summary["max_backlog"] == 40 and summary["backlog_warnings"] == 3
    assert summary["written"] == 40
    assert any("caught up" in r.getMessage() for r in caplog.records)


FAILING_WRITER = textwrap.dedent("""
    import json, resource, signal, sys, time
    import numpy as np
    from stream.recorder import Recorder, RecorderError
    # The file system refuses to grow the file past 4 MiB, as a full disk would.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, resource.RLIM_INFINITY))
    rec = Recorder(sys.argv[1], flush_interval_s=0.05)
    rec.start()
    for i in range(10):  # 2 MiB each
        rec.submit("data", np.full((512, 512), i, np.float64),
                   {"seq": i, "t_ns": i, "energy_ev": 8e3, "exposure_s": 0.1,
                    "positions": {}, "moving": False})
    deadline = time.monotonic() + 60
    while rec.counters["backlog"] and time.monotonic() < deadline:
        time.sleep(0.01)
    # Space is freed again: HDF5 can close the file (it crashes closing a file it cannot
    # write, an upstream bug the free-space check keeps the recorder away from).
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    try:
        rec.close()
    except RecorderError as exc:
        print(json.dumps({"message": str(exc), "summary": exc.summary}))
""")


def test_writer_error_is_counted_and_raised_by_close(tmp_path):
    path = tmp_path / "full.h5"
    result = subprocess.run([sys.executable, "-c", FAILING_WRITER, str(path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout, f"close() did not raise; stderr: {result.stderr}"
    report = json.loads(result.stdout)
    summary = report["summary"]
    assert "File too large" in report["message"] and "failed" in report["message"]
    assert summary["submitted"] == 10 and summary["backlog"] == 0
    assert 0 < summary["unwritten"] and summary["written"] + summary["unwritten"] == 10
    assert "recorder failed writing data frame" in result.stderr  # logged with the reason


def test_low_free_space_stops_recording_cleanly(tmp_path, monkeypatch):
    import shutil

    usage = namedtuple("usage", "total used free")
    free = {"bytes": 10 * MIN_FREE_BYTES}
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(0, 0, free["bytes"]))
    path = tmp_path / "low.h5"
    rec = Recorder(path)
    rec.start()
    for i in range(3):
        rec.submit("data", frame(i), meta(i))
    assert wait_for(lambda: rec.counters["written"] == 3)
    free["bytes"] = MIN_FREE_BYTES // 2
    for i in range(3, 5):
        rec.submit("data", frame(i), meta(i))
    with pytest.raises(RecorderError, match="MiB free") as info:
        rec.close()
    assert info.value.summary["written"] == 3 and info.value.summary["unwritten"] == 2
    with h5py.File(path) as f:  # what was written before stays readable
        np.testing.assert_array_equal(f["exchange/seq"][:], [0, 1, 2])
        np.testing.assert_array_equal(f["exchange/data"][2], frame(2))


def test_overlong_flags_are_cut_loudly(tmp_path, caplog):
    path = tmp_path / "flags.h5"
    flags = [f"flag_number_{i}" for i in range(40)]
    with Recorder(path) as rec:
        rec.submit("data", frame(0), meta(0, flags=flags))
    assert rec.counters["flags_truncated"] == 1
    assert any("cut" in r.getMessage() for r in caplog.records)
    with h5py.File(path) as f:
        stored = f["exchange/flags"][0]
    assert len(stored) == FLAGS_BYTES and stored.endswith(b"...")
    assert "; ".join(flags).encode().startswith(stored[:-3])


def test_empty_positions_are_recorded(tmp_path):
    path = tmp_path / "noroles.h5"
    with Recorder(path) as rec:
        rec.submit("data", frame(0), {**meta(0), "positions": {}})
        rec.submit("data", frame(1), {**meta(1), "positions": {}})
    with h5py.File(path) as f:
        assert f["exchange/positions"].shape == (2, 0)
        assert len(f["exchange/positions"].attrs["roles"]) == 0


def test_bad_input_is_refused_with_a_clear_error(tmp_path):
    existing = tmp_path / "exists.h5"
    existing.write_bytes(b"")
    with pytest.raises(FileExistsError, match="never overwrites"):
        Recorder(existing).start()
    with pytest.raises(ValueError, match="reserved"):
        Recorder(tmp_path / "a.h5", attrs={"created": "yesterday"})
    with pytest.raises(ValueError, match="'bad'.*JSON"):
        Recorder(tmp_path / "a.h5", attrs={"bad": object()})
    with pytest.raises(ValueError, match="warn_backlog_frames"):
        Recorder(tmp_path / "a.h5", warn_backlog_frames=0)
    rec = Recorder(tmp_path / "a.h5")
    image = frame(0)
    with pytest.raises(ValueError, match="kind 'white'"):
        rec.submit("white", image, meta(0))
    with pytest.raises(ValueError, match="2-D"):
        rec.submit("data", image[None], meta(0))
    with pytest.raises(ValueError, match=r"lacks required key\(s\) \['moving'\]"):
        rec.submit("data", image, {k: v for k, v in meta(0).items() if k != "moving"})
    with pytest.raises(ValueError, match="unknown key.*energy_kev"):
        rec.submit("data", image, meta(0, energy_kev=8.0))
    with pytest.raises(ValueError, match=r"meta\['seq'\] = 1.5 is not an integer"):
        rec.submit("data", image, {**meta(0), "seq": 1.5})
    with pytest.raises(ValueError, match=r"positions'\]\['zp_z_um'\]"):
        rec.submit("data", image, {**meta(0), "positions": {"zp_z_um": "near"}})
    with pytest.raises(ValueError, match="flags"):
        rec.submit("data", image, meta(0, flags="moving"))
    assert rec.counters["submitted"] == 0
    rec.close()


def test_close_without_start_reports_the_frames_it_never_wrote(tmp_path):
    rec = Recorder(tmp_path / "never.h5")
    rec.submit("data", frame(0), meta(0))
    with pytest.raises(RecorderError, match="before start") as info:
        rec.close()
    assert info.value.summary["unwritten"] == 1 and info.value.summary["backlog"] == 0
    assert not (tmp_path / "never.h5").exists()
