"""Wire protocol v1: frames as ZMQ multipart ``[msgpack header, raw payload]``.

The receive side is zero-copy: the payload part is wrapped by :func:`numpy.frombuffer`, so the
decoded image is a read-only view on the ZMQ message buffer. Every malformed message raises
:class:`WireError` whose ``reason`` is a short code the sources count by.

Foreign streams: :func:`decode_adzmq` turns the areaDetector ADZMQ format (JSON header with
``htype: "array-1.0"`` + raw part) into the same :class:`~stream.frame.Frame`;
:func:`decode_message` tells the two apart by the first header byte (a msgpack map never starts
with ``{``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

from stream.frame import KINDS, Frame

VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024 * 1024

REQUIRED_KEYS = (
    "v", "seq", "t_ns", "shape", "dtype", "kind", "exposure_s", "energy_ev", "positions", "moving",
)


class WireError(ValueError):
    """A message that is not a valid frame. ``reason`` is a short code for counting."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def _buffer(part: Any) -> memoryview:
    """The bytes of one message part without copying (zmq.Frame, bytes or buffer)."""
    buf = getattr(part, "buffer", None)
    return memoryview(buf if buf is not None else part)


def encode_header(frame: Frame) -> bytes:
    """msgpack header of ``frame`` (everything but the pixels)."""
    image = frame.image
    header: dict[str, Any] = {
        "v": VERSION,
        "seq": int(frame.seq),
        "t_ns": int(frame.t_ns),
        "shape": [int(n) for n in image.shape],
        "dtype": image.dtype.str,
        "kind": frame.kind,
        "exposure_s": float(frame.exposure_s),
        "energy_ev": float(frame.energy_ev),
        "positions": {str(k): float(v) for k, v in frame.positions.items()},
        "moving": bool(frame.moving),
    }
    if frame.series is not None:
        header["series"] = frame.series
    if frame.attrs:
        header["attrs"] = frame.attrs
    packed = msgpack.packb(header, use_bin_type=True)
    if len(packed) > MAX_HEADER_BYTES:
        raise WireError("header_size", f"header is {len(packed)} B, limit {MAX_HEADER_BYTES} B")
    return packed


def encode(frame: Frame) -> list[bytes | memoryview]:
    """Frame → ``[header, payload]`` parts; the payload is a view, not a copy, when possible."""
    if frame.kind not in KINDS:
        raise WireError("kind", f"kind {frame.kind!r} is not one of {KINDS}")
    image = np.ascontiguousarray(frame.image)
    if image.ndim != 2:
        raise WireError("shape", f"image must be 2-D, got shape {image.shape}")
    return [encode_header(frame), memoryview(image.reshape(-1).view(np.uint8))]


def _header_part(parts: Sequence[Any], layout: str) -> memoryview:
    """The header part of a two-part message, checked for the part count and its size."""
    if len(parts) != 2:
        raise WireError("parts", f"expected 2 message parts {layout}, got {len(parts)}")
    head = _buffer(parts[0])
    if head.nbytes > MAX_HEADER_BYTES:
        raise WireError("header_size", f"header is {head.nbytes} B, limit {MAX_HEADER_BYTES} B")
    return head


