"""Readers of recorded series: every supported file becomes frames in replay order.

:func:`open_series` looks at a path (content first, then the extension) and returns a
:class:`Series`: the frames' metadata is read once at open, the pixels one frame at a time while
iterating, so a long HDF5 series never sits in memory whole. Replay order is all darks, then all
flats, then the data, with ``seq`` counting from 0 across the whole series.

Formats
-------
- Data Exchange HDF5 (``/exchange/data``, ``data_dark``, ``data_white``), with the per-frame
  datasets txmlive's recorder writes when present (see :mod:`stream.recorder`): ``seq``,
  ``t_ns``, ``energy_ev``, ``exposure_s``, ``moving``, ``positions`` (2-D, frames x roles,
  attribute ``roles``; NaN = role absent) and ``seq_first``, ``seq_last``, ``n_frames``,
  ``reference_id``, ``flags`` describe ``data``; the same names prefixed ``dark_`` and
  ``white_`` describe the references. ``theta`` (with the Data Exchange suffixes ``_dark`` and
  ``_white``) becomes ``attrs["theta_deg"]``. A scalar dataset applies to every frame.
- areaDetector NeXus HDF5 (``/entry/data/data``, 2-D or 3-D) with the per-frame NDAttributes
  under ``/entry/instrument/NDAttributes`` when the file has them.
  FrameType (0/1/2) gives the kind, AcquireTime the exposure, Energy (eV) the energy,
  NDArrayEpicsTSSec/nSec the time, NDArrayUniqueId ``attrs["recorded_seq"]``, the rest go to
  ``attrs``. Without them: exposure from a PV-sourced ``...AcquireTime`` value under
  ``/entry/instrument``, energy from ``monochromator/energy`` (with its units).
- A folder of TIFFs (searched recursively, natural sort order of the relative paths; a path
  relative to the folder containing "dark" is a dark, "flat" or "white" a flat, anything else
  data), a single TIFF (every page a data frame), a ``.npy`` (2-D or 3-D, data frames).
- Xradia ``.xrm``/``.txrm`` (OLE compound files): ``ImageData<k>/Image<i>`` are data frames,
  ``ReferenceData/Image`` a flat; energy from the ``Energy`` motor axis, exposure from
  ``ImageInfo/ExpTimes``, ``pixel_nm`` from ``ImageInfo/PixelSize`` (µm), ``theta_deg`` from
  ``ImageInfo/Angles``, all motor axes in ``attrs["motors"]``/``attrs["motor_units"]``, and the
  ``Zoneplate Z`` axis as ``positions["zp_z_um"]``. Times come from ``ImageInfo/Date``, which is
  local wall-clock time without a zone: read as UTC, so spacing is right but the absolute time
  may be off by the site's UTC offset.

Every failure to understand a path raises :class:`ReaderError` with the path in the message.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import olefile
import tifffile

from stream.frame import Frame

REPLAY_KINDS = ("dark", "flat", "data")
"""Frame kinds of a recorded series, in replay order."""

SYNTH_PERIOD_S = 0.1
"""Frame spacing used to synthesise times when a frame has neither a recorded time nor an
exposure time."""

EPICS_EPOCH_S = 631_152_000
"""The EPICS epoch (1990-01-01 UTC) in Unix seconds."""

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_NPY_MAGIC = b"\x93NUMPY"
_TIFF_SUFFIXES = (".tif", ".tiff")

_XRADIA_DTYPES = {5: np.dtype("<u2"), 10: np.dtype("<f4")}
_XRADIA_IMAGES_PER_STORAGE = 100  # ImageData<k> holds Image<100(k-1)+1> .. Image<100k>
_LENGTH_TO_UM = {"µm": 1.0, "um": 1.0, "mm": 1000.0, "nm": 1e-3}
_ENERGY_TO_EV = {"ev": 1.0, "kev": 1000.0}
_AD_FRAME_TYPES = {0: "data", 1: "dark", 2: "flat"}  # areaDetector FrameType enum order

Loader = Callable[[Any], np.ndarray]
"""Reads one frame's pixels given its location (dataset index, file and page, stream...)."""


