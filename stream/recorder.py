"""HDF5 recorder: writes every submitted frame, from its own thread, in the Data Exchange layout.

The pipeline's hot path calls :meth:`Recorder.submit`, which copies the image into a pooled
buffer, enqueues it on an unbounded queue and returns: it never blocks on the disk and never
drops a frame. A writer thread drains the queue into an HDF5 file opened in SWMR mode, so a
viewer or analysis script can read the frames while they are being recorded. When the writer
falls behind, the backlog is counted and a ``logging`` warning is raised when it exceeds
``warn_backlog_frames`` and again each time it doubles.

File layout (all under ``/exchange``; ``n`` frames of ``rows × cols`` pixels):

==========================  =======================  ========================================
dataset                     dtype, shape             meaning
==========================  =======================  ========================================
``data``                    image dtype, (n, r, c)   data frames, one frame per chunk
``data_dark``               image dtype, (m, r, c)   darks (processed mode: averaged darks)
``data_white``              image dtype, (k, r, c)   flats (processed mode: averaged flats)
``seq``                     int64, (n,)              sequence number
``t_ns``                    int64, (n,)              acquisition time, ns since the epoch
``energy_ev``               float64, (n,)            photon energy, eV
``exposure_s``              float64, (n,)            exposure time, s
``moving``                  bool, (n,)               a feedback motor moved during exposure
``positions``               float64, (n, n_roles)    motor positions; attribute ``roles``
                                                     names the columns; NaN: role not given
``seq_first``, ``seq_last`` int64, (n,)              first/last raw seq averaged into the
                                                     frame (= ``seq`` when not given)
``n_frames``                int64, (n,)              raw frames averaged (1 when not given)
``reference_id``            int64, (n,)              id of the dark/flat used, -1: none
``flags``                   S256, (n,)               the frame's flags joined with ``"; "``
==========================  =======================  ========================================

Darks and flats carry the same per-frame datasets with the prefixes ``dark_`` and ``white_``
(``dark_seq``, ``white_t_ns``, ``white_positions`` ...). A data frame used the reference
whose ``dark_reference_id`` / ``white_reference_id`` equals its ``reference_id``. All
datasets exist from the first frame on (optional metadata then holds the defaults above),
since none can be created once SWMR is on. Metadata is written before pixels, but HDF5 does
not order what a SWMR reader sees across datasets: readers take the shortest length of the
datasets they use. File attributes: ``txmlive_version``, ``created`` (ISO 8601, UTC),
``file_index`` and the caller's ``attrs``.

A frame whose shape differs from the file's, whose dtype cannot be stored in the file's dtype
without loss, or whose positions hold a role the file has no column for, starts a new file
(``name_0001.h5``, ``name_0002.h5`` ...; attributes ``previous_file``, ``rollover_reason``).
The new file's roles are the old ones plus the new ones, and it starts with a copy of the
latest run of darks and flats of the old file when their shape fits (attributes
``carried_dark_frames``, ``carried_white_frames``), so each file names its references itself.

Failures never vanish: a writer exception (disk full ...) is logged, stops the writing, and
makes :meth:`Recorder.close` raise :class:`RecorderError` once the queue is drained; frames
not written are counted (``unwritten``). The recorder stops before less than
:data:`MIN_FREE_BYTES` would stay free, because HDF5 cannot be trusted after a failed write:
it may lose frames it had accepted and can crash the process closing that file.
"""

from __future__ import annotations

import datetime
import errno
import importlib.metadata
import json
import logging
import math
import operator
import queue
import shutil
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

log = logging.getLogger(__name__)

try:
    TXMLIVE_VERSION = importlib.metadata.version("txmlive")
except importlib.metadata.PackageNotFoundError:  # running from a source tree never installed
    TXMLIVE_VERSION = "unknown"