def _need(header: dict, key: str, types: type | tuple[type, ...], what: str) -> Any:
    value = header[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise WireError("bad_value", f"header key {key!r} must be {what}, got {value!r}")
    if not isinstance(value, types):
        raise WireError("bad_value", f"header key {key!r} must be {what}, got {value!r}")
    return value


def _image(payload: memoryview, shape: Sequence[Any], dtype_str: Any, max_payload: int,
           ) -> np.ndarray:
    if (not isinstance(shape, list | tuple) or len(shape) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise WireError(
            "bad_value", f"shape must be [rows, cols] of non-negative ints, got {shape!r}")
    try:
        dtype = np.dtype(dtype_str)
    except TypeError as exc:
        raise WireError("bad_value", f"dtype {dtype_str!r} is not a numpy dtype") from exc
    if dtype.kind not in "uif" or dtype.hasobject:
        raise WireError("bad_value", f"dtype {dtype_str!r} is not a numeric pixel type")
    if payload.nbytes > max_payload:
        raise WireError(
            "payload_size", f"payload is {payload.nbytes} B, limit {max_payload} B")
    expected = int(shape[0]) * int(shape[1]) * dtype.itemsize
    if payload.nbytes != expected:
        raise WireError(
            "payload_mismatch",
            f"payload is {payload.nbytes} B but shape {list(shape)} of {dtype.str} needs "
            f"{expected} B")
    return np.frombuffer(payload, dtype=dtype).reshape(int(shape[0]), int(shape[1]))


def decode(parts: Sequence[Any], max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> Frame:
    """Validate and decode a v1 message ``[header, payload]`` into a :class:`Frame`.

    Raises
    ------
    WireError
        For any malformed message; ``reason`` names the kind of fault.
    """
    head = _header_part(parts, "[header, payload]")
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise WireError("msgpack", f"header is not valid msgpack ({exc})") from exc
    if not isinstance(header, dict):
        raise WireError("msgpack", f"header must be a msgpack map, got {type(header).__name__}")
    if header.get("v") != VERSION:
        raise WireError(
            "version", f"unknown protocol version {header.get('v')!r}, expected {VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in header]
    if missing:
        raise WireError("missing_key", f"header lacks required key(s) {missing}")
    seq = _need(header, "seq", int, "an int")
    t_ns = _need(header, "t_ns", int, "an int")
    kind = header["kind"]
    if kind not in KINDS:
        raise WireError("bad_value", f"kind {kind!r} is not one of {KINDS}")
    exposure_s = float(_need(header, "exposure_s", (int, float), "a number"))
    energy_ev = float(_need(header, "energy_ev", (int, float), "a number"))
    positions = _need(header, "positions", dict, "a map of role to position")
    if not all(isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool)
               for k, v in positions.items()):
        raise WireError("bad_value", "positions must map role names to numbers")
    moving = _need(header, "moving", bool, "a bool")
    series = header.get("series")
    if series is not None and not isinstance(series, str):
        raise WireError("bad_value", f"series must be a string, got {series!r}")
    attrs = header.get("attrs", {})
    if not isinstance(attrs, dict):
        raise WireError("bad_value", f"attrs must be a map, got {attrs!r}")
    image = _image(_buffer(parts[1]), header["shape"], header["dtype"], max_payload_bytes)
    return Frame(
        seq=seq, t_ns=t_ns, kind=kind, image=image, exposure_s=exposure_s, energy_ev=energy_ev,
        positions={k: float(v) for k, v in positions.items()}, moving=moving, series=series,
        attrs=attrs,
    )


_ADZMQ_FRAME_TYPES = {0: "data", 1: "dark", 2: "flat"}  # areaDetector FrameType enum order


def decode_adzmq(parts: Sequence[Any], max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
                 ) -> Frame:
    """Decode an areaDetector ADZMQ message (JSON header + raw part) into a :class:`Frame`.

    ADZMQ ≥ 1.4 sends ``htype: "array-1.0"`` with ``shape`` in [rows, cols] order; older
    releases sent ``htype: ["array-1.0"]`` with [cols, rows]. ``frame`` is the NDArray
    uniqueId; NDAttributes ``FrameType``, ``AcquireTime`` and ``Energy`` map onto the frame's
    kind, exposure and energy when present; the remaining attributes go to ``attrs``.
    """
    head = _header_part(parts, "ADZMQ [json header, data]")
    try:
        header = json.loads(head.tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError("json", f"ADZMQ header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise WireError("json", "ADZMQ header must be a JSON object")
    htype = header.get("htype")
    if htype == "array-1.0":
        shape = header.get("shape")
    elif htype == ["array-1.0"]:
        shape = list(reversed(header.get("shape") or []))
    else:
        raise WireError("version", f"unknown ADZMQ htype {htype!r}")
    for key in ("shape", "type", "frame"):
        if key not in header:
            raise WireError("missing_key", f"ADZMQ header lacks {key!r}")
    endian = "<" if header.get("encoding", "little") == "little" else ">"
    try:
        dtype_str = np.dtype(header["type"]).newbyteorder(endian).str
    except TypeError as exc:
        raise WireError("bad_value", f"ADZMQ type {header['type']!r} is not a numpy dtype") from exc
    image = _image(_buffer(parts[1]), shape, dtype_str, max_payload_bytes)
    attrs = dict(header.get("ndattr") or {})
    kind = _ADZMQ_FRAME_TYPES.get(attrs.pop("FrameType", 0), "data")
    return Frame(
        seq=int(header["frame"]), t_ns=time.time_ns(), kind=kind, image=image,
        exposure_s=float(attrs.pop("AcquireTime", 0.0)),
        energy_ev=float(attrs.pop("Energy", 0.0)), attrs=attrs,
    )


def decode_message(parts: Sequence[Any], max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
                   ) -> Frame:
    """Decode either protocol, telling them apart by the header's first byte."""
    if parts and _buffer(parts[0])[:1].tobytes() == b"{":
        return decode_adzmq(parts, max_payload_bytes)
    return decode(parts, max_payload_bytes)
