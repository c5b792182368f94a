"""The pipeline's PV server over real Channel Access (caproto server, pyepics client, loopback,
a free port and a unique prefix per test)."""

from __future__ import annotations

import math
import queue
import threading
import time
import uuid

import epics
import pytest

from hw.epics_env import configure_ca_client, free_ca_port
from hw.pvserver import PvCommand, PvServer, result_values, status_values

pytestmark = pytest.mark.timeout(60)


def _result(seq: int, **metrics: float | None) -> dict:
    base = {"resolution_nm": 21.5, "cutoff_per_um": 23.25, "band_power": 0.125,
            "centroid_x_px": -3.5, "centroid_y_px": 4.0, "uniformity_cv": 0.0625,
            "vibration_nm": 7.5}
    base.update(metrics)
    return {"seq": seq, "metrics": base,
            "counters": {"received": seq + 3, "processed": seq + 1, "dropped": 2,
                         "rejected_total": 1, "gaps": 4, "queue_depth": 0}}


def _get(name: str):
    return epics.caget(name, use_monitor=False, timeout=5)


def _wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.fixture
def server():
    srv = PvServer(f"T{uuid.uuid4().hex[:8]}:LIVE:", free_ca_port(), max_rate_hz=50.0,
                   command_queue_size=4)
    srv.start()
    configure_ca_client([srv.port], reset=True)
    yield srv
    srv.stop()


def test_result_values_maps_metrics_counters_and_missing_metrics():
    values = result_values(_result(9, band_power=None, vibration_nm=float("nan")))
    assert values["SEQ"] == 9
    assert values["RESOLUTION_NM"] == 21.5 and values["BEAM:X_PX"] == -3.5
    assert values["BAND_POWER"] is None and values["VIBRATION_NM"] is None
    assert values["RECEIVED"] == 12 and values["REJECTED"] == 1 and values["GAPS"] == 4
    bare = result_values({"seq": 1, "metrics": {}})
    assert bare["RESOLUTION_NM"] is None and "RECEIVED" not in bare
    status = status_values({"fps": 10.0, "fps_now": 12.0, "latency_ms": {"p99": None}})
    assert status == {"FPS": 12.0, "LATENCY_P99_MS": None}
    with pytest.raises(TypeError):
        result_values([1, 2])


def test_server_shows_the_newest_result_after_update(server):
    server.update(_result(41))
    server.update(_result(42))
    server.update_status({"fps": 25.0, "latency_ms": {"p50": 2.0, "p99": 6.5}})
    p = server.prefix
    assert _wait_for(lambda: _get(p + "SEQ") == 42)
    assert _get(p + "RESOLUTION_NM") == 21.5
    assert _get(p + "CUTOFF_PER_UM") == 23.25
    assert _get(p + "BAND_POWER") == 0.125
    assert _get(p + "BEAM:X_PX") == -3.5
    assert _get(p + "BEAM:Y_PX") == 4.0
    assert _get(p + "UNIFORMITY_CV") == 0.0625
    assert _get(p + "VIBRATION_NM") == 7.5
    assert [_get(p + s) for s in ("RECEIVED", "PROCESSED", "DROPPED", "REJECTED", "GAPS")] == \
        [45, 43, 2, 1, 4]
    # the status may have been handed over just after the publication of the Result
    assert _wait_for(lambda: _get(p + "FPS") == 25.0)
    assert _get(p + "LATENCY_P99_MS") == 6.5
    assert epics.get_pv(p + "RESOLUTION_NM", form="ctrl").get_ctrlvars()["units"] == "nm"


def test_missing_metric_reads_nan_with_invalid_severity_and_recovers(server):
    p = server.prefix
    server.update(_result(1, band_power=None))
    assert _wait_for(lambda: _get(p + "SEQ") == 1)
    band = epics.get_pv(p + "BAND_POWER", form="time")
    assert math.isnan(band.get(use_monitor=False))
    assert band.severity == 3  # INVALID
    resolution = epics.get_pv(p + "RESOLUTION_NM", form="time")
    assert resolution.get(use_monitor=False) == 21.5 and resolution.severity == 0
    server.update(_result(2, band_power=0.5))
    assert _wait_for(lambda: _get(p + "SEQ") == 2)
    assert band.get(use_monitor=False) == 0.5 and band.severity == 0


def test_updates_are_keep_latest_and_rate_limited(server):
    def hot_path():
        for seq in range(1, 2001):
            server.update(_result(seq))

    before = server.group.published
    thread = threading.Thread(target=hot_path)
    thread.start()
    thread.join()
    assert _wait_for(lambda: _get(server.prefix + "SEQ") == 2000)
    # 2000 results handed over in a burst become a few publications, the last one newest
    assert server.group.published - before < 50
    with pytest.raises(TypeError):
        server.update("not a result")


