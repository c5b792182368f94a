"""File readers: real files from other facilities, files written here, broken input."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import h5py
import numpy as np
import olefile
import pytest
import tifffile

from stream.readers import EPICS_EPOCH_S, REPLAY_KINDS, ReaderError, Series, open_series

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared(relative: str) -> Path:
    path = DATA / relative
    if not path.exists():
        pytest.skip(f"shared test data {path} is absent (see ../shared/data/README.md)")
    return path


def check_series_invariants(series: Series) -> list:
    """Properties every series has: replay order, seq from 0, monotonic times, one shape."""
    frames = list(series)
    assert len(frames) == len(series) == sum(series.counts.values())
    assert set(series.counts) == set(REPLAY_KINDS)
    kinds = [f.kind for f in frames]
    assert kinds == sorted(kinds, key=REPLAY_KINDS.index)
    assert [f.seq for f in frames] == list(range(len(frames)))
    assert all(a.t_ns <= b.t_ns for a, b in zip(frames, frames[1:], strict=False))
    for f in frames:
        assert f.image.shape == series.shape
        assert f.image.dtype == series.dtypes[f.kind]
        assert f.image.flags.c_contiguous
        assert f.series == series.name
        assert "source_file" in f.attrs
    return frames


# --- Data Exchange -----------------------------------------------------------------------------

def test_data_exchange_tooth_matches_h5py():
    path = shared("aps-tooth/tooth.h5")
    series = open_series(path)
    assert series.format == "dxchange"
    assert series.counts == {"dark": 10, "flat": 10, "data": 181}
    assert series.shape == (2, 640) and series.dtype == np.float32
    assert not series.times_recorded
    frames = check_series_invariants(series)
    with h5py.File(path, "r") as f:
        dark, white, data = (f[f"exchange/{n}"][()] for n in ("data_dark", "data_white", "data"))
        theta = f["exchange/theta"][()]
    np.testing.assert_array_equal(frames[0].image, dark[0])
    np.testing.assert_array_equal(frames[9].image, dark[9])
    np.testing.assert_array_equal(frames[10].image, white[0])
    for k in (0, 90, 180):
        np.testing.assert_array_equal(frames[20 + k].image, data[k])
        assert frames[20 + k].attrs["theta_deg"] == pytest.approx(theta[k])
    assert "theta_deg" not in frames[0].attrs
    # synthesised times are strictly increasing
    assert all(a.t_ns < b.t_ns for a, b in zip(frames, frames[1:], strict=False))


def test_hdf5_iteration_reads_one_frame_at_a_time(monkeypatch):
    series = open_series(shared("aps-tooth/tooth.h5"))
    reads = []
    original = h5py.Dataset.__getitem__

    def spy(self, key):
        reads.append((self.name, key))
        return original(self, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    it = iter(series)
    next(it)
    next(it)
    assert reads == [("/exchange/data_dark", 0), ("/exchange/data_dark", 1)]
    it.close()
    reads.clear()
    assert len(list(series)) == 201  # a Series can be iterated again
    assert all(isinstance(key, int) for _, key in reads) and len(reads) == 201


def write_dx(path: Path, n_dark: int = 2, n_white: int = 3, n_data: int = 5) -> dict:
    """A Data Exchange file with txmlive's per-frame datasets (prefixes dark_/white_)."""
    rng = np.random.default_rng(7)
    blocks = {name: rng.integers(0, 4000, size=(n, 4, 6), dtype=np.uint16)
              for name, n in (("data_dark", n_dark), ("data_white", n_white), ("data", n_data))}
    t0 = 1_700_000_000_000_000_000
    meta = {
        "seq": np.arange(100, 100 + n_data),
        "t_ns": t0 + np.arange(n_data, dtype=np.int64) * 10_000_000 + 1_000_000_000,
        "energy_ev": np.linspace(8000.0, 8040.0, n_data),
        "exposure_s": np.full(n_data, 0.01),
        "moving": np.array([False, True, False, False, True][:n_data]),
        "reference_id": np.full(n_data, 3),
        "flags": np.array([b"", b"saturated", b"", b"", b""][:n_data], dtype="S256"),
        "dark_seq": np.arange(n_dark), "dark_t_ns": t0 + np.arange(n_dark) * 5,
        "white_seq": np.arange(n_dark, n_dark + n_white),
        "white_t_ns": t0 + 1000 + np.arange(n_white) * 5,
    }
    positions = np.column_stack([np.linspace(-10.0, 10.0, n_data), np.full(n_data, 3.5)])
    positions[2, 1] = np.nan  # frame 2 lacked cond_x_um
    with h5py.File(path, "w") as f:
        ex = f.create_group("exchange")
        for name, block in blocks.items():
            ex.create_dataset(name, data=block, chunks=(1, 4, 6))
        for name, values in meta.items():
            ex.create_dataset(name, data=values)
        ex.create_dataset("white_exposure_s", data=0.02)  # scalar: applies to every flat
        ds = ex.create_dataset("positions", data=positions)
        ds.attrs["roles"] = np.array(["zp_z_um", "cond_x_um"], dtype=h5py.string_dtype())
        ex.create_dataset("theta", data=np.radians([0.0, 10, 20, 30, 40])).attrs["units"] = "rad"
    return {**blocks, **meta, "positions": positions}


