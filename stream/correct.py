"""Dark/flat correction and vibration averaging: the per-frame hot path of the pipeline.

Correction
----------
``corrected = (raw - dark) / (flat - dark)`` in float32, where ``dark`` and ``flat`` are the
means of reference stacks. It is computed as ``(float32(raw) - dark) * gain`` with
``gain = 1 / (flat - dark)`` precomputed once per reference update, so the per-frame work is one
subtract and one multiply per pixel.

Guard rule (offline :func:`normalize` and live :class:`References` use the same code): a pixel
whose ``flat - dark`` is below ``min_denominator`` (counts, compared in float32), or whose
reciprocal is not finite (``flat - dark`` is 0, subnormal or NaN), carries no information: its
gain is NaN, so its corrected value is NaN — never ±inf and never a silently clipped huge value.
The live default is ``[correction] min_denominator = 1.0``. NaN in a raw frame stays NaN.
(``min_denominator = 0`` keeps only the division-by-zero guard: a float flat a hair above its
dark, say 1e-30 counts, then gives a huge or overflowing value, as asked.)

Live references
---------------
:class:`References` keeps, per key ``(round(energy_ev, 1), exposure_s, shape)`` and per kind
(dark, flat), a ring of the last ``n_frames`` frames of the current *reference run*, in arrival
order; the reference image is the float32 mean of what is in the ring, summed oldest to newest.
A run is a sequence of dark (flat) frames with no data frame looked up in between: re-taking
references after data frames starts a new run, which replaces the old references at once (a
fresh set of 3 flats is not mixed with 7 stale ones). Within a run, frames beyond ``n_frames``
replace the oldest ones. A change of pixel dtype at a key restarts that ring. The dark/gain
pair is rebuilt lazily, at the first :meth:`References.lookup` after its rings changed, so a
burst of references costs one rebuild, and never per data frame. Every rebuild makes a new
immutable :class:`ReferencePair` with a new ``id`` (increasing), which a recorder notes per
data frame. At most ``max_keys`` keys are held (least recently used goes first): each key holds
``2 * n_frames`` raw frames plus three float32 images (about 260 MiB for 2048² uint16 with
``n_frames = 10``).

Averaging
---------
:class:`Corrector` averages blocks of ``average_frames`` consecutive data frames that share a
shape, a reference key, a correction state and a reference pair; a frame that differs closes
the open block early (flagged ``partial_block``). Correction and averaging are one pass per
frame through a numba kernel: the first frame of a block writes into a preallocated float32
buffer, middle frames add, the last adds and scales by ``1/N``; a block emitted early is scaled
by ``1/n`` in one extra pass (rare). Each block fills the same float32 buffer of its shape, so
an emitted image is valid until the next push; only when one push both closes a block early and
starts a new one does the new block go to a second buffer (one image-sized buffer in the cache
instead of two alternating ones is about 10 % faster).

Performance
-----------
The kernel is serial. On 2048² uint16 (``python -m bench.kernels``, 2-core VM shared with other
work) it takes about 3.6 ms per frame, below a copy of the same bytes (~4.2 ms) and ~4x faster
than plain numpy. A ``prange`` twin compiled with ``parallel=True`` took ~2.1 ms when both cores
were idle but ~6 ms (median; p90 ~8 ms) with one core busy, because each half of the image
waits for its core; the pipeline has a receiver, publishers and a recorder on the same two
cores, so the serial kernel's steady time wins.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np
from numba import njit, prange

from stream.frame import Frame

SUPPORTED_DTYPES = tuple(
    np.dtype(t) for t in ("u1", "u2", "u4", "i2", "i4", "f4", "f8")
)
"""Pixel dtypes the per-frame kernels take (native byte order; others are converted first)."""

WARMUP_DTYPES = tuple(np.dtype(t) for t in ("u1", "u2", "u4", "i4", "f4"))
"""Pixel dtypes :func:`warmup` compiles for (the others compile at their first frame)."""

RefKey = tuple[float, float, tuple[int, ...]]
"""``(round(energy_ev, 1), exposure_s, shape)``: which references a frame needs."""

# Kernel modes: how a frame's corrected values enter the block buffer.
_WRITE = 0  # first frame of a block (or the only one): out = v
_ADD = 1  # middle frame: out += v
_ADD_SCALE = 2  # last frame of a block of N > 1: out = (out + v) * (1/N)


# -- kernels ------------------------------------------------------------------------------------
# The outer loops use prange so bench/kernels.py can compile a parallel twin from py_func; under
# this serial njit, prange is range.

@njit(nogil=True, cache=True)
def _correct_kernel(raw, dark, gain, out, mode, scale):  # pragma: no cover - compiled
    rows, cols = raw.shape
    if mode == _WRITE:
        for i in prange(rows):
            for j in range(cols):
                out[i, j] = (np.float32(raw[i, j]) - dark[i, j]) * gain[i, j]
    elif mode == _ADD:
        for i in prange(rows):
            for j in range(cols):
                out[i, j] += (np.float32(raw[i, j]) - dark[i, j]) * gain[i, j]
    else:
        for i in prange(rows):
            for j in range(cols):
                out[i, j] = (out[i, j] + (np.float32(raw[i, j]) - dark[i, j]) * gain[i, j]) * scale


@njit(nogil=True, cache=True)
def _convert_kernel(raw, out, mode, scale):  # pragma: no cover - compiled
    rows, cols = raw.shape
    if mode == _WRITE:
        for i in prange(rows):
            for j in range(cols):
                out[i, j] = np.float32(raw[i, j])
    elif mode == _ADD:
        for i in prange(rows):
            for j in range(cols):
                out[i, j] += np.float32(raw[i, j])
    else:
        for i in prange(rows):
            for j in range(cols):
                out[i, j] = (out[i, j] + np.float32(raw[i, j])) * scale


def _kernel_input(image: np.ndarray, what: str) -> np.ndarray:
    """``image`` as a 2-D, C-contiguous, native-order array of a supported dtype.

    Frames from the wire already are (no copy); anything else is copied once.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D image, got {_describe(image)}")
    dtype = image.dtype.newbyteorder("=")
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{what}: pixel dtype {image.dtype} is not supported; supported: "
                         f"{', '.join(d.name for d in SUPPORTED_DTYPES)}")
    if image.dtype.isnative and image.flags.c_contiguous:
        return image
    return np.ascontiguousarray(image, dtype=dtype)