def test_af_start_put_lands_in_the_command_queue(server):
    p = server.prefix
    t_ns = time.time_ns()
    assert epics.caput(p + "AF:START", 1, wait=True, timeout=5) == 1
    command = server.commands.get(timeout=2)
    assert isinstance(command, PvCommand)
    assert command.name == "af_start" and command.value is True and command.t_ns >= t_ns
    assert _get(p + "AF:START") == 0  # a trigger reads 0 again
    assert epics.caput(p + "AF:START", 0, wait=True, timeout=5) == 1
    assert server.commands.empty()  # putting 0 triggers nothing
    assert epics.caput(p + "AF:ABORT", 1, wait=True, timeout=5) == 1
    assert epics.caput(p + "SHAKER:TUNE", 1, wait=True, timeout=5) == 1
    assert [server.commands.get(timeout=2).name for _ in range(2)] == ["af_abort",
                                                                       "shaker_tune"]


def test_beam_feedback_controls_become_commands_and_readable_state(server):
    p = server.prefix
    assert epics.caput(p + "BEAMFB:ENABLE", "On", wait=True, timeout=5) == 1
    assert epics.caput(p + "BEAMFB:SETPOINT_X_PX", 12.5, wait=True, timeout=5) == 1
    assert epics.caput(p + "BEAMFB:SETPOINT_Y_PX", -3.0, wait=True, timeout=5) == 1
    commands = [server.commands.get(timeout=2) for _ in range(3)]
    assert [(c.name, c.value) for c in commands] == [
        ("beamfb_enable", True), ("beamfb_setpoint_x_px", 12.5),
        ("beamfb_setpoint_y_px", -3.0)]
    assert server.controls() == {"beamfb_enable": True, "beamfb_setpoint_x_px": 12.5,
                                 "beamfb_setpoint_y_px": -3.0}
    # the feedback side switches its own loop off: no command, the PV follows
    server.set_state(beamfb_enable=False, beamfb_state="paused: beam loss")
    assert _wait_for(lambda: _get(p + "BEAMFB:ENABLE") == 0)
    assert _wait_for(lambda: _get(p + "BEAMFB:STATE") == "paused: beam loss")
    assert server.commands.empty() and server.controls()["beamfb_enable"] is False


def test_feedback_state_is_published_and_read_only_for_clients(server):
    p = server.prefix
    server.set_state(af_state="running", af_verdict="resolved", af_best_z_um=12.25,
                     beamfb_error_px=0.75, shaker_verdict="flat")
    # one keep-latest flush writes them one after the other: wait for each
    assert _wait_for(lambda: _get(p + "AF:STATE") == "running")
    assert _wait_for(lambda: _get(p + "AF:VERDICT") == "resolved")
    assert _wait_for(lambda: _get(p + "AF:BEST_Z_UM") == 12.25)
    assert _wait_for(lambda: _get(p + "BEAMFB:ERROR_PX") == 0.75)
    assert _wait_for(lambda: _get(p + "SHAKER:VERDICT") == "flat")
    with pytest.raises(epics.ca.CASeverityException, match="Write access denied"):
        epics.caput(p + "AF:STATE", "hacked", wait=True, timeout=2)
    # any coroutine can also be run on the server's loop from another thread
    server.server.submit(server.group.af_state.write("done")).result(timeout=2)
    assert _get(p + "AF:STATE") == "done"
    with pytest.raises(KeyError, match="unknown state keys"):
        server.set_state(af_start=1)
    with pytest.raises(ValueError, match="longer than a CA string"):
        server.set_state(af_verdict="x" * 40)


def test_a_full_command_queue_fails_the_put_instead_of_dropping_it(server):
    p = server.prefix
    for _ in range(4):
        assert epics.caput(p + "AF:START", 1, wait=True, timeout=5) == 1
    assert server.commands.full()
    # pyepics does not report a failed put (it ignores the completion status); the record
    # goes into a MAJOR/WRITE alarm instead, and the command is not queued
    epics.caput(p + "AF:START", 1, wait=True, timeout=5)
    trigger = epics.get_pv(p + "AF:START", form="time")
    assert _wait_for(lambda: trigger.get(use_monitor=False) is not None
                     and trigger.severity == 2)
    assert server.commands.qsize() == 4
    drained = [server.commands.get_nowait() for _ in range(4)]
    assert all(c.name == "af_start" for c in drained)
    with pytest.raises(queue.Empty):
        server.commands.get_nowait()
    assert epics.caput(p + "AF:START", 1, wait=True, timeout=5) == 1
    assert server.commands.get(timeout=2).name == "af_start"
    trigger.get(use_monitor=False)
    assert trigger.severity == 0
    # other records keep their own alarm state
    abort = epics.get_pv(p + "AF:ABORT", form="time")
    assert abort.get(use_monitor=False) == 0 and abort.severity == 0