class ReaderError(ValueError):
    """A path that cannot be read as a series; the message names the path and the fault."""


@dataclass(slots=True)
class _Entry:
    """Everything about one frame but its pixels, plus where the pixels are."""

    kind: str
    loc: Any
    shape: tuple[int, ...]
    dtype: np.dtype
    t_ns: int | None = None
    exposure_s: float = 0.0
    energy_ev: float = 0.0
    moving: bool = False
    positions: dict[str, float] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)


class Series:
    """The frames of one recorded series, in replay order (darks, flats, data).

    Metadata is held in memory; pixels are read one frame at a time during iteration, with the
    file opened afresh for every pass, so a series can be iterated several times.

    Attributes
    ----------
    path : Path
        The file or folder the series was read from.
    format : str
        ``"dxchange"``, ``"nexus"``, ``"tiff-folder"``, ``"tiff"``, ``"npy"`` or ``"xradia"``.
    name : str
        Series name put on every frame (the file stem or folder name).
    shape : tuple of int
        ``(rows, cols)`` shared by every frame.
    dtype : numpy.dtype
        Pixel type of the data frames (of the first frame when there are none).
    dtypes : dict of str to numpy.dtype
        Pixel type per kind present (darks and flats may differ from the data).
    counts : dict of str to int
        Number of frames per kind, with every key of :data:`REPLAY_KINDS`.
    times_recorded : bool
        True if every frame's ``t_ns`` came from the file; otherwise the missing ones were
        synthesised (see :func:`_fill_times`).
    """

    def __init__(self, path: Path, fmt: str, entries: list[_Entry],
                 open_loader: Callable[[], AbstractContextManager[Loader]]):
        if not entries:
            raise ReaderError(f"{path}: no frames found")
        order = {kind: i for i, kind in enumerate(REPLAY_KINDS)}
        entries = sorted(entries, key=lambda e: order[e.kind])  # stable: file order within kind
        shapes = {e.shape for e in entries}
        if len(shapes) != 1:
            raise ReaderError(f"{path}: frames differ in shape {sorted(shapes)}; a series needs "
                              "one shape")
        shape = entries[0].shape
        if len(shape) != 2:
            raise ReaderError(f"{path}: frames must be 2-D images, got shape {shape}")
        for e in entries:
            if e.dtype.kind not in "uif":
                raise ReaderError(f"{path}: pixel type {e.dtype} is not a numeric image type")
        self.times_recorded = all(e.t_ns is not None for e in entries)
        _fill_times(entries, _mtime_ns(path))
        self.path = path
        self.format = fmt
        self.name = path.stem if path.is_file() else path.name
        self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))
        self.counts = {kind: sum(e.kind == kind for e in entries) for kind in REPLAY_KINDS}
        self.dtypes: dict[str, np.dtype] = {}
        for e in entries:
            self.dtypes.setdefault(e.kind, e.dtype.newbyteorder("="))
        self.dtype: np.dtype = self.dtypes.get("data", entries[0].dtype.newbyteorder("="))
        self._entries = entries
        self._open_loader = open_loader

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Frame]:
        with self._open_loader() as load:
            for seq, e in enumerate(self._entries):
                try:
                    image = _native(load(e.loc), e.shape)
                except (OSError, RuntimeError, ValueError, KeyError) as exc:
                    raise ReaderError(f"{self.path}: cannot read frame {seq} ({e.kind}, "
                                      f"{e.loc!r}): {exc}") from exc
                yield Frame(
                    seq=seq, t_ns=int(e.t_ns), kind=e.kind, image=image,
                    exposure_s=e.exposure_s, energy_ev=e.energy_ev, moving=e.moving,
                    positions=dict(e.positions), series=self.name, attrs=dict(e.attrs),
                )

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={n}" for k, n in self.counts.items())
        return (f"Series({str(self.path)!r}, format={self.format!r}, shape={self.shape}, "
                f"dtype={self.dtype}, {counts})")


