"""Replay over real loopback ZMQ: order, kinds, pixels, end frame, pacing, loop, stop."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from stream.frame import Frame, end_frame
from stream.replay import replay
from stream.wire import decode

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
T0_NS = 1_700_000_000_000_000_000


def free_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


class Receiver(threading.Thread):
    """PULL side: decodes every message until the end frame (or a timeout)."""

    def __init__(self, url: str, stop_after: int | None = None,
                 stop: threading.Event | None = None, timeout_s: float = 20.0):
        super().__init__(daemon=True)
        self.url, self.stop_after, self.stop, self.timeout_s = url, stop_after, stop, timeout_s
        self.frames: list[Frame] = []
        self.arrival_s: list[float] = []
        self.start()

    def run(self) -> None:
        sock = zmq.Context.instance().socket(zmq.PULL)
        sock.connect(self.url)
        deadline = time.monotonic() + self.timeout_s
        try:
            while time.monotonic() < deadline:
                if not sock.poll(50):
                    continue
                frame = decode(sock.recv_multipart(copy=False))
                frame.image = np.array(frame.image)  # own the pixels beyond the message
                self.frames.append(frame)
                self.arrival_s.append(time.monotonic())
                if frame.kind == "end":
                    return
                if self.stop_after is not None and len(self.frames) >= self.stop_after:
                    self.stop.set()
        finally:
            sock.close(linger=0)

    def result(self) -> list[Frame]:
        self.join(30)
        assert not self.is_alive()
        return self.frames


def make_frames(n_data: int = 5, period_ns: int = 10_000_000) -> list[Frame]:
    rng = np.random.default_rng(11)
    kinds = ["dark", "flat"] + ["data"] * n_data
    return [Frame(seq=i, t_ns=T0_NS + i * period_ns, kind=kind,
                  image=rng.integers(0, 65535, (12, 10), dtype=np.uint16), exposure_s=0.01,
                  energy_ev=8000.0, positions={"zp_z_um": 0.5 * i}, series="test",
                  attrs={"pixel_nm": 20.0})
            for i, kind in enumerate(kinds)]


def test_every_frame_arrives_in_order_then_the_end_frame():
    url = free_url()
    frames = make_frames()
    rx = Receiver(url)
    summary = replay(frames, url)
    got = rx.result()
    assert [f.kind for f in got] == [f.kind for f in frames] + ["end"]
    assert [f.seq for f in got] == list(range(len(frames) + 1))
    for sent, received in zip(frames, got, strict=False):
        np.testing.assert_array_equal(received.image, sent.image)
        assert received.t_ns == sent.t_ns  # unpaced: recorded times go out as they are
        assert received.positions == sent.positions and received.series == "test"
        assert received.attrs == {"pixel_nm": 20.0}
    assert got[-1].series == "test"
    assert summary["sent"] == {"dark": 1, "flat": 1, "data": 5}
    assert summary["frames"] == 7 and summary["end_sent"] and not summary["stopped"]
    assert summary["passes"] == 1 and summary["bind"] == url
    # the source frames were not changed by the replay
    assert [f.seq for f in frames] == list(range(7)) and frames[0].attrs == {"pixel_nm": 20.0}


def test_replays_a_real_series_from_its_file():
    from stream.readers import open_series

    path = DATA / "dls-savu-projections"
    if not path.exists():
        pytest.skip(f"shared test data {path} is absent (see ../shared/data/README.md)")
    series = open_series(path)
    url = free_url()
    rx = Receiver(url)
    summary = replay(series, url)
    got = rx.result()
    assert summary["sent"] == series.counts == {"dark": 1, "flat": 1, "data": 91}
    assert len(got) == len(series) + 1 and got[-1].kind == "end" and got[-1].seq == 93
    for sent, received in zip(series, got, strict=False):
        assert (received.seq, received.kind) == (sent.seq, sent.kind)
        assert received.image.dtype == sent.image.dtype  # float32 references, uint16 data
        np.testing.assert_array_equal(received.image, sent.image)
        assert received.attrs["source_file"] == sent.attrs["source_file"]


def test_fps_pacing_stamps_send_times_and_keeps_recorded_ones():
    url = free_url()
    frames = make_frames(n_data=6)  # 8 frames
    fps = 40.0
    rx = Receiver(url)
    before_ns = time.time_ns()
    summary = replay(frames, url, fps=fps)
    got = rx.result()[:-1]
    # 8 frames at 40 fps span 7/40 = 0.175 s; it must not finish impossibly early
    assert summary["duration_s"] >= 0.9 * 7 / fps
    assert rx.arrival_s[7] - rx.arrival_s[0] >= 0.5 * 7 / fps  # receiver side: looser
    assert 0 < summary["fps"] <= fps * 1.1
    assert [f.attrs["recorded_t_ns"] for f in got] == [f.t_ns for f in frames]
    stamped = [f.t_ns for f in got]
    assert stamped[0] >= before_ns and stamped == sorted(stamped)
    assert stamped[-1] - stamped[0] >= 0.9 * 7 / fps * 1e9


def test_realtime_pacing_follows_recorded_spacing():
    url = free_url()
    frames = make_frames(n_data=5, period_ns=40_000_000)  # data frames 40 ms apart
    rx = Receiver(url)
    summary = replay(frames, url, realtime=True)
    rx.result()
    # 4 gaps of 40 ms between data frames (none across the dark→flat→data kind changes)
    assert summary["duration_s"] >= 0.9 * 4 * 0.040
    assert rx.arrival_s[6] - rx.arrival_s[2] >= 0.5 * 4 * 0.040  # receiver side: looser


def test_realtime_loop_waits_one_data_spacing_at_the_wrap():
    url = free_url()
    frames = make_frames(n_data=2, period_ns=30_000_000)  # dark, flat, 2 data 30 ms apart
    stop = threading.Event()
    rx = Receiver(url, stop_after=8, stop=stop)
    summary = replay(frames, url, realtime=True, loop=True, stop=stop)
    got = rx.result()[:-1]
    assert [f.kind for f in got[:2]] == ["dark", "flat"] and len(got) >= 8
    # data frames 2..7 follow each other 30 ms apart, the wraps included: 5 gaps
    assert summary["duration_s"] >= 0.9 * 5 * 0.030
    assert [f.attrs["recorded_t_ns"] for f in got[2:8]] == [frames[2].t_ns, frames[3].t_ns] * 3


def test_loop_repeats_data_only_with_increasing_seq_until_stopped():
    url = free_url()
    frames = make_frames(n_data=3)  # dark, flat, 3 data
    stop = threading.Event()
    rx = Receiver(url, stop_after=12, stop=stop)
    summary = replay(frames, url, loop=True, fps=500.0, stop=stop)
    got = rx.result()
    assert got[-1].kind == "end" and summary["stopped"] and summary["end_sent"]
    body = got[:-1]
    assert len(body) >= 12 and summary["frames"] == len(body)
    assert [f.kind for f in body[:2]] == ["dark", "flat"]
    assert all(f.kind == "data" for f in body[2:])  # references go only once
    seqs = [f.seq for f in got]
    assert seqs == list(range(len(got)))  # seq keeps increasing across passes
    data_sources = frames[2:]
    for k, f in enumerate(body[2:]):
        np.testing.assert_array_equal(f.image, data_sources[k % 3].image)
    assert summary["passes"] >= 4
    assert summary["sent"]["dark"] == 1 and summary["sent"]["flat"] == 1


def test_stop_without_receiver_returns_promptly():
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    t0 = time.monotonic()
    summary = replay(make_frames(), free_url(), stop=stop, linger_s=0.2)
    assert time.monotonic() - t0 < 5
    assert summary["frames"] == 0 and summary["stopped"] and not summary["end_sent"]


def test_send_end_false_sends_no_end_frame():
    url = free_url()
    rx = Receiver(url, timeout_s=1.0)
    summary = replay(make_frames(n_data=2), url, send_end=False)
    got = rx.result()
    assert [f.kind for f in got] == ["dark", "flat", "data", "data"]
    assert not summary["end_sent"]


@pytest.mark.parametrize("kwargs, message", [
    ({"fps": 10.0, "realtime": True}, "not both"),
    ({"fps": 0.0}, "positive"),
    ({"fps": float("nan")}, "positive"),
    ({"hwm": 0}, "hwm"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        replay(make_frames(), free_url(), **kwargs)


def test_loop_refuses_a_one_shot_iterator():
    with pytest.raises(ValueError, match="re-iterable"):
        replay(iter(make_frames()), free_url(), loop=True)


def test_end_frame_in_the_input_is_refused():
    with pytest.raises(ValueError, match="'end' frame"):
        replay([end_frame(0)], free_url(), linger_s=0.1)


def test_bind_conflict_is_a_clear_error():
    url = free_url()
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.bind(url)
    try:
        with pytest.raises(OSError, match="cannot bind"):
            replay(make_frames(), url)
    finally:
        sock.close(linger=0)