def test_data_exchange_round_trip_of_per_frame_datasets(tmp_path):
    path = tmp_path / "recorded.h5"
    written = write_dx(path)
    series = open_series(path)
    assert series.counts == {"dark": 2, "flat": 3, "data": 5}
    assert series.times_recorded and series.dtype == np.uint16
    frames = check_series_invariants(series)
    darks, flats, data = frames[:2], frames[2:5], frames[5:]
    assert [f.attrs["recorded_seq"] for f in frames] == [0, 1, 2, 3, 4, *range(100, 105)]
    assert [f.t_ns for f in darks] == list(written["dark_t_ns"])
    assert [f.t_ns for f in flats] == list(written["white_t_ns"])
    assert [f.t_ns for f in data] == list(written["t_ns"])
    assert [f.energy_ev for f in data] == pytest.approx(written["energy_ev"])
    assert [f.exposure_s for f in flats] == [0.02] * 3
    assert [f.exposure_s for f in data] == pytest.approx([0.01] * 5)
    assert [f.moving for f in data] == [False, True, False, False, True]
    assert [f.attrs["flags"] for f in data] == ["", "saturated", "", "", ""]
    assert all(f.attrs["reference_id"] == 3 for f in data)
    for i, f in enumerate(data):
        expected = {"zp_z_um": written["positions"][i, 0], "cond_x_um": 3.5}
        if i == 2:
            del expected["cond_x_um"]  # NaN in the file: the role was absent
        assert f.positions == pytest.approx(expected)
        np.testing.assert_array_equal(f.image, written["data"][i])
        assert f.attrs["theta_deg"] == pytest.approx(10.0 * i)
    assert darks[0].positions == {} and darks[0].energy_ev == 0.0
    assert "flags" not in darks[0].attrs
    np.testing.assert_array_equal(flats[2].image, written["data_white"][2])


def test_data_exchange_metadata_ahead_of_pixels_is_accepted(tmp_path):
    # A recorder in SWMR mode writes metadata before pixels: extra rows are not an error.
    path = tmp_path / "live.h5"
    write_dx(path)
    with h5py.File(path, "a") as f:
        del f["exchange/t_ns"]
        f["exchange/t_ns"] = np.arange(7)
    assert [f.t_ns for f in open_series(path)][-5:] == [0, 1, 2, 3, 4]


def test_data_exchange_per_frame_too_short_names_dataset(tmp_path):
    path = tmp_path / "bad.h5"
    write_dx(path)
    with h5py.File(path, "a") as f:
        del f["exchange/t_ns"]
        f["exchange/t_ns"] = np.arange(4)
    with pytest.raises(ReaderError, match=r"bad\.h5.*/exchange/t_ns has 4 rows.*5 frames"):
        open_series(path)