def open_series(path: str | Path) -> Series:
    """Open a recorded series for replay.

    Parameters
    ----------
    path : str or Path
        A Data Exchange or areaDetector NeXus HDF5 file, a folder of TIFFs, a TIFF file, a
        ``.npy`` file (2-D or 3-D) or an Xradia ``.xrm``/``.txrm`` file.

    Returns
    -------
    Series
        Frames in replay order (darks, flats, data); ``seq`` counts from 0.

    Raises
    ------
    ReaderError
        The path does not exist, its format is unknown, or the file is broken; the message
        names the path.
    """
    path = Path(path)
    if path.is_dir():
        return _open_tiff_folder(path)
    if not path.is_file():
        raise ReaderError(f"{path}: no such file or folder")
    try:
        with path.open("rb") as fh:
            magic = fh.read(8)
    except OSError as exc:
        raise ReaderError(f"{path}: cannot read ({exc})") from exc
    opener = _opener_by_magic(magic) or _opener_by_suffix(path.suffix.lower())
    if opener is None:
        raise ReaderError(
            f"{path}: unknown format (not HDF5, TIFF, .npy or Xradia OLE; first bytes "
            f"{magic!r})")
    try:
        return opener(path)
    except ReaderError as exc:
        if str(path) in str(exc):
            raise
        raise ReaderError(f"{path}: {exc}") from exc
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, tifffile.TiffFileError
            ) as exc:
        detail = str(exc) if len(str(exc)) <= 200 else str(exc)[:200] + "..."
        raise ReaderError(f"{path}: broken or unsupported file ({type(exc).__name__}: {detail})"
                          ) from exc


def _opener_by_magic(magic: bytes) -> Callable[[Path], Series] | None:
    if magic.startswith(_HDF5_MAGIC):
        return _open_hdf5
    if magic.startswith(_OLE_MAGIC):
        return _open_xradia
    if magic[:4] in _TIFF_MAGICS:
        return _open_tiff_file
    if magic.startswith(_NPY_MAGIC):
        return _open_npy
    return None


def _opener_by_suffix(suffix: str) -> Callable[[Path], Series] | None:
    # Reached only when the content has no known signature: an HDF5 file with a user block
    # still opens; anything else fails inside its reader with a message naming the path.
    if suffix in (".h5", ".hdf5", ".hdf", ".nxs"):
        return _open_hdf5
    return None


# --- shared helpers --------------------------------------------------------------------------