def _apply(raw: np.ndarray, pair: ReferencePair | None, out: np.ndarray, mode: int,
           n_frames: int) -> None:
    """Correct (or only convert, when ``pair`` is None) ``raw`` into ``out`` in ``mode``.

    Parameters
    ----------
    raw : ndarray, shape (rows, cols)
        Checked by :func:`_kernel_input`.
    pair : ReferencePair or None
        Its ``dark`` and ``gain`` have ``raw``'s shape.
    out : ndarray of float32, shape (rows, cols)
        The block buffer.
    mode : int
        ``_WRITE``, ``_ADD`` or ``_ADD_SCALE``.
    n_frames : int
        Frames in the block; ``_ADD_SCALE`` scales by ``1/n_frames``.
    """
    scale = np.float32(1.0 / n_frames)
    if pair is None:
        _convert_kernel(raw, out, mode, scale)
    else:
        _correct_kernel(raw, pair.dark, pair.gain, out, mode, scale)


def warmup() -> None:
    """Compile (or load from numba's cache) the kernels for :data:`WARMUP_DTYPES`.

    Run once at start-up so the first real frame is not slow. Frames decoded from the wire are
    read-only views, so both writeable and read-only raw images are compiled for.
    """
    dark = np.zeros((2, 2), np.float32)
    gain = np.ones((2, 2), np.float32)
    for array in (dark, gain):
        array.setflags(write=False)
    out = np.empty((2, 2), np.float32)
    for dtype in WARMUP_DTYPES:
        for writeable in (True, False):
            raw = np.ones((2, 2), dtype)
            raw.setflags(write=writeable)
            for mode in (_WRITE, _ADD, _ADD_SCALE):
                _correct_kernel(raw, dark, gain, out, mode, np.float32(0.5))
                _convert_kernel(raw, out, mode, np.float32(0.5))


# -- shared reference arithmetic ----------------------------------------------------------------

def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"array of shape {value.shape} and dtype {value.dtype}"
    return type(value).__name__


