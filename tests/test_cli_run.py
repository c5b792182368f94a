"""`txmlive run` as a real process on loopback: every valid frame processed, every bad one
counted by reason, results published per frame, processed frames recorded."""

from __future__ import annotations

import json
import subprocess
import time

import numpy as np
import pytest
import zmq

from hw.epics_env import free_ca_port
from stream.frame import Frame, end_frame
from stream.publish import decode_message
from stream.wire import encode
from tests.procs import spawn_cli
from txmlive.ports import free_tcp_url

N_DATA = 1000
SHAPE = (64, 64)


def _start_run(*extra: str) -> tuple[subprocess.Popen, dict[str, str]]:
    urls = {"frames": free_tcp_url(), "results": free_tcp_url(), "preview": free_tcp_url()}
    proc = spawn_cli(["run", "--connect", urls["frames"], "--results", urls["results"],
                      "--preview", urls["preview"], "--json", "--ca-port", str(free_ca_port()),
                      "--pv-prefix", f"TEST{free_ca_port()}:", *extra], ready="ready")
    return proc, urls


def _series(rng: np.random.Generator) -> list[Frame]:
    frames = []
    for seq in range(N_DATA + 4):
        kind = "dark" if seq < 2 else "flat" if seq < 4 else "data"
        base = {"dark": 100, "flat": 4000, "data": 2000}[kind]
        image = (base + rng.integers(0, 50, SHAPE)).astype(np.uint16)
        frames.append(Frame(seq=seq, t_ns=time.time_ns(), kind=kind, image=image,
                            exposure_s=0.01, energy_ev=8000.0, positions={"zp_z_um": 1.5},
                            attrs={"pixel_nm": 10.0}))
    return frames


@pytest.mark.timeout(180)
def test_run_1000_frames_with_malformed_messages(tmp_path):
    record = tmp_path / "processed.h5"
    proc, urls = _start_run("--record", str(record))
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.connect(urls["results"])
    preview = ctx.socket(zmq.SUB)
    preview.setsockopt(zmq.SUBSCRIBE, b"")
    preview.setsockopt(zmq.CONFLATE, 1)
    preview.connect(urls["preview"])
    push = ctx.socket(zmq.PUSH)
    push.bind(urls["frames"])
    time.sleep(0.5)  # the SUB subscription reaches the PUB
    bad = {"parts": 0, "msgpack": 0, "version": 0, "payload_mismatch": 0}
    for i, frame in enumerate(_series(np.random.default_rng(0))):
        frame.t_ns = time.time_ns()
        push.send_multipart(encode(frame), copy=False)
        if i % 10 == 0:
            push.send_multipart([b"\xc1\xc1", b""])
            bad["msgpack"] += 1
        if i % 25 == 0:
            push.send(b"single part")
            bad["parts"] += 1
        if i % 50 == 0:
            header, payload = encode(frame)
            push.send_multipart([header, bytes(payload)[:-2]])
            bad["payload_mismatch"] += 1
            push.send_multipart([header.replace(b"\xa1v\x01", b"\xa1v\x07"), payload])
            bad["version"] += 1
    push.send_multipart(encode(end_frame(N_DATA + 4)))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    summary = json.loads(out)
    c = summary["counters"]
    assert summary["frames"] == N_DATA
    assert c["rejected"] == bad and c["dropped"] == 0 and c["gaps"] == 0
    assert c["uncorrected"] == 0 and c["received"] == N_DATA + 5  # + the end frame
    assert summary["latency_ms"]["p50"] > 0
    seqs, kinds = [], []
    while sub.poll(1000):
        result = decode_message(sub.recv(), "result")
        kinds.append(result["kind"])
        if result["kind"] != "data":
            continue
        seqs.append(result["seq"])
        assert result["corrected"] and set(result["stamps"]) >= {
            "recv", "dequeue", "correct", "metrics", "publish"}
    assert seqs == list(range(4, N_DATA + 4))
    assert kinds[:4] == ["dark", "dark", "flat", "flat"]
    assert preview.poll(1000), "no preview arrived"
    message = decode_message(preview.recv(), "preview")
    assert message["shape"] == [16, 16] and message["bin"] == 4 and message["pixel_nm"] == 40
    assert len(message["image"]) == 16 * 16 * 4
    assert message["metrics"]["metrics_roi"] == [0, 0, 64, 64]
    assert len(message["metrics"]["psd"]) == len(message["metrics"]["psd_freqs_per_um"]) > 10
    for sock in (sub, preview, push):
        sock.close(linger=0)

    from stream.readers import open_series

    series = open_series(record)
    assert series.counts["data"] == N_DATA and series.counts["dark"] >= 1
    frames = list(series)
    data = [f for f in frames if f.kind == "data"]
    assert data[0].image.dtype == np.float32
    assert 0.3 < float(np.nanmean(data[0].image)) < 0.7  # ~ (2025 - 125) / (4025 - 125)


@pytest.mark.timeout(120)
def test_run_exits_cleanly_on_sigterm():
    proc, _ = _start_run()
    proc.terminate()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert json.loads(out)["frames"] == 0