def test_reads_what_the_txmlive_recorder_writes(tmp_path):
    recorder_module = pytest.importorskip("stream.recorder")
    rng = np.random.default_rng(3)
    sent = [("dark", 0), ("flat", 1), ("data", 2), ("data", 3), ("data", 4)]
    images = {seq: rng.integers(0, 60000, (6, 5), dtype=np.uint16) for _, seq in sent}
    path = tmp_path / "rec.h5"
    with recorder_module.Recorder(path, flush_interval_s=0.0) as rec:
        for kind, seq in sent:
            rec.submit(kind, images[seq], {
                "seq": seq, "t_ns": 10**18 + seq * 10**7, "energy_ev": 8000.0 + seq,
                "exposure_s": 0.01, "positions": {"zp_z_um": 1.5 * seq}, "moving": seq == 3})
    frames = list(open_series(path))
    assert [(f.kind, f.seq, f.attrs["recorded_seq"]) for f in frames] == [
        (kind, seq, seq) for kind, seq in sent]
    for f in frames:
        np.testing.assert_array_equal(f.image, images[f.seq])
        assert f.t_ns == 10**18 + f.seq * 10**7 and f.energy_ev == 8000.0 + f.seq
        assert f.positions == {"zp_z_um": 1.5 * f.seq} and f.moving == (f.seq == 3)


# --- areaDetector NeXus ------------------------------------------------------------------------

def test_areadetector_nexus_agbehenate():
    path = shared("aps-areadetector-nexus/AgBehenate_228.hdf5")
    series = open_series(path)
    assert series.format == "nexus"
    assert series.counts == {"dark": 0, "flat": 0, "data": 1}
    assert series.shape == (195, 487) and series.dtype == np.int32
    (frame,) = check_series_invariants(series)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(frame.image, f["entry/data/data"][()])
        mono_kev = float(f["entry/instrument/monochromator/energy"][0])
    assert frame.energy_ev == pytest.approx(mono_kev * 1000.0)  # 16.9 keV
    assert frame.exposure_s == 5.0  # recorded from the cam1:AcquireTime PV


def test_areadetector_nexus_ndattributes_give_kinds_times_and_exposure(tmp_path):
    path = tmp_path / "ad.h5"
    images = np.arange(4 * 3 * 5, dtype=np.uint16).reshape(4, 3, 5)
    with h5py.File(path, "w") as f:
        f.create_dataset("entry/data/data", data=images)
        nd = f.create_group("entry/instrument/NDAttributes")
        nd["FrameType"] = np.array([0, 1, 2, 0], dtype=np.int32)
        nd["AcquireTime"] = np.array([0.1, 0.2, 0.3, 0.4])
        nd["NDArrayEpicsTSSec"] = np.array([1000, 1001, 1002, 1003], dtype=np.uint32)
        nd["NDArrayEpicsTSnSec"] = np.array([5, 6, 7, 8], dtype=np.uint32)
        nd["NDArrayUniqueId"] = np.array([11, 12, 13, 14], dtype=np.int32)
        nd["RingCurrent"] = np.array([200.0, 201.0, 202.0, 203.0])
    series = open_series(path)
    assert series.counts == {"dark": 1, "flat": 1, "data": 2}
    frames = list(series)
    assert [f.kind for f in frames] == ["dark", "flat", "data", "data"]
    source_index = [1, 2, 0, 3]  # replay order moves the dark and the flat first
    for f, i in zip(frames, source_index, strict=True):
        np.testing.assert_array_equal(f.image, images[i])
        assert f.exposure_s == pytest.approx(0.1 * (i + 1))
        assert f.t_ns == (1000 + i + EPICS_EPOCH_S) * 10**9 + 5 + i
        assert f.attrs["recorded_seq"] == 11 + i
        assert f.attrs["RingCurrent"] == 200.0 + i
    assert [f.seq for f in frames] == [0, 1, 2, 3]


def test_unknown_frame_type_is_refused(tmp_path):
    path = tmp_path / "ad.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("entry/data/data", data=np.zeros((2, 3, 3), np.uint16))
        f["entry/instrument/NDAttributes/FrameType"] = np.array([0, 7])
    with pytest.raises(ReaderError, match="FrameType 7"):
        open_series(path)


