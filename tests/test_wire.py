"""Wire protocol v1: round trips, zero copy, and a clear error for every bad input."""

from __future__ import annotations

import json

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from stream.frame import KINDS, Frame
from stream.wire import (
    MAX_HEADER_BYTES,
    WireError,
    decode,
    decode_adzmq,
    decode_message,
    encode,
)

PIXEL_DTYPES = ["<u1", "<u2", "<u4", "<i4", "<f4", "<f8", ">u2"]


def _frame(image: np.ndarray, **kw) -> Frame:
    base = dict(seq=7, t_ns=1_700_000_000_000_000_000, kind="data", image=image,
                exposure_s=0.05, energy_ev=8000.0, positions={"zp_z_um": 12.5},
                moving=False, series="s1", attrs={"pixel_nm": 10.0})
    base.update(kw)
    return Frame(**base)


def _header(**over) -> bytes:
    h = {"v": 1, "seq": 1, "t_ns": 5, "shape": [2, 3], "dtype": "<u2", "kind": "data",
         "exposure_s": 0.1, "energy_ev": 8000.0, "positions": {}, "moving": False}
    h.update(over)
    return msgpack.packb({k: v for k, v in h.items() if v is not _DROP}, use_bin_type=True)


_DROP = object()
PAYLOAD = np.zeros((2, 3), "<u2").tobytes()


@settings(max_examples=60, deadline=None)
@given(
    image=hnp.arrays(
        dtype=st.sampled_from(PIXEL_DTYPES),
        shape=hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=17),
    ),
    seq=st.integers(0, 2**62),
    kind=st.sampled_from(KINDS),
    energy_ev=st.floats(5000, 14000),
    positions=st.dictionaries(st.text(min_size=1, max_size=8),
                              st.floats(-1e6, 1e6), max_size=4),
    moving=st.booleans(),
)
def test_round_trip(image, seq, kind, energy_ev, positions, moving):
    frame = _frame(image, seq=seq, kind=kind, energy_ev=energy_ev, positions=positions,
                   moving=moving)
    parts = [bytes(p) for p in encode(frame)]
    got = decode(parts)
    assert got.seq == seq and got.kind == kind and got.moving == moving
    assert got.energy_ev == energy_ev and got.positions == positions
    assert got.attrs == {"pixel_nm": 10.0} and got.series == "s1"
    assert got.image.dtype == image.dtype and got.image.shape == image.shape
    np.testing.assert_array_equal(got.image, image)


def test_decode_is_zero_copy():
    payload = bytearray(np.arange(6, dtype="<u2").tobytes())
    frame = decode([_header(), payload])
    payload[0] = 42  # the decoded image is a view on the received buffer
    assert frame.image[0, 0] == 42
    assert not frame.image.flags.writeable or frame.image.base is not None


def test_decode_zmq_frames_zero_copy():
    zmq = pytest.importorskip("zmq")
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://wire-test")
    b.connect("inproc://wire-test")
    image = np.arange(64 * 64, dtype="<u2").reshape(64, 64)
    a.send_multipart(encode(_frame(image)), copy=False)
    parts = b.recv_multipart(copy=False)
    frame = decode(parts)
    np.testing.assert_array_equal(frame.image, image)
    assert np.shares_memory(frame.image, np.frombuffer(parts[1].buffer, "<u2"))
    a.close(), b.close(), ctx.term()


