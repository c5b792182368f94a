"""`txmlive sim` and `txmlive run` as real processes on loopback, driven over EPICS (pyepics):
references taken through the IOC, metrics and counters on the PV server tracking the stream,
defocus lowering the measured cut-off."""

from __future__ import annotations

import time

import epics
import pytest

from hw.epics_env import configure_ca_client, free_ca_port
from tests.procs import spawn_cli
from txmlive.ports import free_tcp_url

pytestmark = pytest.mark.timeout(240)


def _wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def beamline():
    sim_port, live_port = free_ca_port(), free_ca_port()
    sim_prefix, live_prefix = f"S{sim_port}:", f"L{live_port}:"
    frames = free_tcp_url()
    sim = spawn_cli(["sim", "--size", "256", "--fps", "20", "--ca-port", str(sim_port),
                     "--prefix", sim_prefix, "--bind", frames, "--vibration-nm", "0",
                     "--beam-drift-px-per-s", "0"], ready="Listening")
    run = spawn_cli(["run", "--connect", frames, "--results", free_tcp_url(), "--preview",
                     free_tcp_url(), "--ca-port", str(live_port), "--pv-prefix", live_prefix],
                    ready="ready")
    configure_ca_client([sim_port, live_port], reset=True)
    try:
        yield sim_prefix, live_prefix
    finally:
        for proc in (run, sim):
            proc.terminate()
        codes = [proc.wait(30) for proc in (run, sim)]
        epics.ca.clear_cache()
        assert codes == [0, 0]


def _get(name: str) -> float | None:
    return epics.caget(name, use_monitor=False, timeout=5)


def _take_references(sim: str, live: str) -> None:
    for frame_type in ("Background", "FlatField"):
        start = _get(live + "RECEIVED")
        assert epics.caput(sim + "CAM:FrameType", frame_type, wait=True, timeout=5) == 1
        _wait_for(lambda s=start: _get(live + "RECEIVED") >= s + 12, what=frame_type)
    assert epics.caput(sim + "CAM:FrameType", "Normal", wait=True, timeout=5) == 1


def _settled_cutoff(live: str, frames: int = 6) -> float:
    """Median cut-off of the next few processed frames (after the motor came to rest)."""
    values, last_seq = [], _get(live + "SEQ")
    while len(values) < frames:
        seq = _wait_for(lambda last=last_seq: (s := _get(live + "SEQ")) > last and s,
                        what="new SEQ")
        last_seq = seq
        values.append(_get(live + "CUTOFF_PER_UM"))
    values.sort()
    return values[len(values) // 2]


def test_sim_and_run_over_epics(beamline):
    sim, live = beamline
    _wait_for(lambda: (_get(live + "RECEIVED") or 0) > 0, 60, "frames at the pipeline")
    _take_references(sim, live)
    _wait_for(lambda: (_get(live + "PROCESSED") or 0) > 5, what="processed frames")
    assert _get(live + "DROPPED") == 0 and _get(live + "REJECTED") == 0
    in_focus = _settled_cutoff(live)
    assert 15 < in_focus < 50  # a well-focused 25 nm zone plate, 10 nm pixels
    zp = epics.Motor(sim + "ZP:Z")
    truth = _get(sim + "TRUTH:FOCUS_Z_UM")
    assert abs(zp.get("RBV") - truth) < 1.0
    zp.move(truth + 25.0, wait=True, timeout=30)  # ~3 DOF out of focus
    time.sleep(0.3)  # frames exposed during the move are still in flight
    defocused = _settled_cutoff(live)
    assert defocused < 0.8 * in_focus, (in_focus, defocused)
    processed = _get(live + "PROCESSED")
    _wait_for(lambda: _get(live + "PROCESSED") > processed + 5, what="the counters to track")