KINDS = ("data", "dark", "flat")
IMAGE_DATASETS = {"data": "data", "dark": "data_dark", "flat": "data_white"}
"""Kind → image dataset under ``/exchange``."""
META_PREFIXES = {"data": "", "dark": "dark_", "flat": "white_"}
"""Kind → prefix of its per-frame metadata datasets (``seq``, ``dark_seq``, ``white_seq``)."""
FLAGS_BYTES = 256
"""Width of the fixed-length ``flags`` strings; longer ones are cut, with a warning."""

REQUIRED_META = ("seq", "t_ns", "energy_ev", "exposure_s", "positions", "moving")
OPTIONAL_META = ("seq_first", "seq_last", "n_frames", "reference_id", "flags")
RESERVED_ATTRS = ("txmlive_version", "created", "file_index", "previous_file",
                  "rollover_reason", "carried_dark_frames", "carried_white_frames")

# (name, dtype, unit) of the 1-D per-frame datasets of each kind.
_SCALAR_META = (
    ("seq", np.int64, ""),
    ("t_ns", np.int64, "ns"),
    ("energy_ev", np.float64, "eV"),
    ("exposure_s", np.float64, "s"),
    ("moving", np.bool_, ""),
    ("seq_first", np.int64, ""),
    ("seq_last", np.int64, ""),
    ("n_frames", np.int64, ""),
    ("reference_id", np.int64, ""),
    ("flags", f"S{FLAGS_BYTES}", ""),
)
_META_CHUNK = 256
_BATCH_MAX_FRAMES = 64
_BATCH_MAX_BYTES = 64 * 1024 * 1024
MIN_FREE_BYTES = 256 * 1024 * 1024
"""The recorder stops writing (loudly) when less than this would stay free on its disk."""
_POOL_KEEP = 16
"""Spare buffers kept per (shape, dtype): enough for steady state, without pinning a burst."""


