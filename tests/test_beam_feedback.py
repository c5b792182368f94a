"""Beam-position feedback: response calibration and the PI loop on a plain 2-D beam model."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feedback.beam import (
    BeamConfig,
    BeamFeedback,
    CalibrationConfig,
    LoopState,
    ResponseMatrix,
    SetpointTable,
    calibrate_response,
    check_response,
    fit_response,
)
from feedback.commands import Acquire, Command, Log, Move, MoveDone, Read, Verdict, drive
from feedback.safety import Guard, PauseReason, RoleLimits

TRUE_R = np.array([[10.0, 1.0], [-0.5, 10.0]])  # px per unit, as the simulator's default
ROLES = ("beam_x", "beam_y")
FRAME_S = 0.1
MOVE_S = 0.05


def beam_guard(max_step: float = 2.5, low: float = -100.0, high: float = 100.0) -> Guard:
    return Guard({role: RoleLimits(low, high, max_step, 1e-6) for role in ROLES})


class BeamModel:
    """Centroid = start + drift·t + jumps + R·u + noise (px); the steering motors are ``u``."""

    def __init__(self, *, drift_px_per_s: float = 1.0, jump_px: float = 20.0,
                 jump_interval_s: float = math.inf, noise_px: float = 0.1, seed: int = 0,
                 response: np.ndarray = TRUE_R, start_px: tuple[float, float] = (140.0, 120.0),
                 duration_s: float = 3600.0) -> None:
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.response = response
        self.start = np.array(start_px)
        angle = math.radians(30.0)
        self.drift = drift_px_per_s * np.array([math.cos(angle), math.sin(angle)])
        self.noise_px = noise_px
        self.jump_times = []
        self.jump_vectors = []
        t = 0.0
        while math.isfinite(jump_interval_s):
            t += rng.exponential(jump_interval_s)
            if t > duration_s:
                break
            phi = rng.uniform(0, 2 * math.pi)
            self.jump_times.append(t)
            self.jump_vectors.append(jump_px * np.array([math.cos(phi), math.sin(phi)]))
        self.u = {role: 0.0 for role in ROLES}
        self.mean_counts = 1000.0

    def true_centroid(self, t_s: float) -> np.ndarray:
        jumps = sum((v for tj, v in zip(self.jump_times, self.jump_vectors, strict=True)
                     if tj <= t_s), np.zeros(2))
        u = np.array([self.u[r] for r in ROLES])
        return self.start + self.drift * t_s + jumps + self.response @ u

    def result(self, seq: int, t_s: float, energy_ev: float = 8000.0,
               pixel_nm: float = 10.0) -> dict:
        c = self.true_centroid(t_s) + self.rng.normal(0.0, self.noise_px, 2)
        return {"seq": seq, "t_ns": int(round(t_s * 1e9)), "moving": False,
                "positions": dict(self.u), "energy_ev": energy_ev, "pixel_nm": pixel_nm,
                "exposure_s": 0.05, "metrics": {"centroid_x_px": float(c[0]),
                                                "centroid_y_px": float(c[1]),
                                                "mean_counts": self.mean_counts},
                "metrics_seq": seq}


class CalibrationBench:
    """Executor for the calibration procedure against a :class:`BeamModel`."""

    def __init__(self, model: BeamModel, guard: Guard) -> None:
        self.model, self.guard = model, guard
        self.t_s = 5.0
        self.seq = 0

    def handle(self, command: Command):
        if isinstance(command, Read):
            return self.model.u[command.role]
        if isinstance(command, Move):
            self.guard.check(command, self.model.u[command.role])
            self.t_s += MOVE_S
            self.model.u[command.role] = command.target
            return MoveDone(command.role, command.target, command.target,
                            int(round(self.t_s * 1e9)))
        if isinstance(command, Acquire):
            out = []
            for _ in range(command.n_frames):
                self.t_s += FRAME_S
                self.seq += 1
                out.append(self.model.result(self.seq, self.t_s))
            return out
        return None


# ---------------------------------------------------------------------------- calibration


def test_fit_response_separates_drift_from_steering():
    rng = np.random.default_rng(0)
    t = np.linspace(0.0, 10.0, 21)
    u = rng.uniform(-1, 1, (21, 2))
    c = np.array([5.0, -3.0]) + np.outer(t, [1.0, 0.5]) + u @ TRUE_R.T
    response, drift, residual = fit_response(t, u, c)
    np.testing.assert_allclose(response, TRUE_R, atol=1e-9)
    np.testing.assert_allclose(drift, [1.0, 0.5], atol=1e-9)
    assert residual < 1e-9
    with pytest.raises(ValueError, match="separate"):
        fit_response(t, np.zeros((21, 2)), c)


def test_calibration_recovers_the_response_despite_drift():
    model = BeamModel(drift_px_per_s=1.0, noise_px=0.1, seed=1)
    guard = beam_guard()
    model.u = {"beam_x": 3.0, "beam_y": -2.0}
    done = drive(calibrate_response(guard), CalibrationBench(model, guard).handle)
    assert done.verdict == Verdict.RESOLVED, done.reason
    measured = np.array(done.result["response"]["px_per_unit"])
    np.testing.assert_allclose(measured, TRUE_R, atol=0.2)
    assert np.linalg.norm(done.result["drift_px_per_s"]) == pytest.approx(1.0, abs=0.2)
    assert model.u == {"beam_x": 3.0, "beam_y": -2.0}  # back at the start
    assert guard.refusals == []


def jumpy_model(jump_times: list[float]) -> BeamModel:
    model = BeamModel(jump_interval_s=1.5, seed=2, duration_s=30.0)
    model.jump_times = jump_times
    model.jump_vectors = [np.array([20.0, 0.0]) for _ in jump_times]
    return model


def test_calibration_measures_again_after_a_jump():
    guard = beam_guard()
    bench = CalibrationBench(jumpy_model([7.0]), guard)
    logs: list[Log] = []

    def handle(command):
        if isinstance(command, Log):
            logs.append(command)
        return bench.handle(command)
    done = drive(calibrate_response(guard), handle)
    assert done.verdict == Verdict.RESOLVED, done.reason
    assert done.result["attempts"] == 2 and any("measuring again" in m.message for m in logs)
    np.testing.assert_allclose(done.result["response"]["px_per_unit"], TRUE_R, atol=0.2)
    assert done.result["frames_used"] == 2 * 7 * CalibrationConfig().frames_per_point


def test_calibration_refuses_jumps_no_response_and_an_ill_conditioned_matrix():
    guard = beam_guard()
    jumpy = jumpy_model([7.0])
    done = drive(calibrate_response(guard, CalibrationConfig(attempts=1)),
                 CalibrationBench(jumpy, guard).handle)
    assert done.verdict == Verdict.AMBIGUOUS and "jump" in done.reason
    assert jumpy.u == {"beam_x": 0.0, "beam_y": 0.0}
    dead = BeamModel(response=np.zeros((2, 2)), seed=3)
    done = drive(calibrate_response(guard), CalibrationBench(dead, guard).handle)
    assert done.verdict == Verdict.FLAT, done.reason
    parallel = BeamModel(response=np.array([[10.0, 9.9], [10.0, 10.1]]), noise_px=0.01, seed=4)
    done = drive(calibrate_response(guard), CalibrationBench(parallel, guard).handle)
    assert done.verdict == Verdict.AMBIGUOUS and "condition" in done.reason
    with pytest.raises(ValueError, match="condition"):
        check_response(ResponseMatrix(((1.0, 1.0), (1.0, 1.0))), 20.0)


def test_calibration_aborts_on_beam_loss_and_returns():
    guard = beam_guard()
    model = BeamModel(seed=5)
    bench = CalibrationBench(model, guard)
    original = model.result

    def dim(seq, t_s, **kw):
        model.mean_counts = 1000.0 if seq < 8 else 1.0
        return original(seq, t_s, **kw)
    model.result = dim
    done = drive(calibrate_response(guard, CalibrationConfig()), bench.handle)
    assert done.verdict == Verdict.ABORTED and "beam loss" in done.reason
    assert model.u == {"beam_x": 0.0, "beam_y": 0.0}


# ---------------------------------------------------------------------------- the loop


class LoopRunner:
    """Feeds a BeamFeedback with frames of a BeamModel every FRAME_S and applies its moves."""

    def __init__(self, model: BeamModel, guard: Guard, fb: BeamFeedback) -> None:
        self.model, self.guard, self.fb = model, guard, fb
        self.t_s = 0.0
        self.seq = 0
        self.moves: list[tuple[float, Move, float]] = []
        self.log: list[tuple[float, np.ndarray, LoopState]] = []
        self.energy_ev = 8000.0
        self.pixel_nm = 10.0

    def frame(self) -> None:
        self.seq += 1
        result = self.model.result(self.seq, self.t_s, self.energy_ev, self.pixel_nm)
        error = self.fb.setpoints.at(self.energy_ev) - self.model.true_centroid(self.t_s)
        arrival_ns = int(round((self.t_s + FRAME_S) * 1e9))
        step = self.fb.update(result, arrival_ns)
        for move in step.moves:
            before = self.model.u[move.role]
            self.guard.check(move, before)  # raises if a limit or the max step is broken
            self.model.u[move.role] = move.target
            self.moves.append((self.t_s, move, before))
            self.fb.moved(MoveDone(move.role, move.target, move.target,
                                   arrival_ns + int(MOVE_S * 1e9)))
        self.log.append((self.t_s, error, step.state))
        self.t_s += FRAME_S

    def run(self, seconds: float) -> None:
        for _ in range(int(round(seconds / FRAME_S))):
            self.frame()


def make_loop(model: BeamModel, guard: Guard | None = None, config: BeamConfig | None = None,
              setpoint: tuple[float, float] = (128.0, 128.0)) -> LoopRunner:
    guard = guard or beam_guard()
    response = ResponseMatrix(tuple(map(tuple, (TRUE_R * 1.03).tolist())), 10.0)  # 3 % off
    fb = BeamFeedback(guard, response, SetpointTable.constant(*setpoint), config)
    fb.enable(0)
    return LoopRunner(model, guard, fb)


def test_pi_loop_holds_a_drifting_jumping_beam_within_a_pixel():
    model = BeamModel(drift_px_per_s=1.0, jump_px=20.0, jump_interval_s=60.0, noise_px=0.1,
                      seed=11, duration_s=600.0)
    loop = make_loop(model)
    loop.run(600.0)
    assert len(model.jump_times) >= 5
    t = np.array([row[0] for row in loop.log])
    err = np.array([np.hypot(*row[1]) for row in loop.log])
    settled = t > 3.0
    for tj in model.jump_times:
        settled &= ~((t >= tj) & (t < tj + 1.0))
        after = (t >= tj + 1.0) & (t < tj + 1.5)
        assert np.all(err[after] < 1.0), f"not recovered 1 s after the jump at {tj:.1f} s"
    rms_settled = float(np.sqrt(np.mean(err[settled] ** 2)))
    rms_all = float(np.sqrt(np.mean(err[t > 3.0] ** 2)))
    assert rms_settled <= 1.0
    assert rms_all <= 1.5  # including the first frames after each 20 px jump
    assert all(abs(m.target - before) <= 2.5 + 1e-12 for _, m, before in loop.moves)
    assert loop.guard.refusals == []


def test_deadband_keeps_the_motors_still_on_noise():
    model = BeamModel(drift_px_per_s=0.0, noise_px=0.05, seed=12)
    loop = make_loop(model, setpoint=(140.0, 120.0))  # already there
    loop.run(30.0)
    assert loop.moves == []
    assert loop.fb.state == LoopState.RUNNING


def test_enable_is_bumpless_and_the_first_move_has_no_proportional_kick():
    model = BeamModel(drift_px_per_s=1.0, noise_px=0.0, seed=13)
    loop = make_loop(model, config=BeamConfig(proportional_gain=0.5, integral_gain=0.5))
    loop.run(5.0)
    loop.fb.disable()
    loop.run(8.0)  # the beam drifts 8 px while the loop is off: no moves
    n_before = len(loop.moves)
    assert loop.fb.state == LoopState.OFF and loop.fb.reason == "enable off"
    model.u["beam_x"] += 0.7  # someone steers by hand meanwhile
    loop.fb.enable(int(loop.t_s * 1e9))
    loop.frame()
    first = loop.moves[n_before:]
    assert first, "the loop acts on the first frame after enabling"
    error = loop.log[-1][1]
    inverse = np.linalg.inv(TRUE_R * 1.03)
    expected = 0.5 * (inverse @ error)  # integral step only, from where the motors are
    for _, move, before in first:
        i = ROLES.index(move.role)
        assert move.target - before == pytest.approx(expected[i], rel=1e-6, abs=1e-9)
        assert move.rollback == before  # each step starts from the actual (hand-moved) position


def test_pause_reasons_and_bumpless_resume():
    model = BeamModel(drift_px_per_s=1.0, noise_px=0.05, seed=14)
    loop = make_loop(model)
    fb = loop.fb
    loop.run(3.0)
    model.mean_counts = 20.0  # 2 % of the reference
    loop.run(1.0)
    assert fb.state == LoopState.PAUSED and fb.reason.startswith("beam loss")
    n = len(loop.moves)
    loop.run(2.0)
    assert len(loop.moves) == n
    model.mean_counts = 200.0  # 20 %: dim, not lost ... but the reference resets on recovery
    loop.run(0.2)
    model.mean_counts = 1000.0
    loop.run(3.0)
    assert fb.state in (LoopState.RUNNING, LoopState.WAITING)
    assert np.hypot(*loop.log[-1][1]) < 1.0
    loop.run(1.0)
    model.mean_counts = 250.0
    loop.run(0.5)
    assert fb.state == LoopState.PAUSED and fb.reason.startswith("low intensity")
    model.mean_counts = 1000.0
    loop.run(1.0)
    # Stale stream: no result for longer than stale_after_s.
    step = fb.tick(int((loop.t_s + 5.0) * 1e9))
    assert step.state == LoopState.PAUSED and step.reason.startswith("stale stream")
    loop.t_s += 5.0
    loop.run(1.0)
    assert fb.state != LoopState.PAUSED
    fb.pause(PauseReason.IOC_DISCONNECT, "beam_x disconnected")
    n = len(loop.moves)
    loop.run(2.0)
    assert fb.state == LoopState.PAUSED and "IOC disconnect" in fb.reason
    assert len(loop.moves) == n
    fb.resume(PauseReason.IOC_DISCONNECT)
    loop.run(2.0)
    assert fb.state != LoopState.PAUSED and len(loop.moves) > n


def test_a_move_never_reported_done_pauses_the_loop():
    model = BeamModel(drift_px_per_s=1.0, seed=15)
    guard = beam_guard()
    fb = BeamFeedback(guard, ResponseMatrix(tuple(map(tuple, TRUE_R.tolist()))),
                      SetpointTable.constant(128.0, 128.0))
    fb.enable(0)
    step = fb.update(model.result(1, 0.0), 100_000_000)
    assert step.moves and fb.state == LoopState.WAITING
    assert fb.update(model.result(2, 0.1), 200_000_000).moves == ()  # one correction at a time
    step = fb.tick(int(11e9))
    assert step.state == LoopState.PAUSED and "not done" in step.reason


def test_frames_from_before_the_move_are_ignored():
    model = BeamModel(drift_px_per_s=0.0, noise_px=0.0, seed=16)
    guard = beam_guard()
    fb = BeamFeedback(guard, ResponseMatrix(tuple(map(tuple, TRUE_R.tolist()))),
                      SetpointTable.constant(128.0, 128.0))
    fb.enable(0)
    step = fb.update(model.result(1, 1.0), int(1.1e9))
    for move in step.moves:
        fb.moved(MoveDone(move.role, move.target, move.target, int(1.3e9)))
    stale = model.result(2, 1.2)  # exposed before the move finished, at the old position
    step = fb.update(stale, int(1.3e9))
    assert step.moves == () and "not after the move" in step.reason
    for move in fb.update(model.result(3, 1.0), int(1.1e9)).moves:  # t_ns too early as well
        raise AssertionError(f"acted on a stale frame: {move}")


def test_drive_limit_holds_without_windup():
    guard = beam_guard(max_step=2.5, low=-1.0, high=1.0)
    model = BeamModel(drift_px_per_s=0.0, noise_px=0.0, seed=17)
    loop = make_loop(model, guard=guard, setpoint=(170.0, 120.0))  # needs u_x ≈ +3: beyond
    loop.run(10.0)
    assert model.u["beam_x"] == pytest.approx(1.0)
    assert "drive limit" in (loop.fb.reason or "")
    loop.fb.set_setpoint(140.0, 120.0)  # reachable again (u = 0)
    loop.frame()
    loop.frame()
    # No wound-up integrator: the first correction leaves the limit at once.
    assert model.u["beam_x"] < 1.0
    loop.run(5.0)
    assert abs(model.u["beam_x"]) < 0.05


def test_energy_dependent_setpoints_and_pixel_rescaling():
    table = SetpointTable([(8000.0, 100.0, 100.0), (9000.0, 120.0, 90.0)])
    np.testing.assert_allclose(table.at(8500.0), [110.0, 95.0])
    np.testing.assert_allclose(table.at(7000.0), [100.0, 100.0])
    np.testing.assert_allclose(table.at(9500.0), [120.0, 90.0])
    with pytest.raises(ValueError, match="distinct"):
        SetpointTable([(8000.0, 1.0, 1.0), (8000.0, 2.0, 2.0)])
    r = ResponseMatrix(((10.0, 0.0), (0.0, 10.0)), pixel_nm=10.0)
    np.testing.assert_allclose(r.matrix(20.0), [[5.0, 0.0], [0.0, 5.0]])
    model = BeamModel(drift_px_per_s=0.0, noise_px=0.02, seed=18)
    loop = make_loop(model)
    loop.fb.set_setpoints(table)
    for energy in np.linspace(8000.0, 9000.0, 11):
        loop.energy_ev = energy
        loop.run(3.0)
        assert np.hypot(*loop.log[-1][1]) < 0.5, energy


events = st.lists(st.tuples(
    st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    st.sampled_from([1000.0, 300.0, 20.0, math.nan]),
    st.sampled_from(["frame", "frame", "frame", "toggle", "setpoint", "tick", "late"]),
), min_size=1, max_size=60)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=events, max_step=st.floats(0.01, 10.0), span=st.floats(0.5, 50.0))
def test_property_beam_loop_never_commands_outside_limits_or_above_max_step(
        events, max_step, span):
    guard = Guard({role: RoleLimits(-span, span, max_step, 1e-9) for role in ROLES})
    fb = BeamFeedback(guard, ResponseMatrix(tuple(map(tuple, TRUE_R.tolist()))),
                      SetpointTable.constant(128.0, 128.0))
    fb.enable(0)
    u = {role: 0.0 for role in ROLES}
    t_ns = 0
    for seq, (cx, cy, counts, kind) in enumerate(events):
        t_ns += 100_000_000
        if kind == "toggle":
            fb.disable() if fb.enabled else fb.enable(t_ns)
            continue
        if kind == "setpoint":
            fb.set_setpoint(cx if cx is not None and math.isfinite(cx) else 0.0, 1e6)
            continue
        if kind == "tick":
            assert fb.tick(t_ns + 10**10).moves == ()
            continue
        stamp = t_ns - 10**9 if kind == "late" else t_ns
        result = {"seq": seq, "t_ns": stamp, "moving": False, "positions": dict(u),
                  "energy_ev": 8000.0, "pixel_nm": 10.0,
                  "metrics": {"centroid_x_px": cx, "centroid_y_px": cy,
                              "mean_counts": counts}}
        for move in fb.update(result, t_ns).moves:
            guard.check(move, u[move.role])
            u[move.role] = move.target
            fb.moved(MoveDone(move.role, move.target, move.target, t_ns + 1))
    assert guard.refusals == []
    assert all(-span <= v <= span for v in u.values())