# --- TIFF and .npy -----------------------------------------------------------------------------

def test_tiff_folder_dls_savu():
    folder = shared("dls-savu-projections")
    series = open_series(folder)
    assert series.format == "tiff-folder"
    assert series.counts == {"dark": 1, "flat": 1, "data": 91}
    assert series.shape == (135, 160)
    assert series.dtypes == {"dark": np.float32, "flat": np.float32, "data": np.uint16}
    frames = check_series_invariants(series)
    names = [f.attrs["source_file"] for f in frames]
    assert names[:4] == ["dark_00001.tiff", "flat_00001.tiff", "tiffs/raw_00000.tiff",
                         "tiffs/raw_00001.tiff"]
    assert names[-1] == "tiffs/raw_00090.tiff"
    for i in (0, 1, 2, 50, 92):
        np.testing.assert_array_equal(frames[i].image, tifffile.imread(folder / names[i]))


def test_tiff_folder_natural_order_and_kinds_by_name(tmp_path):
    names = ["img_10.tif", "img_2.tif", "img_1.tif", "DarkField.tif", "refs/white_b.tiff",
             "refs/flat_a.TIF"]
    for value, name in enumerate(names):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        tifffile.imwrite(tmp_path / name, np.full((3, 4), value, np.uint16))
    frames = list(open_series(tmp_path))
    assert [(f.kind, f.attrs["source_file"]) for f in frames] == [
        ("dark", "DarkField.tif"), ("flat", "refs/flat_a.TIF"), ("flat", "refs/white_b.tiff"),
        ("data", "img_1.tif"), ("data", "img_2.tif"), ("data", "img_10.tif")]
    assert [int(f.image[0, 0]) for f in frames] == [3, 5, 4, 2, 1, 0]


def test_tiff_folder_of_mixed_shapes_is_refused(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((3, 4), np.uint16))
    tifffile.imwrite(tmp_path / "b.tif", np.zeros((4, 4), np.uint16))
    with pytest.raises(ReaderError, match="differ in shape"):
        open_series(tmp_path)


def test_multipage_tiff_is_data_frames(tmp_path):
    stack = np.random.default_rng(1).integers(0, 60000, (3, 5, 7)).astype(np.uint16)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack, byteorder=">", photometric="minisblack")  # big-endian file
    series = open_series(path)
    assert series.format == "tiff" and series.counts["data"] == 3 and series.shape == (5, 7)
    frames = check_series_invariants(series)
    for i, f in enumerate(frames):
        assert f.image.dtype == np.dtype("=u2") and f.attrs["page"] == i
        np.testing.assert_array_equal(f.image, stack[i])


def test_npy_3d_and_2d(tmp_path):
    tomo = np.load(shared("tomopy-normalize/tomo.npy"))
    series = open_series(DATA / "tomopy-normalize/tomo.npy")
    assert series.format == "npy" and len(series) == tomo.shape[0]
    frames = check_series_invariants(series)
    np.testing.assert_array_equal(np.stack([f.image for f in frames]), tomo)
    one = tmp_path / "one.npy"
    np.save(one, np.eye(3, dtype=np.float32))
    (frame,) = list(open_series(one))
    np.testing.assert_array_equal(frame.image, np.eye(3))


# --- Xradia ------------------------------------------------------------------------------------

def ole_image(path: Path, stream: str, shape: tuple[int, int]) -> np.ndarray:
    with olefile.OleFileIO(str(path)) as ole:
        return np.frombuffer(ole.openstream(stream).read(), "<u2").reshape(shape)