def _check_min_denominator(min_denominator: float) -> float:
    if isinstance(min_denominator, bool) or not isinstance(min_denominator, int | float):
        raise TypeError(f"min_denominator must be a number of counts, got {min_denominator!r}")
    if not math.isfinite(min_denominator) or min_denominator < 0:
        raise ValueError(f"min_denominator must be finite and >= 0 counts, got {min_denominator}")
    return float(min_denominator)


def _mean_of(images: list[np.ndarray]) -> np.ndarray:
    """float32 mean of equally shaped images, summed in float32 in the given order.

    Parameters
    ----------
    images : list of ndarray, each shape (rows, cols)

    Returns
    -------
    ndarray of float32, shape (rows, cols)
        A new array.
    """
    acc = np.array(images[0], dtype=np.float32, order="C")
    for image in images[1:]:
        np.add(acc, image, out=acc, dtype=np.float32)
    if len(images) > 1:
        acc /= np.float32(len(images))
    return acc


def _gain(dark: np.ndarray, flat: np.ndarray, min_denominator: float) -> np.ndarray:
    """``1 / (flat - dark)`` in float32, NaN where the guard rule (module docstring) applies.

    Parameters
    ----------
    dark, flat : ndarray of float32, shape (rows, cols)
        Mean dark and flat, counts.
    min_denominator : float
        Smallest usable ``flat - dark``, counts.

    Returns
    -------
    ndarray of float32, shape (rows, cols)
        Per-pixel gain, 1/counts.
    """
    denominator = flat - dark
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        gain = np.float32(1.0) / denominator
        dead = ~(denominator >= np.float32(min_denominator)) | ~np.isfinite(gain)
    gain[dead] = np.nan
    return gain


