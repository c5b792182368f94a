"""The executor, the results buffer and the feedback runtime, against in-process fakes.

A :class:`FakeCamera` thread plays detector + pipeline: every few ms it "exposes" a frame,
reads the fake actuators at exposure start and end (``positions``, ``moving``), and pushes a
Result with synthetic metrics into the executor's :class:`ResultBuffer`. Procedures are the
real ones or small hand-written generators that probe one rule each.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feedback.autofocus import AutofocusConfig, autofocus
from feedback.beam import BeamConfig, CalibrationConfig, ResponseMatrix, SetpointTable
from feedback.commands import Aborted, Acquire, Done, Log, Move, MoveDone, Read, Verdict
from feedback.executor import (
    PUT_KINDS,
    Executor,
    LazyActuators,
    RoleSettings,
    build_guard,
    role_limits,
)
from feedback.optics import ZonePlate
from feedback.results import ResultBuffer
from feedback.runtime import FeedbackRuntime, LoopSettings, ca_string
from feedback.safety import STOP_ERRORS, Guard, MoveRefused, RoleLimits
from hw.actuators import FakeActuator

pytestmark = pytest.mark.timeout(60)

ROLE = "zp_z_um"
DOF_UM = ZonePlate().dof_um(8000.0)


class FakeCamera:
    """Frames every ``period_s`` (exposure = period); each Result goes to ``push``."""

    def __init__(self, push: Callable[[dict[str, Any]], None],
                 actuators: dict[str, FakeActuator],
                 metrics: Callable[[dict[str, float], float], dict[str, Any]],
                 period_s: float = 0.004) -> None:
        self.push, self.actuators, self.metrics = push, actuators, metrics
        self.period_s = period_s
        self.kind = "data"
        self.kinds_set: list[str] = []
        self.seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def set_kind(self, kind: str) -> None:
        self.kinds_set.append(kind)
        self.kind = kind

    def _snapshot(self) -> tuple[dict[str, float], bool]:
        positions, moving = {}, False
        for role, actuator in self.actuators.items():
            try:
                positions[role] = actuator.position
            except ConnectionError:  # a frame of a disconnected motor has no position
                continue
            moving = moving or actuator.moving
        return positions, moving

    def _run(self) -> None:
        t_start = time.monotonic()
        while not self._stop.is_set():
            t_ns, kind = time.time_ns(), self.kind
            start, moving0 = self._snapshot()
            self._stop.wait(self.period_s)
            end, moving1 = self._snapshot()
            self.seq += 1
            self.push({
                "seq": self.seq, "t_ns": t_ns, "kind": kind, "positions": start,
                "moving": moving0 or moving1 or start != end, "energy_ev": 8000.0,
                "exposure_s": self.period_s, "pixel_nm": 10.0, "metrics_seq": self.seq,
                "metrics": self.metrics(start, time.monotonic() - t_start)})

    def __enter__(self) -> FakeCamera:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)


def flat_metrics(_positions: dict[str, float], _t: float) -> dict[str, Any]:
    return {"mean_counts": 1000.0, "band_power": 1.0, "psd_verdict": "ok"}


def zp(position: float = 0.0, velocity: float | None = 2000.0) -> FakeActuator:
    return FakeActuator(ROLE, "um", (-500.0, 500.0), position, velocity)


def zp_guard(max_step: float = 200.0, tolerance: float = 1e-9) -> Guard:
    return Guard({ROLE: RoleLimits(-100.0, 100.0, max_step, tolerance)})


def make_executor(actuators: dict[str, FakeActuator], **kw: Any) -> tuple[Executor, ResultBuffer]:
    buffer = ResultBuffer()
    return Executor(actuators, buffer, acquire_timeout_s=2.0, stale_after_s=0.5, **kw), buffer


def puts(executor: Executor) -> list:
    return [a for a in executor.actions if a.kind in PUT_KINDS]


def moves_then(*steps: Any, verdict: Verdict = Verdict.RESOLVED, catch: bool = True):
    """A procedure: each step is a target (Move, rollback 0), "acquire" or "read"; then Done.

    With ``catch`` a stop error ends it ``aborted`` (as the real procedures do)."""
    try:
        for step in steps:
            if step == "acquire":
                yield Acquire(1, keys=("band_power",))
            elif step == "read":
                yield Read(ROLE)
            else:
                yield Move(ROLE, step, "test", {"score": 1.0}, 0.0)
    except STOP_ERRORS as exc:
        if not catch:
            raise
        done = Done(Verdict.ABORTED, f"{type(exc).__name__}: {exc}")
        yield done
        return done
    done = Done(verdict, "test done", {"verdict": str(verdict)})
    yield done
    return done


# -------------------------------------------------------------------------------- guard


def test_every_move_is_checked_and_a_refused_one_is_logged_not_put():
    actuator = zp()
    executor, _ = make_executor({ROLE: actuator})
    guard = zp_guard(max_step=10.0)
    report = executor.run(moves_then(5.0, 150.0), guard, name="test")
    assert report.verdict == Verdict.ABORTED and "outside the soft limits" in report.done.reason
    assert actuator.moves == [5.0]
    refused = [a for a in report.actions if a.kind == "refused"]
    assert len(refused) == 1 and refused[0].target == 150.0 and refused[0].position == 5.0
    report = executor.run(moves_then(20.0), guard, name="test")
    assert "exceeds the maximum step" in report.done.reason and actuator.moves == [5.0]
    assert guard.refusals and all(isinstance(r, MoveRefused) for r in guard.refusals)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.floats(-300, 300), st.just(math.nan), st.just(math.inf)),
                min_size=1, max_size=12))
def test_property_no_put_outside_limits_or_above_max_step(targets):
    actuator = zp(velocity=None)
    executor, _ = make_executor({ROLE: actuator})
    guard = zp_guard(max_step=30.0)

    def wild():  # ignores refusals and keeps asking
        for target in targets:
            try:
                yield Move(ROLE, target, "random", {}, 0.0)
            except MoveRefused:
                pass
        yield Done(Verdict.RESOLVED, "done")

    executor.run(wild(), guard, name="random")
    previous = 0.0
    for target in actuator.moves:
        assert -100.0 <= target <= 100.0 and abs(target - previous) <= 30.0 * (1 + 1e-9)
        previous = target


def test_role_limits_narrow_the_record_and_refuse_nonsense():
    settings = RoleSettings({ROLE: 50.0}, {ROLE: 0.1}, {ROLE: (-10.0, 10.0)})
    assert role_limits(ROLE, (-500.0, 500.0), settings) == RoleLimits(-10.0, 10.0, 50.0, 0.1)
    with pytest.raises(ValueError, match="beyond the motor's own"):
        role_limits(ROLE, (-5.0, 5.0), settings)
    with pytest.raises(ValueError, match="no soft limits"):
        role_limits(ROLE, (0.0, 0.0), RoleSettings({ROLE: 1.0}))
    with pytest.raises(ValueError, match="no maximum step"):
        role_limits(ROLE, (-1.0, 1.0), RoleSettings({}))
    with pytest.raises(ConnectionError, match="no motor configured"):
        build_guard({}, [ROLE], settings)


def test_lazy_actuators_connect_once_and_retry_after_a_failure():
    calls = []

    def factory(role: str) -> FakeActuator:
        calls.append(role)
        if len(calls) == 1:
            raise ConnectionError("not yet")
        return zp()

    actuators = LazyActuators(factory, [ROLE])
    with pytest.raises(ConnectionError):
        actuators[ROLE]
    assert actuators[ROLE] is actuators[ROLE] and calls == [ROLE, ROLE]
    assert list(actuators) == [ROLE] and set(actuators.connected()) == {ROLE}
    with pytest.raises(KeyError):
        actuators["beam_x"]


# -------------------------------------------------------------------------------- frames


def test_acquire_returns_only_frames_after_the_move_finished_at_the_target():
    actuator = zp(velocity=100.0)  # 0.2 s for 20 µm: many frames taken while moving
    executor, buffer = make_executor({ROLE: actuator})
    seen: list = []

    def procedure():
        done = yield Move(ROLE, 20.0, "test", {}, 0.0)
        results = yield Acquire(5, keys=("band_power",))
        seen.append((done, results))
        results = yield Acquire(3, keys=("band_power",))
        seen.append((done, results))
        yield Done(Verdict.RESOLVED, "ok")

    with FakeCamera(buffer.push, {ROLE: actuator}, flat_metrics):
        report = executor.run(procedure(), zp_guard(), name="test")
    assert report.verdict == Verdict.RESOLVED
    (done, first), (_, second) = seen
    assert isinstance(done, MoveDone) and done.position == 20.0
    assert [r["seq"] for r in first + second] == sorted({r["seq"] for r in first + second})
    for result in first + second:
        assert result["t_ns"] > done.t_done_ns and not result["moving"]
        assert result["positions"][ROLE] == 20.0
    assert len(first) == 5 and len(second) == 3
    assert [a.kind for a in report.actions] == ["move", "acquire", "acquire", "done"]
    move = report.actions[0]
    assert (move.position, move.target, move.rollback) == (0.0, 20.0, 0.0)
    assert move.data["t_done_ns"] == done.t_done_ns and move.metrics == {}


def test_buffer_never_reuses_side_thread_metrics_and_checks_kind_and_time():
    buffer = ResultBuffer()
    for seq, metrics_seq in ((1, 1), (2, 1), (3, 3)):
        buffer.push({"seq": seq, "t_ns": 10 + seq, "moving": False, "positions": {},
                     "metrics_seq": metrics_seq, "metrics": {"band_power": 1.0}})
    taken = buffer.acquire(1, keys=("band_power",), timeout_s=0.2)
    assert [r["seq"] for r in taken] == [1]
    taken = buffer.acquire(1, keys=("band_power",), timeout_s=0.2)
    assert [r["seq"] for r in taken] == [3]  # frame 2 carried frame 1's metrics again
    buffer.push({"seq": 4, "t_ns": 14, "kind": "flat", "moving": False, "positions": {}})
    buffer.push({"seq": 5, "t_ns": 15, "kind": "data", "moving": False, "positions": {}})
    with pytest.raises(TimeoutError, match="0 of 1 usable data frame.*acquired before"):
        buffer.acquire(1, not_before_ns=100, timeout_s=0.2)
    buffer.push({"seq": 6, "t_ns": 16, "kind": "flat", "moving": False, "positions": {}})
    assert buffer.acquire(1, kind="flat", timeout_s=0.2)[0]["seq"] == 6


def test_a_silent_stream_is_stale_and_ends_the_procedure_aborted():
    actuator = zp()
    executor, buffer = make_executor({ROLE: actuator})
    with FakeCamera(buffer.push, {ROLE: actuator}, flat_metrics):
        time.sleep(0.05)
    t0 = time.monotonic()
    report = executor.run(moves_then(1.0, "acquire"), zp_guard(), name="test")
    assert report.verdict == Verdict.ABORTED and "stale results stream" in report.done.reason
    assert time.monotonic() - t0 < 1.5  # stale after 0.5 s, well before the 2 s timeout


def test_flat_frames_switch_the_camera_and_back():
    actuator = zp()
    executor, buffer = make_executor({ROLE: actuator})
    with FakeCamera(buffer.push, {ROLE: actuator}, flat_metrics) as camera:
        executor.camera = camera

        def procedure():
            flats = yield Acquire(2, kind="flat", after_move=False, keys=("uniformity_cv",))
            data = yield Acquire(1, after_move=False)
            yield Done(Verdict.RESOLVED, "ok", {"kinds": [r["kind"] for r in flats + data]})

        report = executor.run(procedure(), zp_guard(), name="flats")
    assert report.done.result["kinds"] == ["flat", "flat", "data"]
    assert camera.kinds_set == ["flat", "data"] and camera.kind == "data"
    executor.camera = None
    report = executor.run(procedure(), zp_guard(), name="flats")
    assert report.verdict == Verdict.ABORTED
    assert "no camera frame-type control" in report.done.reason


# -------------------------------------------------------------------------------- dry run


def test_dry_run_puts_nothing_and_stops_at_the_first_frame_after_a_move():
    actuator = zp()
    executor, buffer = make_executor({ROLE: actuator}, dry_run=True)
    with FakeCamera(buffer.push, {ROLE: actuator}, flat_metrics):
        report = executor.run(moves_then(5.0, 10.0, "acquire", 15.0), zp_guard(), name="dry")
    assert actuator.moves == [] and actuator.position == 0.0
    assert [a.kind for a in report.actions] == ["dry-run", "dry-run", "done"]
    assert [a.target for a in report.actions[:2]] == [5.0, 10.0]
    assert report.verdict == Verdict.ABORTED and "dry run" in report.done.reason
    assert report.as_dict()["dry_run"] is True and not puts(executor)


# -------------------------------------------------------------------------------- abort, faults


def test_abort_stops_motion_at_once_and_nothing_is_put_afterwards():
    actuator = zp(velocity=20.0)  # 50 µm takes 2.5 s
    executor, _ = make_executor({ROLE: actuator})
    threading.Timer(0.3, executor.abort, args=("operator abort (test)",)).start()
    t0 = time.monotonic()
    # catch=False: the procedure ignores the abort and asks for another move
    def stubborn():
        for target in (50.0, 60.0):
            try:
                yield Move(ROLE, target, "test", {}, 0.0)
            except Aborted:
                pass
        yield Done(Verdict.ABORTED, "aborted by the operator")

    report = executor.run(stubborn(), zp_guard(), name="abort")
    assert time.monotonic() - t0 < 1.0
    assert actuator.moves == [50.0]  # the second move was never put
    assert 2.0 < actuator.position < 20.0 and not actuator.moving
    kinds = [a.kind for a in report.actions]
    assert kinds == ["failed", "stop", "done"]
    assert report.rolled_back == {}  # aborted: nothing more is put, not even a rollback
    assert executor.running is None and not executor.abort("late")


class DisconnectingActuator(FakeActuator):
    """Loses its IOC after ``after`` moves: every access then fails."""

    def __init__(self, after: int, **kw: Any) -> None:
        super().__init__(ROLE, "um", (-500.0, 500.0), 0.0, 2000.0, **kw)
        self.after = after

    @property
    def position(self) -> float:
        if len(self.moves) > self.after:
            raise ConnectionError("zp_z_um: no value (disconnected?)")
        return super().position


def test_an_ioc_disconnect_mid_procedure_aborts_with_no_further_puts():
    actuator = DisconnectingActuator(after=2)
    executor, buffer = make_executor({ROLE: actuator})
    with FakeCamera(buffer.push, {ROLE: actuator}, flat_metrics):
        report = executor.run(moves_then(1.0, "acquire", 2.0, "acquire", 3.0, "acquire", 4.0),
                              zp_guard(), name="fault")
    assert report.verdict == Verdict.ABORTED and "disconnected" in report.done.reason
    assert actuator.moves == [1.0, 2.0, 3.0]
    failed = [a for a in report.actions if a.kind == "failed"]
    assert len(failed) == 1 and failed[0].target == 3.0
    assert all(a.kind not in PUT_KINDS or a.t_ns <= failed[0].t_ns for a in report.actions)


# -------------------------------------------------------------------------------- rollback


@pytest.mark.parametrize("verdict, rolled", [
    (Verdict.AMBIGUOUS, True), (Verdict.RAILED, True), (Verdict.FLAT, True),
    (Verdict.RESOLVED, False), (Verdict.ABORTED, False)])
def test_rollback_after_a_verdict_that_rejects_the_result(verdict, rolled):
    actuator = zp(position=0.0)
    executor, _ = make_executor({ROLE: actuator})
    report = executor.run(moves_then(8.0, 16.0, verdict=verdict), zp_guard(max_step=10.0),
                          name="rollback")
    if rolled:
        assert actuator.position == 0.0 and report.rolled_back == {ROLE: 0.0}
        back = [a for a in report.actions if a.kind == "rollback"]
        assert [a.target for a in back] == [8.0, 0.0]  # in steps of at most the maximum
    else:
        assert actuator.position == 16.0 and report.rolled_back == {}
    report = executor.run(moves_then(10.0, verdict=verdict), zp_guard(), name="no rollback",
                          rollback_verdicts=())
    assert report.rolled_back == {}


# -------------------------------------------------------------------------------- real procedure


def test_autofocus_through_the_executor_finds_the_peak_within_a_tenth_of_the_dof():
    rng = np.random.default_rng(3)
    true_z = 7.0

    def metrics(positions: dict[str, float], _t: float) -> dict[str, Any]:
        z = positions[ROLE]
        score = 0.05 + math.exp(-0.5 * ((z - true_z) / DOF_UM) ** 2) + rng.normal(0, 0.01)
        return {"band_power": score, "mean_counts": 1000.0, "psd_verdict": "ok"}

    actuator = zp(position=0.0)
    executor, buffer = make_executor({ROLE: actuator})
    guard = Guard({ROLE: RoleLimits(-400.0, 400.0, 200.0, 1e-6)})
    with FakeCamera(buffer.push, {ROLE: actuator}, metrics):
        report = executor.run(autofocus(guard, ZonePlate(), AutofocusConfig()), guard,
                              name="autofocus")
    out = report.as_dict()
    assert out["verdict"] == "resolved", out["reason"]
    assert abs(out["best_z_um"] - true_z) < DOF_UM / 10 and out["frames_used"] <= 15
    assert actuator.position == pytest.approx(out["best_z_um"])
    assert {"best_z_um", "uncertainty_um", "start_z_um", "frames_used", "duration_s",
            "actions"} <= set(out)
    # every frame used came after the move before it had finished
    last_done = None
    for action in report.actions:
        if action.kind == "move":
            last_done = action.data["t_done_ns"]
        elif action.kind == "acquire" and last_done is not None:
            assert all(f["t_ns"] > last_done for f in action.data["frames"])


# -------------------------------------------------------------------------------- runtime


class StateRecorder:
    def __init__(self) -> None:
        self.values: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def set_state(self, **values: Any) -> None:
        with self.lock:
            self.values.append(values)

    def last(self, key: str) -> Any:
        with self.lock:
            return next((v[key] for v in reversed(self.values) if key in v), None)


class Command:
    def __init__(self, name: str, value: Any = True) -> None:
        self.name, self.value = name, value


def wait_until(predicate: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError("timed out")


STEER = np.array([[10.0, 1.0], [-0.5, 10.0]])


def beam_world(drift_px_per_s: float):
    actuators = {r: FakeActuator(r, "um", (-100.0, 100.0), 0.0, 500.0)
                 for r in ("beam_x", "beam_y")}
    rng = np.random.default_rng(0)

    def metrics(positions: dict[str, float], t: float) -> dict[str, Any]:
        u = np.array([positions["beam_x"], positions["beam_y"]])
        c = np.array([120.0, 130.0]) + drift_px_per_s * t * np.array([0.8, 0.6]) + STEER @ u
        c += rng.normal(0.0, 0.05, 2)
        return {"centroid_x_px": c[0], "centroid_y_px": c[1], "mean_counts": 1000.0}

    return actuators, metrics


def runtime_settings(**kw: Any) -> LoopSettings:
    roles = RoleSettings({"beam_x": 2.5, "beam_y": 2.5, ROLE: 200.0},
                         {"beam_x": 1e-6, "beam_y": 1e-6, ROLE: 1e-6})
    return LoopSettings(roles=roles, calibration=CalibrationConfig(frames_per_point=2),
                        beam=BeamConfig(stale_after_s=0.5), **kw)


def test_runtime_beam_loop_calibrates_then_holds_the_setpoint_against_drift():
    actuators, metrics = beam_world(drift_px_per_s=5.0)
    executor, buffer = make_executor(actuators)
    state, commands = StateRecorder(), queue.Queue()
    runtime = FeedbackRuntime(executor, runtime_settings(), commands=commands, state=state)
    camera = FakeCamera(runtime.on_result, actuators, metrics)  # as a publisher listener
    runtime.start()
    try:
        with camera:
            commands.put(Command("beamfb_setpoint_x_px", 125.0))
            commands.put(Command("beamfb_enable", True))
            wait_until(lambda: state.last("beamfb_state") == "running")
            report = runtime.reports["beam-calibration"]
            assert report.verdict == Verdict.RESOLVED
            measured = np.array(report.done.result["response"]["px_per_unit"])
            np.testing.assert_allclose(measured, STEER, atol=0.05)
            time.sleep(1.0)  # settle; then the loop holds against 5 px/s of drift
            errors = []
            t_end = time.monotonic() + 1.0
            while time.monotonic() < t_end:
                latest = buffer.latest()
                errors.append(math.hypot(latest["metrics"]["centroid_x_px"] - 125.0,
                                         latest["metrics"]["centroid_y_px"] - 130.0))
                time.sleep(0.01)
            assert math.sqrt(np.mean(np.square(errors))) < 1.0
            commands.put(Command("beamfb_enable", False))
            wait_until(lambda: state.last("beamfb_state") == "off")
            n_puts = len(puts(executor))
            time.sleep(0.3)
            assert len(puts(executor)) == n_puts  # off means off
    finally:
        runtime.stop()
    assert all(abs(a.target) <= 100.0 for a in puts(executor))


def test_runtime_autofocus_by_command_reports_state_and_aborts():
    rng = np.random.default_rng(1)

    def metrics(positions: dict[str, float], _t: float) -> dict[str, Any]:
        z = positions[ROLE]
        score = 0.05 + math.exp(-0.5 * ((z - 4.0) / DOF_UM) ** 2) + rng.normal(0, 0.01)
        return {"band_power": score, "mean_counts": 1000.0, "psd_verdict": "ok"}

    actuator = zp(position=0.0, velocity=400.0)
    executor, _ = make_executor({ROLE: actuator})
    state, commands = StateRecorder(), queue.Queue()
    runtime = FeedbackRuntime(executor, runtime_settings(
        zone_plate=ZonePlate(), setpoints=SetpointTable.constant(0, 0)),
        commands=commands, state=state)
    camera = FakeCamera(runtime.on_result, {ROLE: actuator}, metrics)
    runtime.start()
    try:
        with camera:
            commands.put(Command("af_start"))
            wait_until(lambda: state.last("af_verdict") == "resolved", 15.0)
            assert abs(state.last("af_best_z_um") - 4.0) < DOF_UM / 10
            assert state.last("af_state") == "idle"
            commands.put(Command("af_start"))
            wait_until(lambda: executor.running == "autofocus")
            assert not runtime.start_autofocus()  # one procedure at a time
            commands.put(Command("af_abort"))
            wait_until(lambda: state.last("af_verdict") == "aborted")
    finally:
        runtime.stop()
    states = [v["af_state"] for v in state.values if "af_state" in v]
    assert "aborting" in states and states[-1] == "idle"


def test_ca_string_fits_a_ca_record():
    assert ca_string("paused: " + "x" * 80).encode() == ("paused: " + "x" * 31).encode()
    assert ca_string("µ" * 30).encode().__len__() <= 39


def test_log_lines_and_done_are_recorded():
    executor, _ = make_executor({ROLE: zp()})

    def procedure():
        yield Log("hello", data={"a": 1})
        yield Done(Verdict.FLAT, "nothing to see")

    report = executor.run(procedure(), zp_guard(), name="log")
    assert [(a.kind, a.message) for a in report.actions] == [
        ("log", "hello"), ("done", "flat: nothing to see")]
    assert report.actions[0].data == {"a": 1} and report.rolled_back == {}


def test_a_procedure_bug_ends_aborted_not_in_a_crash():
    executor, _ = make_executor({ROLE: zp()})

    def buggy():
        yield Read(ROLE)
        raise KeyError("oops")

    report = executor.run(buggy(), zp_guard(), name="bug")
    assert report.verdict == Verdict.ABORTED and "internal error" in report.done.reason


def test_runtime_dry_run_beam_loop_logs_moves_and_puts_nothing():
    actuators, metrics = beam_world(drift_px_per_s=5.0)
    executor, _ = make_executor(actuators, dry_run=True)
    state = StateRecorder()
    runtime = FeedbackRuntime(executor, runtime_settings(
        response=ResponseMatrix(((10.0, 1.0), (-0.5, 10.0)))), state=state)
    camera = FakeCamera(runtime.on_result, actuators, metrics)
    runtime.start()
    try:
        with camera:
            runtime.set_setpoint("x", 110.0)  # 10 px off: the loop wants to steer
            runtime.enable_beam(True)
            wait_until(lambda: len([a for a in executor.actions if a.kind == "dry-run"]) >= 3)
    finally:
        runtime.stop()
    assert all(a.moves == [] and a.position == 0.0 for a in actuators.values())
    assert not puts(executor)
    dry = [a for a in executor.actions if a.kind == "dry-run"]
    assert all(a.position == 0.0 and abs(a.target) <= 2.5 for a in dry)  # from where it is


# -------------------------------------------------------------------------------- config


def test_feedback_config_is_validated_and_round_trips(tmp_path):
    import tomllib

    from txmlive.config import Config, ConfigError, config_from_dict, load_config, render_config
    from txmlive.feedback_cli import feedback_settings, scan_energies

    assert config_from_dict(tomllib.loads(render_config())) == Config()
    path = tmp_path / "fb.toml"
    path.write_text("[feedback]\nmax_step = { zp_z_um = 20 }\nsoft_limits = { beam_x = [-5, 5] }"
                    "\nbeam_response = [10, 1, -0.5, 10]\nbeam_setpoints = [8000, 128, 128]\n"
                    "focus_points = [8000, 0, 8100, 270]\n")
    settings = feedback_settings(load_config(path))
    roles = settings.loop.roles
    assert roles.max_step["zp_z_um"] == 20.0 and roles.max_step["beam_x"] == 2.5  # defaults kept
    assert roles.soft_limits == {"beam_x": (-5.0, 5.0)}
    assert settings.loop.response.px_per_unit == ((10.0, 1.0), (-0.5, 10.0))
    assert list(settings.loop.setpoints.at(9000.0)) == [128.0, 128.0]
    assert settings.focus_points == [(8000.0, 0.0), (8100.0, 270.0)]
    for text, words in [
        ("max_step = { zp_w_um = 1.0 }", "[feedback] max_step: unknown motor role"),
        ("max_step = { zp_z_um = -1.0 }", "[feedback] max_step zp_z_um: must be > 0"),
        ("soft_limits = { beam_x = [5, -5] }", "[feedback] soft_limits beam_x: low 5"),
        ("beam_response = [1, 2, 3]", "[feedback] beam_response: expected 4 numbers"),
        ("beam_response = [1, 1, 1, 1]", "[feedback] beam_response: response matrix"),
        ("beam_setpoints = [8000, 1]", "[feedback] beam_setpoints: expected groups of 3"),
        ('focus_model = "linear"', "[feedback] focus_model: the linear model needs"),
        ("shaker_amp_range_um = [5, 1]", "[feedback] shaker_amp_range_um"),
    ]:
        path.write_text(f"[feedback]\n{text}\n")
        with pytest.raises(ConfigError) as info:
            feedback_settings(load_config(path))
        assert words in str(info.value), (text, str(info.value))
    assert scan_energies(8300, 8360, 20) == [8300.0, 8320.0, 8340.0, 8360.0]
    assert scan_energies(8360, 8300, 25) == [8360.0, 8335.0, 8310.0]
    with pytest.raises(ValueError, match="--step-ev"):
        scan_energies(8300, 8360, 0)