def test_xradia_xrm_image_reference_and_metadata():
    path = shared("xradia-txm/test_chip00.xrm")
    series = open_series(path)
    assert series.format == "xradia"
    assert series.counts == {"dark": 0, "flat": 1, "data": 1}
    assert series.shape == (512, 512) and series.dtype == np.uint16
    flat, data = check_series_invariants(series)
    np.testing.assert_array_equal(data.image, ole_image(path, "ImageData1/Image1", (512, 512)))
    np.testing.assert_array_equal(flat.image, ole_image(path, "ReferenceData/Image", (512, 512)))
    assert flat.image.mean() > 5 * data.image.mean()  # open beam is much brighter than sample
    assert data.energy_ev == pytest.approx(7191.05, abs=0.01) == flat.energy_ev
    assert data.exposure_s == pytest.approx(39.88, abs=0.01)
    assert flat.exposure_s == 40.0
    assert data.attrs["pixel_nm"] == pytest.approx(77.89, abs=0.01)
    assert data.positions == {"zp_z_um": pytest.approx(-2466.8)}
    assert len(data.attrs["motors"]) == 36
    assert data.attrs["motor_units"]["Zoneplate Z"] == "µm"
    assert data.attrs["motors"]["Sample Theta"] == pytest.approx(data.attrs["theta_deg"])
    assert data.t_ns == int(dt.datetime(2015, 11, 8, 11, 58, 8, tzinfo=dt.UTC).timestamp()) * 10**9
    assert flat.t_ns == data.t_ns - 40 * 10**9  # reference taken before the image
    assert flat.attrs["reference_file"].endswith("20151108_004_bin4_40s_bkg.xrm")


def test_xradia_txrm_tomo_series():
    path = shared("xradia-txm/txrm_test_chip_tomo.txrm")
    series = open_series(path)
    assert series.counts == {"dark": 0, "flat": 0, "data": 7}
    assert series.shape == (256, 256) and series.times_recorded
    frames = check_series_invariants(series)
    for i in (0, 3, 6):
        np.testing.assert_array_equal(
            frames[i].image, ole_image(path, f"ImageData1/Image{i + 1}", (256, 256)))
    theta = [f.attrs["theta_deg"] for f in frames]
    assert theta == pytest.approx([-45, -30, -15, 0, 15, 30, 45], abs=0.05)
    assert all(f.energy_ev == pytest.approx(9200.02, abs=0.01) for f in frames)
    assert all(f.exposure_s == 5.0 for f in frames)
    gaps_s = np.diff([f.t_ns for f in frames]) / 1e9
    assert np.all((gaps_s >= 5) & (gaps_s <= 12))  # 5 s exposures plus overhead


def test_xradia_frames_fit_the_wire():
    from stream.wire import decode, encode

    for frame in open_series(shared("xradia-txm/test_chip00.xrm")):
        back = decode(encode(frame))
        assert back.attrs == frame.attrs and back.positions == frame.positions
        np.testing.assert_array_equal(back.image, frame.image)


# --- bad input ---------------------------------------------------------------------------------

def test_missing_path(tmp_path):
    with pytest.raises(ReaderError, match="nothing_here.h5.*no such file"):
        open_series(tmp_path / "nothing_here.h5")


def test_unknown_format(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not an image")
    with pytest.raises(ReaderError, match=r"notes\.txt: unknown format"):
        open_series(path)


@pytest.mark.parametrize("name, head", [
    ("broken.h5", b"\x89HDF\r\n\x1a\n"),
    ("broken.tif", b"II*\x00\x08\x00\x00\x00"),
    ("broken.xrm", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"),
    ("broken.npy", b"\x93NUMPY\x01\x00"),
])
def test_corrupt_files_name_the_path(tmp_path, name, head):
    path = tmp_path / name
    path.write_bytes(head + bytes(range(256)) * 4)
    with pytest.raises(ReaderError, match=name.replace(".", r"\.")):
        open_series(path)


def test_truncated_hdf5(tmp_path):
    path = tmp_path / "cut.h5"
    write_dx(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ReaderError, match=r"cut\.h5"):
        open_series(path)


def test_hdf5_without_known_layout(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["something"] = np.zeros(3)
    with pytest.raises(ReaderError, match=r"other\.h5.*neither /exchange/data"):
        open_series(path)


def test_empty_folder_and_bad_npy(tmp_path):
    with pytest.raises(ReaderError, match="no .tif/.tiff files"):
        open_series(tmp_path)
    path = tmp_path / "cube.npy"
    np.save(path, np.zeros((2, 2, 2, 2)))
    with pytest.raises(ReaderError, match=r"cube\.npy.*2-D or 3-D"):
        open_series(path)