def _as_stack(name: str, array: np.ndarray) -> np.ndarray:
    """``array`` (one image or a stack) as a 3-D stack; raises naming ``name`` if unusable."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(array).__name__}")
    if array.dtype == np.bool_ or array.dtype.kind not in "uif":
        raise TypeError(f"{name} must hold integer or float pixels, got dtype {array.dtype}")
    if array.ndim not in (2, 3):
        raise ValueError(f"{name} must be 2-D (rows, cols) or 3-D (frames, rows, cols), "
                         f"got shape {array.shape}")
    stack = array if array.ndim == 3 else array[np.newaxis]
    if stack.size == 0:
        raise ValueError(f"{name} is empty: shape {array.shape}")
    return stack


def normalize(raw: np.ndarray, darks: np.ndarray, flats: np.ndarray,
              min_denominator: float = 1.0) -> np.ndarray:
    """Offline dark/flat correction ``(raw - dark) / (flat - dark)`` in float32.

    Parameters
    ----------
    raw : ndarray, shape (rows, cols) or (frames, rows, cols)
        Integer or float pixels, counts.
    darks, flats : ndarray, shape (rows, cols) or (n, rows, cols)
        Reference frames, counts; each stack is averaged (float32 mean) first.
    min_denominator : float
        Pixels whose mean ``flat - dark`` is below this (counts) are NaN in the result
        (guard rule in the module docstring).

    Returns
    -------
    ndarray of float32, shape of ``raw``
        A new array; the inputs are not modified. Values are the same, to the bit, as those
        :class:`Corrector` gives for the same frames with one-frame blocks.
    """
    min_denominator = _check_min_denominator(min_denominator)
    raw_stack = _as_stack("raw", raw)
    dark_stack = _as_stack("darks", darks)
    flat_stack = _as_stack("flats", flats)
    shape = raw_stack.shape[1:]
    for name, stack in (("darks", dark_stack), ("flats", flat_stack)):
        if stack.shape[1:] != shape:
            raise ValueError(f"{name} frames have shape {stack.shape[1:]}, raw frames {shape}")
    dark = _mean_of(list(dark_stack))
    gain = _gain(dark, _mean_of(list(flat_stack)), min_denominator)
    out = np.subtract(raw, dark, dtype=np.float32)
    out *= gain
    return out


# -- live references ----------------------------------------------------------------------------

def reference_key(frame: Frame) -> RefKey:
    """Key of the references ``frame`` needs or provides: energy (0.1 eV), exposure, shape."""
    return (round(float(frame.energy_ev), 1), float(frame.exposure_s), tuple(frame.image.shape))


def _describe_key(key: RefKey) -> str:
    energy_ev, exposure_s, shape = key
    return f"energy {energy_ev} eV, exposure {exposure_s} s, shape {shape}"


@dataclass(frozen=True, slots=True, eq=False)
class ReferencePair:
    """Averaged dark and flat of one key and what the per-frame kernel needs from them.

    The arrays are read-only and never change: a reference update makes a new pair.

    Attributes
    ----------
    id : int
        Increases with every update, over all keys of one :class:`References`.
    key : tuple
        ``(round(energy_ev, 1), exposure_s, shape)``.
    dark, flat : ndarray of float32, shape (rows, cols)
        Mean dark and mean flat, counts.
    gain : ndarray of float32, shape (rows, cols)
        ``1 / (flat - dark)``, 1/counts, NaN where guarded.
    n_dark, n_flat : int
        Frames in each mean.
    min_denominator : float
        The guard threshold used, counts.
    """

    id: int
    key: RefKey
    dark: np.ndarray
    flat: np.ndarray
    gain: np.ndarray
    n_dark: int
    n_flat: int
    min_denominator: float


class _Ring:
    """The last ``capacity`` images of one kind at one key, in arrival order."""

    def __init__(self, capacity: int, image: np.ndarray):
        self.images = np.empty((capacity, *image.shape), dtype=image.dtype)
        self.count = 0
        self.next = 0
        self.generation = 0
        self.run = 0

    def add(self, image: np.ndarray, generation: int) -> None:
        self.images[self.next] = image
        self.next = (self.next + 1) % len(self.images)
        self.count = min(self.count + 1, len(self.images))
        self.generation = generation

    def in_order(self) -> list[np.ndarray]:
        """Views of the held images, oldest first."""
        start = (self.next - self.count) % len(self.images)
        return [self.images[(start + k) % len(self.images)] for k in range(self.count)]


@dataclass(slots=True)
class _Entry:
    rings: dict[str, _Ring] = field(default_factory=dict)
    pair: ReferencePair | None = None
    built_from: tuple[int, int] = (-1, -1)


class References:
    """Live store of dark and flat references, keyed by energy, exposure and shape.

    Semantics are in the module docstring. Not thread-safe: use it from the processing thread.

    Parameters
    ----------
    n_frames : int
        Each reference is the mean of the last ``n_frames`` frames of its kind and key.
    min_denominator : float
        Guard threshold on ``flat - dark``, counts.
    max_keys : int
        Most keys held at once; the least recently used key is dropped beyond it.

    Attributes
    ----------
    counters : dict of str to int
        ``darks`` and ``flats`` added, ``updates`` (pairs built), ``evicted_keys``.
    """

    RETIRED_PAIRS = 4
    """How many replaced pairs :meth:`by_id` still finds (blocks emitted just after an update)."""

    def __init__(self, n_frames: int, min_denominator: float, max_keys: int = 8):
        for name, value in (("n_frames", n_frames), ("max_keys", max_keys)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.n_frames = n_frames
        self.min_denominator = _check_min_denominator(min_denominator)
        self.max_keys = max_keys
        self.counters = {"darks": 0, "flats": 0, "updates": 0, "evicted_keys": 0}
        self._entries: OrderedDict[RefKey, _Entry] = OrderedDict()
        self._retired: deque[ReferencePair] = deque(maxlen=self.RETIRED_PAIRS)
        self._generation = 0
        self._lookups = 0
        self._last_id = 0

    def add(self, frame: Frame) -> None:
        """Add a dark or flat frame to the ring of its kind and key (the image is copied)."""
        if frame.kind not in ("dark", "flat"):
            raise ValueError(f"frame seq {frame.seq}: References.add takes dark or flat frames, "
                             f"got kind {frame.kind!r}")
        image = frame.image
        if not isinstance(image, np.ndarray) or image.ndim != 2 or image.size == 0:
            raise ValueError(f"{frame.kind} frame seq {frame.seq}: expected a non-empty 2-D "
                             f"image, got {_describe(image)}")
        if image.dtype == np.bool_ or image.dtype.kind not in "uif":
            raise ValueError(f"{frame.kind} frame seq {frame.seq}: pixel dtype {image.dtype} "
                             "is not integer or float")
        key = reference_key(frame)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
            self._evict_beyond_max()
        self._entries.move_to_end(key)
        ring = entry.rings.get(frame.kind)
        if (ring is None or ring.images.dtype != image.dtype
                or ring.run != self._lookups):  # data came in between: a new reference run
            ring = entry.rings[frame.kind] = _Ring(self.n_frames, image)
            ring.run = self._lookups
        self._generation += 1
        ring.add(image, self._generation)
        self.counters["darks" if frame.kind == "dark" else "flats"] += 1

    def lookup(self, frame: Frame) -> tuple[ReferencePair | None, str | None]:
        """The current reference pair for ``frame``, or None and the reason there is none.

        Returns
        -------
        pair : ReferencePair or None
        reason : str or None
            What is missing, e.g. ``"no flat for energy 8000.0 eV, exposure 0.1 s, shape
            (512, 512)"``; None when ``pair`` is given.
        """
        self._lookups += 1
        key = reference_key(frame)
        entry = self._entries.get(key)
        rings = entry.rings if entry is not None else {}
        missing = [kind for kind in ("dark", "flat") if kind not in rings]
        if missing:
            return None, f"no {' and no '.join(missing)} for {_describe_key(key)}"
        self._entries.move_to_end(key)
        generations = (rings["dark"].generation, rings["flat"].generation)
        if entry.pair is None or entry.built_from != generations:
            if entry.pair is not None:
                self._retired.append(entry.pair)
            entry.pair = self._build(key, rings["dark"], rings["flat"])
            entry.built_from = generations
        return entry.pair, None

    def by_id(self, reference_id: int) -> ReferencePair:
        """The pair with this id, if it is current or among the last few replaced ones."""
        for entry in self._entries.values():
            if entry.pair is not None and entry.pair.id == reference_id:
                return entry.pair
        for pair in self._retired:
            if pair.id == reference_id:
                return pair
        raise KeyError(f"reference {reference_id} is not held (current and last "
                       f"{self.RETIRED_PAIRS} replaced pairs only)")

    @property
    def keys(self) -> list[RefKey]:
        """Keys held, least recently used first."""
        return list(self._entries)

    def _build(self, key: RefKey, dark_ring: _Ring, flat_ring: _Ring) -> ReferencePair:
        dark = _mean_of(dark_ring.in_order())
        flat = _mean_of(flat_ring.in_order())
        gain = _gain(dark, flat, self.min_denominator)
        for array in (dark, flat, gain):
            array.setflags(write=False)
        self._last_id += 1
        self.counters["updates"] += 1
        return ReferencePair(id=self._last_id, key=key, dark=dark, flat=flat, gain=gain,
                             n_dark=dark_ring.count, n_flat=flat_ring.count,
                             min_denominator=self.min_denominator)

    def _evict_beyond_max(self) -> None:
        while len(self._entries) > self.max_keys:
            _, entry = self._entries.popitem(last=False)
            if entry.pair is not None:
                self._retired.append(entry.pair)
            self.counters["evicted_keys"] += 1


# -- correction + averaging ---------------------------------------------------------------------

@dataclass(slots=True)
class Processed:
    """One finished block: the corrected (and averaged) image and where it came from.

    Attributes
    ----------
    image : ndarray of float32, shape (rows, cols)
        A view on a buffer owned by the :class:`Corrector`: valid until the next
        :meth:`Corrector.push` or :meth:`Corrector.flush` — copy it to keep it.
    seq_first, seq_last : int
        Sequence numbers of the first and last source frames.
    n_frames : int
        Source frames averaged.
    frame : Frame
        The last source frame (its metadata and stamps describe the block).
    corrected : bool
        True if dark/flat corrected, False if only converted to float32.
    reference_id : int or None
        :attr:`ReferencePair.id` used, None when uncorrected.
    flags : list of str
        ``"uncorrected: <reason>"``, ``"partial_block"`` (fewer than ``average_frames``).
    """

    image: np.ndarray
    seq_first: int
    seq_last: int
    n_frames: int
    frame: Frame
    corrected: bool
    reference_id: int | None
    flags: list[str]


@dataclass(slots=True)
class _Block:
    key: tuple[RefKey, int | None, str | None]
    pair: ReferencePair | None
    reason: str | None
    buffer: np.ndarray
    seq_first: int
    frame: Frame
    n: int = 0


class Corrector:
    """Fused dark/flat correction and block averaging of data frames.

    Parameters
    ----------
    references : References
        Where each data frame's reference pair is looked up.
    average_frames : int
        Frames per block (1 = no averaging).
    enabled : bool
        False passes every frame uncorrected (flagged ``uncorrected: correction disabled``).

    Attributes
    ----------
    counters : dict of str to int
        ``frames`` pushed, ``corrected``, ``uncorrected``, ``blocks`` emitted,
        ``partial_blocks`` among them.
    """

    MAX_SHAPES = 2
    """Shapes whose block buffers are kept (the current one and the one before)."""

    def __init__(self, references: References, average_frames: int = 1, enabled: bool = True):
        if not isinstance(references, References):
            raise TypeError(f"references must be References, got {type(references).__name__}")
        if (isinstance(average_frames, bool) or not isinstance(average_frames, int)
                or average_frames < 1):
            raise ValueError(f"average_frames must be an integer >= 1, got {average_frames!r}")
        self.references = references
        self.average_frames = average_frames
        self.enabled = bool(enabled)
        self.counters = {"frames": 0, "corrected": 0, "uncorrected": 0, "blocks": 0,
                         "partial_blocks": 0}
        self._buffers: OrderedDict[tuple[int, ...], list[np.ndarray]] = OrderedDict()
        self._block: _Block | None = None

    def push(self, frame: Frame) -> list[Processed]:
        """Correct one data frame into the open block; return the blocks it finished.

        Returns
        -------
        list of Processed
            Empty, or the block closed early because this frame differs from it (flagged
            ``partial_block``), and/or the block this frame completed. Their images are valid
            until the next ``push`` or ``flush``. ``frame`` gets stamp ``correct``; each
            emitted block's last frame gets stamp ``average``.
        """
        if frame.kind != "data":
            raise ValueError(f"frame seq {frame.seq}: Corrector.push takes data frames, got "
                             f"kind {frame.kind!r}")
        raw = _kernel_input(frame.image, f"data frame seq {frame.seq}")
        if self.enabled:
            pair, reason = self.references.lookup(frame)
        else:
            pair, reason = None, "correction disabled"
        key = (reference_key(frame), None if pair is None else pair.id, reason)
        done = []
        if self._block is not None and self._block.key != key:
            done.append(self._finish())
        if self._block is None:
            busy = done[0].image if done else None
            self._block = _Block(key=key, pair=pair, reason=reason,
                                 buffer=self._buffer(raw.shape, busy), seq_first=frame.seq,
                                 frame=frame)
        block = self._block
        block.n += 1
        if block.n == 1:
            mode = _WRITE
        else:
            mode = _ADD_SCALE if block.n == self.average_frames else _ADD
        _apply(raw, pair, block.buffer, mode, block.n)
        frame.stamp("correct")
        block.frame = frame
        self.counters["frames"] += 1
        self.counters["corrected" if pair is not None else "uncorrected"] += 1
        if block.n == self.average_frames:
            done.append(self._finish())
        return done

    def flush(self) -> list[Processed]:
        """Emit the open block, if any (flagged ``partial_block``), e.g. at the end of a series."""
        return [self._finish()] if self._block is not None else []

    def _finish(self) -> Processed:
        block = self._block
        self._block = None
        flags = []
        if block.pair is None:
            flags.append(f"uncorrected: {block.reason}")
        if block.n < self.average_frames:
            flags.append("partial_block")
            if block.n > 1:
                block.buffer *= np.float32(1.0 / block.n)
            self.counters["partial_blocks"] += 1
        self.counters["blocks"] += 1
        block.frame.stamp("average")
        return Processed(image=block.buffer, seq_first=block.seq_first,
                         seq_last=block.frame.seq, n_frames=block.n, frame=block.frame,
                         corrected=block.pair is not None,
                         reference_id=None if block.pair is None else block.pair.id,
                         flags=flags)

    def _buffer(self, shape: tuple[int, ...], busy: np.ndarray | None) -> np.ndarray:
        """A block buffer of ``shape`` other than ``busy`` (emitted by the current push)."""
        buffers = self._buffers.get(shape)
        if buffers is None:
            buffers = self._buffers[shape] = [np.empty(shape, np.float32) for _ in range(2)]
            while len(self._buffers) > self.MAX_SHAPES:
                self._buffers.popitem(last=False)
        self._buffers.move_to_end(shape)
        if buffers[0] is busy:
            buffers.reverse()
        return buffers[0]