class RecorderError(RuntimeError):
    """The recording failed (disk full ...). ``summary`` holds the final counters."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


class RecorderClosedError(RuntimeError):
    """A frame was submitted to a recorder that is already closed."""


@dataclass(slots=True)
class _Item:
    """One queued frame, its metadata already validated and converted."""

    kind: str
    image: np.ndarray
    pooled: bool
    seq: int
    t_ns: int
    energy_ev: float
    exposure_s: float
    moving: bool
    positions: dict[str, float]
    seq_first: int
    seq_last: int
    n_frames: int
    reference_id: int
    flags: str


_STOP = object()


def rollover_path(path: str | Path, index: int) -> Path:
    """Path of the ``index``-th file of a recording (0: ``path`` itself, 1: ``name_0001.h5``)."""
    path = Path(path)
    if index == 0:
        return path
    return path.with_name(f"{path.stem}_{index:04d}{path.suffix}")


def encode_attr(key: str, value: Any) -> Any:
    """An HDF5 attribute value: plain scalars and strings as they are, anything else as JSON."""
    if isinstance(value, bool | int | float | str | np.generic):
        return value
    try:
        return json.dumps(value, sort_keys=True)
    except TypeError as exc:
        raise ValueError(f"file attribute {key!r} is not JSON-serialisable: {exc}") from exc


def encode_flags(flags: str) -> tuple[bytes, bool]:
    """UTF-8 bytes of ``flags`` fitting :data:`FLAGS_BYTES`, and whether they had to be cut."""
    raw = flags.encode("utf-8")
    if len(raw) <= FLAGS_BYTES:
        return raw, False
    cut = raw[: FLAGS_BYTES - 3].decode("utf-8", "ignore").encode("utf-8")
    return cut + b"...", True


def _validate_meta(kind: str, image: Any, meta: Mapping[str, Any]) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"image must be a non-empty 2-D array, got shape {image.shape}")
    if image.dtype.kind not in "biuf":
        raise ValueError(f"image dtype {image.dtype} is not a boolean, integer or float type")
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a mapping, got {type(meta).__name__}")
    missing = [key for key in REQUIRED_META if key not in meta]
    if missing:
        raise ValueError(f"meta lacks required key(s) {missing}")
    unknown = sorted(set(meta) - set(REQUIRED_META) - set(OPTIONAL_META))
    if unknown:
        raise ValueError(f"meta has unknown key(s) {unknown}; known: "
                         f"{list(REQUIRED_META + OPTIONAL_META)}")
    if not isinstance(meta["positions"], Mapping):
        raise TypeError(f"meta['positions'] must map role -> float, got {meta['positions']!r}")


def _number(meta: Mapping[str, Any], key: str, kind: type, default: Any = None) -> Any:
    """``meta[key]`` as int (integers only, no silent rounding) or float; None → default."""
    value = meta.get(key)
    if value is None:
        value = default
    try:
        return operator.index(value) if kind is int else float(value)
    except (TypeError, ValueError) as exc:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"meta[{key!r}] = {value!r} is not {what}") from exc


def _make_item(kind: str, image: np.ndarray, pooled: bool, meta: Mapping[str, Any]) -> _Item:
    seq = _number(meta, "seq", int)
    flags = meta.get("flags")
    if flags is None:
        flags = ()
    if isinstance(flags, str) or not all(isinstance(f, str) for f in flags):
        raise ValueError(f"meta['flags'] must be a list of str, got {flags!r}")
    positions = {}
    for role, value in meta["positions"].items():
        try:
            positions[str(role)] = float(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"meta['positions'][{role!r}] = {value!r} is not a float") from exc
    return _Item(
        kind=kind, image=image, pooled=pooled, seq=seq,
        t_ns=_number(meta, "t_ns", int),
        energy_ev=_number(meta, "energy_ev", float),
        exposure_s=_number(meta, "exposure_s", float),
        moving=bool(meta["moving"]),
        positions=positions,
        seq_first=_number(meta, "seq_first", int, seq),
        seq_last=_number(meta, "seq_last", int, seq),
        n_frames=_number(meta, "n_frames", int, 1),
        reference_id=_number(meta, "reference_id", int, -1),
        flags="; ".join(flags),
    )


class _BufferPool:
    """Reusable image buffers per (shape, dtype).

    ``take`` never blocks: it allocates when no spare buffer is free. deque ``pop``/``append``
    are atomic under the GIL, so the submitting thread and the writer share it without a lock.
    """

    def __init__(self, keep: int):
        self._keep = keep
        self._free: dict[tuple[tuple[int, ...], str], deque[np.ndarray]] = {}
        self.allocated = 0

    def take(self, image: np.ndarray) -> np.ndarray:
        """A pooled copy of ``image``."""
        spare = self._free.get((image.shape, image.dtype.str))
        try:
            buf = spare.pop()  # type: ignore[union-attr]
        except (AttributeError, IndexError):
            buf = np.empty(image.shape, image.dtype)
            self.allocated += 1
        np.copyto(buf, image)
        return buf

    def give(self, buf: np.ndarray) -> None:
        """Return a buffer taken from this pool; extra ones are left to the garbage collector."""
        spare = self._free.setdefault((buf.shape, buf.dtype.str), deque())
        if len(spare) < self._keep:
            spare.append(buf)


class _ExchangeFile:
    """One HDF5 file of a recording, in the Data Exchange layout described in the module doc."""

    def __init__(self, path: Path, attrs: Mapping[str, Any]):
        self.path = path
        self.h5 = h5py.File(path, "x", libver="latest")
        for key, value in attrs.items():
            self.h5.attrs[key] = value
        self.shape: tuple[int, int] | None = None
        self.dtype: np.dtype | None = None
        self.roles: list[str] = []
        self._role_set: frozenset[str] = frozenset()
        self._datasets: dict[str, dict[str, h5py.Dataset]] = {}
        self.counts = dict.fromkeys(KINDS, 0)
        # Start of the latest run of darks / flats, for carrying them into a rollover file.
        self._run_start: dict[str, int | None] = {"dark": None, "flat": None}
        self._data_since: dict[str, bool] = {"dark": True, "flat": True}

    def create_layout(self, shape: tuple[int, int], dtype: np.dtype, roles: list[str]) -> None:
        """Create every dataset for frames of ``shape``/``dtype`` with positions ``roles``."""
        self.shape, self.dtype, self.roles = shape, np.dtype(dtype), list(roles)
        self._role_set = frozenset(roles)
        self.h5.create_dataset("implements", data="exchange")
        group = self.h5.create_group("exchange")
        rows, cols = shape
        n_roles = len(roles)
        for kind in KINDS:
            prefix = META_PREFIXES[kind]
            sets = {"image": group.create_dataset(
                IMAGE_DATASETS[kind], shape=(0, rows, cols), maxshape=(None, rows, cols),
                chunks=(1, rows, cols), dtype=self.dtype)}
            for name, dtype_meta, unit in _SCALAR_META:
                fill = -1 if name == "reference_id" else None
                ds = group.create_dataset(prefix + name, shape=(0,), maxshape=(None,),
                                          chunks=(_META_CHUNK,), dtype=dtype_meta, fillvalue=fill)
                if unit:
                    ds.attrs["units"] = unit
                sets[name] = ds
            # A fixed second axis of length 0 admits no chunk shape, hence None for no roles.
            positions = group.create_dataset(
                prefix + "positions", shape=(0, n_roles), maxshape=(None, n_roles or None),
                chunks=(_META_CHUNK, max(n_roles, 1)), dtype=np.float64,
                fillvalue=np.nan)
            positions.attrs["roles"] = np.array(roles, dtype=h5py.string_dtype())
            sets["positions"] = positions
            self._datasets[kind] = sets

    def start_swmr(self) -> None:
        """Switch to SWMR writing: readers may open the file from now on."""
        self.h5.swmr_mode = True

    def mismatch(self, item: _Item) -> str | None:
        """Why ``item`` cannot go into this file, or None when it fits."""
        if item.image.shape != self.shape:
            return f"frame shape {item.image.shape} differs from the file's {self.shape}"
        if not np.can_cast(item.image.dtype, self.dtype, "safe"):
            return f"frame dtype {item.image.dtype} does not fit the file's {self.dtype}"
        if not item.positions.keys() <= self._role_set:
            new = sorted(item.positions.keys() - self._role_set)
            return f"new positions role(s) {new} not among the file's {self.roles}"
        return None

    def append(self, kind: str, items: list[_Item]) -> int:
        """Append frames of one kind, metadata first; the number of flags that had to be cut."""
        sets = self._datasets[kind]
        start = self.counts[kind]
        stop = start + len(items)
        columns, cut = _meta_columns(items, self.roles)
        for name, values in columns.items():
            _grow(sets[name], stop)
            _write_rows(sets[name], start, values)
        image = sets["image"]
        _grow(image, stop)
        for index, item in enumerate(items, start):
            _write_rows(image, index, item.image[np.newaxis])
        self.counts[kind] = stop
        self._note_run(kind, start)
        return cut

    def _note_run(self, kind: str, start: int) -> None:
        if kind == "data":
            self._data_since = {"dark": True, "flat": True}
        elif self._data_since[kind]:
            self._run_start[kind] = start
            self._data_since[kind] = False

    def copy_references_from(self, old: _ExchangeFile) -> dict[str, int]:
        """Copy the latest run of darks and flats of ``old`` here; frames copied per kind."""
        copied = {"dark": 0, "flat": 0}
        if old.shape != self.shape or not np.can_cast(old.dtype, self.dtype, "safe"):
            return copied
        for kind in ("dark", "flat"):
            start = old._run_start[kind]
            if start is None:
                continue
            src, dst = old._datasets[kind], self._datasets[kind]
            stop = old.counts[kind]
            n = stop - start
            for name in src:
                _grow(dst[name], n)
            for name, _, _ in _SCALAR_META:
                _write_rows(dst[name], 0, src[name][start:stop])
            _write_rows(dst["positions"], 0, _remap_positions(src["positions"][start:stop],
                                                              old.roles, self.roles))
            # Row by row: a run of references must not need its whole size in memory.
            for row in range(n):
                _write_rows(dst["image"], row, src["image"][start + row: start + row + 1])
            self.counts[kind] = n
            self._run_start[kind], self._data_since[kind] = 0, False
            copied[kind] = n
        return copied

    def flush(self) -> None:
        self.h5.flush()

    def close(self) -> None:
        self.h5.close()


def _grow(ds: h5py.Dataset, rows: int) -> None:
    """Extend ``ds`` to ``rows`` along axis 0 (cheaper than ``Dataset.resize``)."""
    ds.id.set_extent((rows, *ds.shape[1:]))


def _write_rows(ds: h5py.Dataset, start: int, values: np.ndarray) -> None:
    """Write ``values``, shape (k, ...), into rows ``start:start + k`` of ``ds``.

    The low-level calls cost about a fifth of h5py's slicing, which the writer would otherwise
    pay for a dozen datasets per frame while holding the GIL.
    """
    if values.size == 0:
        return
    values = np.ascontiguousarray(values)
    space = ds.id.get_space()
    space.select_hyperslab((start,) + (0,) * (values.ndim - 1), values.shape)
    ds.id.write(h5py.h5s.create_simple(values.shape), space, values)


def _meta_columns(items: list[_Item], roles: list[str]) -> tuple[dict[str, np.ndarray], int]:
    """Per-frame metadata of ``items`` as arrays keyed by dataset suffix; flags cut."""
    encoded = [encode_flags(item.flags) for item in items]
    columns = {
        "seq": np.array([item.seq for item in items], np.int64),
        "t_ns": np.array([item.t_ns for item in items], np.int64),
        "energy_ev": np.array([item.energy_ev for item in items], np.float64),
        "exposure_s": np.array([item.exposure_s for item in items], np.float64),
        "moving": np.array([item.moving for item in items], np.bool_),
        "seq_first": np.array([item.seq_first for item in items], np.int64),
        "seq_last": np.array([item.seq_last for item in items], np.int64),
        "n_frames": np.array([item.n_frames for item in items], np.int64),
        "reference_id": np.array([item.reference_id for item in items], np.int64),
        "flags": np.array([raw for raw, _ in encoded], f"S{FLAGS_BYTES}"),
        "positions": np.array(
            [[item.positions.get(role, math.nan) for role in roles] for item in items],
            np.float64).reshape(len(items), len(roles)),
    }
    return columns, sum(cut for _, cut in encoded)


def _remap_positions(values: np.ndarray, old_roles: list[str],
                     new_roles: list[str]) -> np.ndarray:
    """Positions ``(n, len(old_roles))`` as columns of ``new_roles``; NaN for roles not in old."""
    out = np.full((values.shape[0], len(new_roles)), np.nan)
    for column, role in enumerate(old_roles):
        out[:, new_roles.index(role)] = values[:, column]
    return out


def _runs(items: list[_Item]) -> Iterable[list[_Item]]:
    """Consecutive items of the same kind."""
    run: list[_Item] = []
    for item in items:
        if run and item.kind != run[0].kind:
            yield run
            run = []
        run.append(item)
    if run:
        yield run


class Recorder:
    """Records frames to HDF5 (Data Exchange layout, SWMR) from its own thread; never drops.

    Parameters
    ----------
    path : str or Path
        The file to create; it must not exist. Rollover files go next to it
        (``name_0001.h5`` ...).
    flush_interval_s : float
        Flush at least this often while frames flow, and this long after the last frame when
        the stream pauses, so SWMR readers see frames within about this time, s.
    warn_backlog_frames : int
        Log a warning when this many frames wait to be written, and again each time the
        backlog doubles.
    attrs : dict, optional
        File-level attributes (``mode``: ``"raw"``/``"processed"``, the config ...); values
        that are not plain scalars or strings are stored as JSON strings.

    Notes
    -----
    Frames submitted before :meth:`start` wait in the queue. Use the recorder as a context
    manager, or call :meth:`close`, so the queue is drained and the file closed.
    """

    def __init__(self, path: str | Path, *, flush_interval_s: float = 1.0,
                 warn_backlog_frames: int = 64, attrs: dict[str, Any] | None = None):
        if not flush_interval_s >= 0:
            raise ValueError(f"flush_interval_s must be >= 0, got {flush_interval_s!r}")
        if warn_backlog_frames < 1:
            raise ValueError(f"warn_backlog_frames must be >= 1, got {warn_backlog_frames!r}")
        attrs = dict(attrs or {})
        reserved = sorted(set(attrs) & set(RESERVED_ATTRS))
        if reserved:
            raise ValueError(f"attrs {reserved} are reserved for the recorder")
        self.path = Path(path)
        self.flush_interval_s = float(flush_interval_s)
        self.warn_backlog_frames = int(warn_backlog_frames)
        self._attrs = {str(key): encode_attr(key, value) for key, value in attrs.items()}
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._pool = _BufferPool(_POOL_KEEP)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._summary: dict[str, Any] | None = None
        # Counters: submitted/warning state under _lock; written/unwritten as well, so that
        # backlog = submitted - written - unwritten is consistent.
        self._submitted = 0
        self._written = 0
        self._unwritten = 0
        self._max_backlog = 0
        self._warn_at = self.warn_backlog_frames
        self._backlog_warnings = 0
        self._flags_truncated = 0
        self._carried = 0
        self._files: list[str] = []
        self._rollovers: list[dict[str, str]] = []
        self._error: str | None = None
        self._broken = False  # HDF5 raised mid-write: the file's state is unknown
        self._file: _ExchangeFile | None = None
        self._stop_seen = False

    # -- caller side -------------------------------------------------------------------------

    def start(self) -> None:
        """Create the file (it must not exist yet) and start the writer thread."""
        if self._thread is not None:
            raise RuntimeError("Recorder.start() called twice")
        if self._closing:
            raise RecorderClosedError(f"recorder for {self.path} is closed")
        if self.path.exists():
            raise FileExistsError(f"{self.path} exists; the recorder never overwrites a file")
        self._file = _ExchangeFile(self.path, self._file_attrs(0))
        self._files.append(str(self.path))
        log.info("recording to %s", self.path)
        self._thread = threading.Thread(target=self._run, name="txmlive-recorder", daemon=True)
        self._thread.start()

    def submit(self, kind: str, image: np.ndarray, meta: Mapping[str, Any],
               copy: bool = True) -> None:
        """Queue one frame for writing; returns at once, never blocks, never drops.

        Parameters
        ----------
        kind : str
            ``"data"``, ``"dark"`` or ``"flat"``.
        image : ndarray, shape (rows, cols)
            Pixels (raw mode: uint16 counts; processed mode: float32).
        meta : mapping
            ``seq``, ``t_ns`` (ns since epoch), ``energy_ev``, ``exposure_s``, ``positions``
            (role → position in the role's unit), ``moving``; optional ``seq_first``,
            ``seq_last``, ``n_frames``, ``reference_id``, ``flags`` (list of str).
        copy : bool
            Copy the image into a pooled buffer (the default: the pipeline reuses its
            buffers). With False the caller must not change ``image`` until it is written.

        Raises
        ------
        RecorderClosedError
            After :meth:`close`.
        ValueError, TypeError
            For a bad kind, image or metadata, naming what is wrong.
        """
        _validate_meta(kind, image, meta)
        item = _make_item(kind, image, copy, meta)
        if copy:
            item.image = self._pool.take(image)
        with self._lock:
            if self._closing:
                if copy:
                    self._pool.give(item.image)
                raise RecorderClosedError(
                    f"recorder for {self.path} is closed; submit() after close() is an error")
            self._submitted += 1
            self._queue.put(item)
            backlog = self._submitted - self._written - self._unwritten
            self._max_backlog = max(self._max_backlog, backlog)
            warn = backlog > self._warn_at
            if warn:
                while backlog > self._warn_at:
                    self._warn_at *= 2
                self._backlog_warnings += 1
        if warn:
            log.warning("recorder is falling behind: %d frames wait to be written to %s "
                        "(warning level %d)", backlog, self._files[-1] if self._files
                        else self.path, self.warn_backlog_frames)

    @property
    def counters(self) -> dict[str, Any]:
        """Live counters: submitted, written, unwritten (lost to a writer error), backlog,
        max_backlog, files, rollovers, backlog_warnings, flags_truncated,
        carried_references, buffers_allocated, error."""
        with self._lock:
            return {
                "submitted": self._submitted,
                "written": self._written,
                "unwritten": self._unwritten,
                "backlog": self._submitted - self._written - self._unwritten,
                "max_backlog": self._max_backlog,
                "files": list(self._files),
                "rollovers": list(self._rollovers),
                "backlog_warnings": self._backlog_warnings,
                "flags_truncated": self._flags_truncated,
                "carried_references": self._carried,
                "buffers_allocated": self._pool.allocated,
                "error": self._error,
            }

    def close(self, timeout: float | None = None) -> dict[str, Any]:
        """Write every queued frame, close the file and return the final counters.

        Raises
        ------
        TimeoutError
            When the queue is not drained within ``timeout`` s; call again to keep waiting.
        RecorderError
            When the writer failed; its ``summary`` counts the frames left unwritten.
        """
        with self._lock:
            if not self._closing:
                self._closing = True
                self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"recorder still has {self.counters['backlog']} frames to "
                                   f"write after {timeout} s; call close() again to wait on")
        if self._summary is None:
            if self._thread is None and self._submitted:
                self._error = (f"closed before start(): {self._submitted} submitted frames "
                               "were never written")
                log.error("recorder for %s %s", self.path, self._error)
                with self._lock:
                    self._unwritten = self._submitted
            self._summary = self.counters
            if self._thread is not None:
                log.info("recording closed: %d of %d frames written to %s",
                         self._summary["written"], self._summary["submitted"],
                         ", ".join(self._summary["files"]))
        if self._summary["error"] is not None:
            raise RecorderError(
                f"recording to {self.path} failed: {self._summary['error']}; "
                f"{self._summary['written']} of {self._summary['submitted']} frames written",
                self._summary)
        return self._summary

    def __enter__(self) -> Recorder:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- writer thread -----------------------------------------------------------------------

    def _file_attrs(self, index: int) -> dict[str, Any]:
        attrs = dict(self._attrs)
        attrs["txmlive_version"] = TXMLIVE_VERSION
        attrs["created"] = datetime.datetime.now(datetime.UTC).isoformat()
        attrs["file_index"] = index
        return attrs

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # a bug here must still leave a drained queue and a reason
            self._fail(exc, "writer loop")
            while not self._stop_seen:
                self._write_batch(self._next_batch(None))
        finally:
            self._close_file()

    def _loop(self) -> None:
        last_flush = time.monotonic()
        dirty = False
        while not self._stop_seen:
            timeout = max(0.0, last_flush + self.flush_interval_s - time.monotonic())
            batch = self._next_batch(timeout if dirty else None)
            if batch:
                self._write_batch(batch)
                dirty = True
            if dirty and (self._stop_seen or not batch
                          or time.monotonic() - last_flush >= self.flush_interval_s):
                self._flush()
                dirty = False
                last_flush = time.monotonic()

    def _next_batch(self, timeout: float | None) -> list[_Item]:
        """Up to a batch of queued items, waiting at most ``timeout`` s for the first."""
        try:
            first = self._queue.get(timeout=timeout)
        except queue.Empty:
            return []
        batch: list[_Item] = []
        nbytes = 0
        item = first
        while True:
            if item is _STOP:
                self._stop_seen = True
                return batch
            batch.append(item)
            nbytes += item.image.nbytes
            if len(batch) >= _BATCH_MAX_FRAMES or nbytes >= _BATCH_MAX_BYTES:
                return batch
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch

    def _write_batch(self, batch: list[_Item]) -> None:
        if self._error is None and batch:
            self._check_free_space(sum(item.image.nbytes for item in batch))
        for run in _runs(batch):
            written = 0
            if self._error is None:
                written = self._write_run(run)
            for item in run:
                if item.pooled:
                    self._pool.give(item.image)
            with self._lock:
                self._written += written
                self._unwritten += len(run) - written
                caught_up = (self._warn_at > self.warn_backlog_frames and
                             self._submitted - self._written - self._unwritten
                             <= self.warn_backlog_frames)
                if caught_up:
                    self._warn_at = self.warn_backlog_frames
            if caught_up:
                log.info("recorder caught up: backlog back below %d frames",
                         self.warn_backlog_frames)

    def _write_run(self, run: list[_Item]) -> int:
        """Write consecutive same-kind items, rolling over where needed; frames written."""
        written = 0
        start = 0
        try:
            while start < len(run):
                file = self._file_for(run[start])
                stop = start + 1
                while stop < len(run) and file.mismatch(run[stop]) is None:
                    stop += 1
                cut = file.append(run[start].kind, run[start:stop])
                written += stop - start
                start = stop
                if cut:
                    self._flags_truncated += cut
                    log.warning("%d flags strings longer than %d bytes were cut in %s", cut,
                                FLAGS_BYTES, file.path)
        except Exception as exc:
            self._fail(exc, f"writing {run[start].kind} frame seq {run[start].seq}")
        return written

    def _file_for(self, item: _Item) -> _ExchangeFile:
        """The file ``item`` goes into: the current one, laid out or rolled over as needed."""
        file = self._file
        assert file is not None
        if file.shape is None:
            file.create_layout(item.image.shape, item.image.dtype, sorted(item.positions))
            file.start_swmr()
            return file
        reason = file.mismatch(item)
        if reason is None:
            return file
        return self._rollover(file, item, reason)

    def _rollover(self, old: _ExchangeFile, item: _Item, reason: str) -> _ExchangeFile:
        index = len(self._files)
        path = rollover_path(self.path, index)
        log.warning("recorder rolls over from %s to %s: %s", old.path, path, reason)
        attrs = self._file_attrs(index)
        attrs["previous_file"] = old.path.name
        attrs["rollover_reason"] = reason
        roles = old.roles + sorted(item.positions.keys() - set(old.roles))
        new = _ExchangeFile(path, attrs)
        self._file = new
        self._files.append(str(path))
        self._rollovers.append({"file": str(path), "reason": reason})
        try:
            new.create_layout(item.image.shape, item.image.dtype, roles)
            copied = new.copy_references_from(old)
        finally:
            old.close()
        new.h5.attrs["carried_dark_frames"] = copied["dark"]
        new.h5.attrs["carried_white_frames"] = copied["flat"]
        self._carried += copied["dark"] + copied["flat"]
        new.start_swmr()
        return new

    def _check_free_space(self, nbytes: int) -> None:
        """Stop cleanly before the disk is full: HDF5 can crash closing a file it failed to
        write, and may lose frames it had already accepted."""
        directory = self.path.parent
        free = shutil.disk_usage(directory).free
        if free < nbytes + MIN_FREE_BYTES:
            exc = OSError(errno.ENOSPC, f"only {free / 2**20:.0f} MiB free in {directory}, "
                          f"the recorder keeps {MIN_FREE_BYTES / 2**20:.0f} MiB free")
            self._fail(exc, "checking free space", broken=False)

    def _flush(self) -> None:
        if not self._broken and self._file is not None and self._file.shape is not None:
            try:
                self._file.flush()
            except Exception as exc:
                self._fail(exc, f"flushing {self._file.path}")

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is None:
            return
        try:
            file.close()
        except Exception as exc:
            self._fail(exc, f"closing {file.path}")

    def _fail(self, exc: Exception, context: str, broken: bool = True) -> None:
        log.error("recorder failed %s: %s; frames from now on are counted, not written",
                  context, exc, exc_info=exc)
        self._broken = self._broken or broken
        if self._error is None:
            self._error = f"{context}: {type(exc).__name__}: {exc}"