def _native(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """C-ordered, native-endian copy-free view (or copy when needed) of one frame."""
    image = np.asarray(image)
    if image.shape != shape:
        raise ReaderError(f"frame has shape {image.shape}, expected {shape}")
    if not image.dtype.isnative:
        image = image.astype(image.dtype.newbyteorder("="))
    return np.ascontiguousarray(image)


def _mtime_ns(path: Path) -> int:
    return path.stat().st_mtime_ns


def _fill_times(entries: list[_Entry], t0_ns: int) -> None:
    """Give every entry a ``t_ns``, keeping the recorded ones.

    A missing time is the previous frame's time plus that frame's exposure (or
    :data:`SYNTH_PERIOD_S`); missing times before the first recorded one count back from it the
    same way; with no recorded time at all the series starts at ``t0_ns`` (the file's mtime).
    """
    def period_ns(e: _Entry) -> int:
        return round((e.exposure_s if e.exposure_s > 0 else SYNTH_PERIOD_S) * 1e9)

    first = next((i for i, e in enumerate(entries) if e.t_ns is not None), None)
    if first is None:
        entries[0].t_ns = t0_ns
        first = 0
    for i in range(first - 1, -1, -1):
        entries[i].t_ns = entries[i + 1].t_ns - period_ns(entries[i])
    for i in range(first + 1, len(entries)):
        if entries[i].t_ns is None:
            entries[i].t_ns = entries[i - 1].t_ns + period_ns(entries[i - 1])


def _natural_key(text: str) -> list[Any]:
    """Sort key that orders ``raw_2`` before ``raw_10``."""
    parts = re.split(r"(\d+)", text.lower())
    return [int(p) if i % 2 else p for i, p in enumerate(parts)]


def _kind_from_name(name: str) -> str:
    name = name.lower()
    if "dark" in name:
        return "dark"
    if "flat" in name or "white" in name:
        return "flat"
    return "data"


def _text(value: Any) -> str:
    if isinstance(value, bytes | np.bytes_):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


# --- HDF5: Data Exchange and areaDetector NeXus ----------------------------------------------

@contextmanager
def _hdf5_loader(path: Path) -> Iterator[Loader]:
    with h5py.File(path, "r", swmr=True) as f:
        def load(loc: tuple[str, int | None]) -> np.ndarray:
            name, index = loc
            return f[name][()] if index is None else f[name][index]
        yield load


def _open_hdf5(path: Path) -> Series:
    # swmr=True also reads a file that txmlive's recorder is still writing
    with h5py.File(path, "r", swmr=True) as f:
        if isinstance(f.get("exchange/data"), h5py.Dataset):
            entries, fmt = _dxchange_entries(f), "dxchange"
        elif isinstance(f.get("entry/data/data"), h5py.Dataset):
            entries, fmt = _nexus_entries(f), "nexus"
        else:
            raise ReaderError(f"{path}: HDF5 file has neither /exchange/data (Data Exchange) "
                              "nor /entry/data/data (areaDetector NeXus)")
    source = path.name
    for e in entries:
        e.attrs["source_file"] = source
    return Series(path, fmt, entries, lambda: _hdf5_loader(path))


def _frames_of(ds: h5py.Dataset) -> tuple[int, int | None, tuple[int, ...]]:
    """(number of frames, None for a single 2-D image, frame shape) of an image dataset."""
    if ds.ndim == 2:
        return 1, None, tuple(ds.shape)
    if ds.ndim == 3:
        return int(ds.shape[0]), 0, tuple(ds.shape[1:])
    raise ReaderError(f"dataset {ds.name} must be 2-D or 3-D, got shape {ds.shape}")


def _per_frame(group: h5py.Group, name: str, n: int) -> np.ndarray | None:
    """A per-frame dataset of ``group`` as an array of ``n`` rows, or None when absent.

    A scalar applies to every frame. Extra rows are ignored: a recorder writing in SWMR mode
    writes metadata before pixels, so a live file may hold metadata for frames not yet there.
    """
    ds = group.get(name)
    if ds is None:
        return None
    if not isinstance(ds, h5py.Dataset):
        raise ReaderError(f"{ds.name} must be a dataset")
    if ds.ndim == 0:
        return np.full(n, ds[()])
    if ds.shape[0] < n:
        raise ReaderError(f"{ds.name} has {ds.shape[0]} rows but its image dataset has {n} "
                          "frames")
    return ds[:n]


def _theta_deg(ds: h5py.Dataset, values: np.ndarray) -> np.ndarray:
    """Data Exchange angles in degrees (the default) or radians, as degrees."""
    units = _text(ds.attrs.get("units", "degrees")).lower()
    return np.degrees(values) if units.startswith("rad") else values


# (kind, image dataset, prefix of txmlive's per-frame datasets, suffix of Data Exchange theta)
_DX_BLOCKS = (("dark", "data_dark", "dark_", "_dark"),
              ("flat", "data_white", "white_", "_white"),
              ("data", "data", "", ""))
# txmlive recorder per-frame datasets that travel in attrs under their own names
_DX_EXTRA = ("seq_first", "seq_last", "n_frames", "reference_id", "flags")


def _dxchange_entries(f: h5py.File) -> list[_Entry]:
    ex = f["exchange"]
    entries: list[_Entry] = []
    for kind, image_name, prefix, theta_suffix in _DX_BLOCKS:
        ds = ex.get(image_name)
        if ds is None:
            continue
        n, first, shape = _frames_of(ds)
        meta = {name: _per_frame(ex, prefix + name, n)
                for name in ("seq", "t_ns", "energy_ev", "exposure_s", "moving", *_DX_EXTRA)}
        theta = _per_frame(ex, "theta" + theta_suffix, n)
        if theta is not None:
            theta = _theta_deg(ex["theta" + theta_suffix], theta)
        positions = _dx_positions(ex, prefix + "positions", n)
        for i in range(n):
            attrs: dict[str, Any] = {name: _scalar(meta[name][i]) for name in _DX_EXTRA
                                     if meta[name] is not None}
            if meta["seq"] is not None:
                attrs["recorded_seq"] = int(meta["seq"][i])
            if theta is not None:
                attrs["theta_deg"] = float(theta[i])
            entries.append(_Entry(
                kind=kind, loc=(ds.name, None if first is None else i), shape=shape,
                dtype=ds.dtype,
                t_ns=None if meta["t_ns"] is None else int(meta["t_ns"][i]),
                exposure_s=0.0 if meta["exposure_s"] is None else float(meta["exposure_s"][i]),
                energy_ev=0.0 if meta["energy_ev"] is None else float(meta["energy_ev"][i]),
                moving=False if meta["moving"] is None else bool(meta["moving"][i]),
                positions=positions[i] if positions else {},
                attrs=attrs,
            ))
    return entries


def _dx_positions(ex: h5py.Group, name: str, n: int) -> list[dict[str, float]] | None:
    """Per-frame {role: position}; NaN (the recorder's mark of a role a frame lacked) is
    left out."""
    ds = ex.get(name)
    if ds is None:
        return None
    roles = [_text(r) for r in np.atleast_1d(ds.attrs.get("roles", []))]
    if ds.ndim != 2 or ds.shape[1] != len(roles) or ds.shape[0] < n:
        raise ReaderError(f"{ds.name} must be (frames, roles) = ({n}, {len(roles)}) with the "
                          f"role names in its 'roles' attribute, got shape {ds.shape}")
    values = np.asarray(ds[:n], dtype=float)
    return [{role: float(v) for role, v in zip(roles, row, strict=True) if not np.isnan(v)}
            for row in values]


def _nexus_entries(f: h5py.File) -> list[_Entry]:
    ds = f["entry/data/data"]
    n, first, shape = _frames_of(ds)
    nd = f.get("entry/instrument/NDAttributes")
    nd_values = {}
    if isinstance(nd, h5py.Group):
        for key, item in nd.items():
            if isinstance(item, h5py.Dataset):
                nd_values[key] = _per_frame(nd, key, n)
    kinds = _nexus_kinds(nd_values.pop("FrameType", None), n)
    exposure = nd_values.pop("AcquireTime", None)
    if exposure is None:
        exposure = np.full(n, _nexus_acquire_time(f))
    energy = nd_values.pop("Energy", None)  # areaDetector convention (as in wire.decode_adzmq)
    if energy is None:
        energy = np.full(n, _nexus_energy_ev(f))
    ts_s = nd_values.pop("NDArrayEpicsTSSec", None)
    ts_ns = nd_values.pop("NDArrayEpicsTSnSec", None)
    unique_id = nd_values.pop("NDArrayUniqueId", None)
    entries = []
    for i in range(n):
        attrs: dict[str, Any] = {key: _scalar(v[i]) for key, v in nd_values.items()
                                 if v.ndim == 1}
        if unique_id is not None:
            attrs["recorded_seq"] = int(unique_id[i])
        t_ns = None
        if ts_s is not None and ts_ns is not None:
            t_ns = (int(ts_s[i]) + EPICS_EPOCH_S) * 1_000_000_000 + int(ts_ns[i])
        entries.append(_Entry(
            kind=kinds[i], loc=(ds.name, None if first is None else i), shape=shape,
            dtype=ds.dtype, t_ns=t_ns, exposure_s=float(exposure[i]),
            energy_ev=float(energy[i]), attrs=attrs,
        ))
    return entries


def _scalar(value: Any) -> Any:
    if isinstance(value, bytes | np.bytes_):
        return _text(value)
    return value.item() if isinstance(value, np.generic) else value


def _nexus_kinds(frame_type: np.ndarray | None, n: int) -> list[str]:
    if frame_type is None:
        return ["data"] * n
    kinds = []
    for code in frame_type:
        code = int(code)
        if code not in _AD_FRAME_TYPES:
            raise ReaderError(f"NDAttribute FrameType {code} is not one of "
                              f"{_AD_FRAME_TYPES} (Normal, Background, FlatField)")
        kinds.append(_AD_FRAME_TYPES[code])
    return kinds


def _nexus_acquire_time(f: h5py.File) -> float:
    """AcquireTime recorded as a PV-sourced attribute anywhere under /entry/instrument."""
    found: list[float] = []

    def visit(_name: str, item: Any) -> None:
        if (not found and isinstance(item, h5py.Dataset) and item.size == 1
                and _text(item.attrs.get("pv", "")).endswith("AcquireTime")):
            found.append(float(np.ravel(item[()])[0]))

    instrument = f.get("entry/instrument")
    if isinstance(instrument, h5py.Group):
        instrument.visititems(visit)
    return found[0] if found else 0.0


def _nexus_energy_ev(f: h5py.File) -> float:
    ds = f.get("entry/instrument/monochromator/energy")
    if not isinstance(ds, h5py.Dataset) or ds.size != 1:
        return 0.0
    scale = _ENERGY_TO_EV.get(_text(ds.attrs.get("units", "")).strip().lower())
    return 0.0 if scale is None else float(np.ravel(ds[()])[0]) * scale


# --- TIFF and .npy ---------------------------------------------------------------------------

@contextmanager
def _tiff_loader() -> Iterator[Loader]:
    def load(loc: tuple[Path, int]) -> np.ndarray:
        file, page = loc
        return tifffile.imread(file, key=page)
    yield load


def _tiff_entries(file: Path, kind: str, source: str) -> list[_Entry]:
    try:
        with tifffile.TiffFile(file) as tif:
            pages = [(p.shape, p.dtype) for p in tif.pages]
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        raise ReaderError(f"{file}: broken TIFF ({exc})") from exc
    entries = []
    for i, (shape, dtype) in enumerate(pages):
        attrs: dict[str, Any] = {"source_file": source}
        if len(pages) > 1:
            attrs["page"] = i
        entries.append(_Entry(kind=kind, loc=(file, i), shape=tuple(shape), dtype=dtype,
                              attrs=attrs))
    return entries


def _open_tiff_folder(folder: Path) -> Series:
    files = [p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _TIFF_SUFFIXES]
    if not files:
        raise ReaderError(f"{folder}: folder holds no .tif/.tiff files")
    rel = {p: p.relative_to(folder).as_posix() for p in files}
    files.sort(key=lambda p: _natural_key(rel[p]))
    entries = [e for p in files for e in _tiff_entries(p, _kind_from_name(rel[p]), rel[p])]
    return Series(folder, "tiff-folder", entries, _tiff_loader)


def _open_tiff_file(path: Path) -> Series:
    return Series(path, "tiff", _tiff_entries(path, "data", path.name), _tiff_loader)


def _open_npy(path: Path) -> Series:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    if array.ndim not in (2, 3):
        raise ReaderError(f"{path}: .npy array must be 2-D or 3-D, got shape {array.shape}")
    frames = 1 if array.ndim == 2 else array.shape[0]
    shape = tuple(array.shape[-2:])
    entries = [_Entry(kind="data", loc=None if array.ndim == 2 else i, shape=shape,
                      dtype=array.dtype, attrs={"source_file": path.name})
               for i in range(frames)]

    @contextmanager
    def loader() -> Iterator[Loader]:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
        # copy one frame out of the map so frames outlive it
        yield lambda loc: np.array(data if loc is None else data[loc])

    return Series(path, "npy", entries, loader)


# --- Xradia .xrm / .txrm ---------------------------------------------------------------------

def _ole_array(ole: olefile.OleFileIO, name: str, dtype: str) -> np.ndarray | None:
    if not ole.exists(name):
        return None
    raw = ole.openstream(name).read()
    size = np.dtype(dtype).itemsize
    return np.frombuffer(raw[: len(raw) // size * size], dtype=dtype)


def _ole_int(ole: olefile.OleFileIO, name: str) -> int | None:
    values = _ole_array(ole, name, "<u4")
    return None if values is None or values.size == 0 else int(values[0])


def _ole_strings(ole: olefile.OleFileIO, name: str, count: int) -> list[str] | None:
    """``count`` fixed-width, NUL-padded latin-1 strings (Xradia writes µ as 0xB5)."""
    if not ole.exists(name) or count <= 0:
        return None
    raw = ole.openstream(name).read()
    width = len(raw) // count
    if width == 0:
        return None
    return [raw[i * width:(i + 1) * width].split(b"\0")[0].decode("latin-1").strip()
            for i in range(count)]


def _per_image(values: np.ndarray | None, n: int) -> np.ndarray | None:
    """One value per image from an ImageInfo array (n values, or one for all)."""
    if values is None or values.size == 0:
        return None
    if values.size == n:
        return values
    return np.full(n, values[0]) if values.size == 1 else None


def _xradia_dtype(code: int | None, what: str) -> np.dtype:
    if code not in _XRADIA_DTYPES:
        raise ReaderError(f"{what} is Xradia data type {code}; known: 5 (uint16), 10 (float32)")
    return _XRADIA_DTYPES[code]


def _xradia_times(ole: olefile.OleFileIO, n: int) -> list[int | None]:
    """Acquisition times from ImageInfo/Date: one fixed-width 'MM/DD/YY HH:MM:SS' record per
    image, local wall-clock time without a zone, read here as UTC."""
    dates = _ole_strings(ole, "ImageInfo/Date", n) or [""] * n
    times: list[int | None] = []
    for text in dates:
        try:
            stamp = dt.datetime.strptime(text[:17], "%m/%d/%y %H:%M:%S")
        except ValueError:
            times.append(None)
            continue
        times.append(int(stamp.replace(tzinfo=dt.UTC).timestamp()) * 1_000_000_000)
    return times


def _xradia_motors(ole: olefile.OleFileIO, n: int) -> tuple[list[dict[str, float]], dict[str, str]]:
    """Per-image motor positions {axis name: value} and the axes' units."""
    axes = _ole_int(ole, "PositionInfo/TotalAxis") or 0
    names = _ole_strings(ole, "PositionInfo/AxisNames", axes)
    units = _ole_strings(ole, "PositionInfo/AxisUnits", axes) or [""] * axes
    values = _ole_array(ole, "PositionInfo/MotorPositions", "<f4")
    if not names or values is None or values.size < n * axes:
        return [{} for _ in range(n)], {}
    rows = values[: n * axes].reshape(n, axes)
    return ([dict(zip(names, map(float, row), strict=True)) for row in rows],
            dict(zip(names, units, strict=True)))


def _zone_plate_z_um(motors: dict[str, float], units: dict[str, str]) -> dict[str, float]:
    for name, value in motors.items():
        if re.sub(r"[\s_-]", "", name.lower()) in ("zoneplatez", "zpz"):
            scale = _LENGTH_TO_UM.get(units.get(name, ""))
            if scale is not None:
                return {"zp_z_um": value * scale}
    return {}


def _open_xradia(path: Path) -> Series:
    if not olefile.isOleFile(str(path)):
        raise ReaderError(f"{path}: not an OLE compound file")
    with olefile.OleFileIO(str(path)) as ole:
        entries = _xradia_entries(ole, path)

    @contextmanager
    def loader() -> Iterator[Loader]:
        with olefile.OleFileIO(str(path)) as ole:
            def load(loc: tuple[str, np.dtype, tuple[int, int]]) -> np.ndarray:
                stream, dtype, shape = loc
                return np.frombuffer(ole.openstream(stream).read(), dtype=dtype).reshape(shape)
            yield load

    return Series(path, "xradia", entries, loader)


def _xradia_entries(ole: olefile.OleFileIO, path: Path) -> list[_Entry]:
    width = _ole_int(ole, "ImageInfo/ImageWidth")
    height = _ole_int(ole, "ImageInfo/ImageHeight")
    if not width or not height:
        raise ReaderError(f"{path}: Xradia file lacks ImageInfo/ImageWidth or ImageHeight")
    shape = (height, width)
    dtype = _xradia_dtype(_ole_int(ole, "ImageInfo/DataType"), f"{path}: ImageInfo/DataType")
    n = _ole_int(ole, "ImageInfo/ImagesTaken") or _ole_int(ole, "ImageInfo/NoOfImages") or 0
    pixel_um = _ole_array(ole, "ImageInfo/PixelSize", "<f4")
    common: dict[str, Any] = {"source_file": path.name}
    if pixel_um is not None and pixel_um.size and pixel_um[0] > 0:
        common["pixel_nm"] = float(pixel_um[0]) * 1000.0

    motors, units = _xradia_motors(ole, n)
    exposure = _per_image(_ole_array(ole, "ImageInfo/ExpTimes", "<f4"), n)
    theta = _per_image(_ole_array(ole, "ImageInfo/Angles", "<f4"), n)
    # ImageInfo/Energy is strided in .txrm files (7 images -> 61 floats); the Energy motor axis
    # holds one clean value per image, so it wins when present.
    energy_axis = next((k for k in units if k.lower() == "energy"
                        and units[k].lower() in _ENERGY_TO_EV), None)
    if energy_axis is not None:
        energy = np.array([m[energy_axis] * _ENERGY_TO_EV[units[energy_axis].lower()]
                           for m in motors])
    else:
        energy = _per_image(_ole_array(ole, "ImageInfo/Energy", "<f4"), n)
    times = _xradia_times(ole, n)

    entries = []
    for i in range(n):
        stream = (f"ImageData{i // _XRADIA_IMAGES_PER_STORAGE + 1}/Image{i + 1}")
        _check_stream(ole, path, stream, shape, dtype)
        attrs = dict(common)
        if theta is not None:
            attrs["theta_deg"] = float(theta[i])
        if motors[i]:
            attrs["motors"] = motors[i]
            attrs["motor_units"] = units
        entries.append(_Entry(
            kind="data", loc=(stream, dtype, shape), shape=shape, dtype=dtype, t_ns=times[i],
            exposure_s=0.0 if exposure is None else float(exposure[i]),
            energy_ev=0.0 if energy is None else float(energy[i]),
            positions=_zone_plate_z_um(motors[i], units), attrs=attrs,
        ))
    if ole.exists("ReferenceData/Image"):
        entries.append(_xradia_reference(ole, path, shape, dtype, common, entries))
    return entries


def _xradia_reference(ole: olefile.OleFileIO, path: Path, shape: tuple[int, int],
                      image_dtype: np.dtype, common: dict[str, Any], data: list[_Entry],
                      ) -> _Entry:
    """The embedded reference (open beam) image as a flat frame at the images' energy."""
    code = _ole_int(ole, "ReferenceData/DataType")
    dtype = image_dtype if code is None else _xradia_dtype(code, f"{path}: ReferenceData/DataType")
    _check_stream(ole, path, "ReferenceData/Image", shape, dtype)
    exposure = _ole_array(ole, "ReferenceData/ExpTime", "<f4")
    attrs = dict(common)
    reference_file = _ole_strings(ole, "ImageInfo/ReferenceFile", 1)
    if reference_file and reference_file[0]:
        attrs["reference_file"] = reference_file[0]
    return _Entry(
        kind="flat", loc=("ReferenceData/Image", dtype, shape), shape=shape, dtype=dtype,
        exposure_s=float(exposure[0]) if exposure is not None and exposure.size else 0.0,
        energy_ev=data[0].energy_ev if data else 0.0, attrs=attrs,
    )


def _check_stream(ole: olefile.OleFileIO, path: Path, stream: str, shape: tuple[int, int],
                  dtype: np.dtype) -> None:
    if not ole.exists(stream):
        raise ReaderError(f"{path}: Xradia stream {stream} is missing")
    expected = shape[0] * shape[1] * dtype.itemsize
    size = ole.get_size(stream)
    if size != expected:
        raise ReaderError(f"{path}: Xradia stream {stream} is {size} B, but {shape[0]}x"
                          f"{shape[1]} {dtype} needs {expected} B (mosaic or broken file?)")