@pytest.mark.parametrize(
    "parts, reason",
    [
        ([_header()], "parts"),
        ([_header(), PAYLOAD, b"x"], "parts"),
        ([b"\xc1\xc1garbage", PAYLOAD], "msgpack"),
        ([msgpack.packb([1, 2, 3]), PAYLOAD], "msgpack"),
        ([_header(v=2), PAYLOAD], "version"),
        ([_header(v=_DROP), PAYLOAD], "version"),
        ([_header(seq=_DROP), PAYLOAD], "missing_key"),
        ([_header(positions=_DROP), PAYLOAD], "missing_key"),
        ([_header(), PAYLOAD[:-1]], "payload_mismatch"),
        ([_header(), PAYLOAD + b"\0\0"], "payload_mismatch"),
        ([_header(dtype="<u4"), PAYLOAD], "payload_mismatch"),
        ([_header(shape=[3, 3]), PAYLOAD], "payload_mismatch"),
        ([_header(shape=[6]), PAYLOAD], "bad_value"),
        ([_header(shape=[2, -3]), PAYLOAD], "bad_value"),
        ([_header(dtype="nonsense"), PAYLOAD], "bad_value"),
        ([_header(dtype="|O"), PAYLOAD], "bad_value"),
        ([_header(kind="bright"), PAYLOAD], "bad_value"),
        ([_header(seq="1"), PAYLOAD], "bad_value"),
        ([_header(moving=1), PAYLOAD], "bad_value"),
        ([_header(positions={"zp_z_um": "far"}), PAYLOAD], "bad_value"),
        ([_header(attrs=[1]), PAYLOAD], "bad_value"),
        ([b"\x80" + b"\0" * MAX_HEADER_BYTES, PAYLOAD], "header_size"),
    ],
)
def test_bad_messages_raise_one_error_type(parts, reason):
    with pytest.raises(WireError) as info:
        decode(parts)
    assert info.value.reason == reason
    assert reason in str(info.value)


def test_payload_limit():
    with pytest.raises(WireError, match="payload_size"):
        decode([_header(), PAYLOAD], max_payload_bytes=4)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=0, max_size=4))
def test_garbage_never_escapes_as_another_error(parts):
    try:
        decode_message(parts)
    except WireError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "seq", "t_ns", "shape", "dtype", "kind",
                                        "exposure_s", "energy_ev", "positions", "moving",
                                        "attrs", "series"]),
                       st.one_of(st.none(), st.integers(-2**63, 2**63 - 1), st.floats(),
                                 st.text(max_size=5),
                                 st.lists(st.integers(-3, 5), max_size=3),
                                 st.dictionaries(st.text(max_size=3), st.integers(-9, 9))),
                       max_size=12),
       st.binary(max_size=64))
def test_wrong_headers_are_wire_errors(header, payload):
    try:
        decode([msgpack.packb(header), payload])
    except WireError:
        pass


def test_adzmq_new_and_old_htype():
    image = np.arange(12, dtype="<u2").reshape(3, 4)
    new = json.dumps({"htype": "array-1.0", "shape": [3, 4], "type": "uint16", "frame": 9,
                      "ndattr": {"FrameType": 2, "AcquireTime": 0.2, "Energy": 7200.0,
                                 "Ring": 300.0}}).encode()
    frame = decode_message([new, image.tobytes()])
    assert frame.kind == "flat" and frame.seq == 9 and frame.exposure_s == 0.2
    assert frame.energy_ev == 7200.0 and frame.attrs == {"Ring": 300.0}
    np.testing.assert_array_equal(frame.image, image)
    old = json.dumps({"htype": ["array-1.0"], "shape": [4, 3], "type": "uint16",
                      "frame": 1}).encode()
    frame = decode_adzmq([old, image.tobytes()])
    assert frame.shape == (3, 4) and frame.kind == "data"
    with pytest.raises(WireError, match="htype"):
        decode_adzmq([json.dumps({"htype": "chunk-1.0"}).encode(), b""])
    with pytest.raises(WireError, match="json"):
        decode_adzmq([b"{not json", b""])


def test_encode_rejects_bad_frames():
    with pytest.raises(WireError, match="kind"):
        encode(_frame(np.zeros((2, 2), np.uint16), kind="bright"))
    with pytest.raises(WireError, match="2-D"):
        encode(_frame(np.zeros((2, 2, 2), np.uint16)))
