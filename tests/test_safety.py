"""Feedback safety: guard, stale-frame rule, pause reasons, the Motion plan stub, drive()."""

from __future__ import annotations

import logging
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from feedback.commands import Acquire, Done, Log, Move, MoveDone, Read, Verdict, drive
from feedback.safety import (
    FreshFilter,
    Guard,
    IntensityRule,
    Motion,
    MoveRefused,
    PauseReason,
    RoleLimits,
    frame_problem,
    metric,
    stream_is_stale,
)

GUARD_LIMITS = {"zp_z_um": RoleLimits(-100.0, 100.0, 10.0, 0.1)}


def test_guard_accepts_within_limits_and_step():
    guard = Guard(GUARD_LIMITS)
    assert guard.check(Move("zp_z_um", 5.0, "test"), 0.0) == 5.0
    assert guard.check(Move("zp_z_um", 10.0, "test"), 0.0) == 10.0  # exactly the max step
    assert guard.refusals == []


@pytest.mark.parametrize("target, current, why", [
    (101.0, 95.0, "outside the soft limits"),
    (-100.5, -95.0, "outside the soft limits"),
    (20.0, 0.0, "exceeds the maximum step"),
    (math.nan, 0.0, "not a finite number"),
    (math.inf, 0.0, "not a finite number"),
    ("5", 0.0, "not a finite number"),
    (True, 0.0, "not a finite number"),
    (5.0, math.nan, "current position"),
])
def test_guard_refuses_never_clips_and_logs(target, current, why, caplog):
    guard = Guard(GUARD_LIMITS)
    with caplog.at_level(logging.WARNING, logger="feedback.safety"):
        with pytest.raises(MoveRefused, match=why) as info:
            guard.check(Move("zp_z_um", target, "test"), current)
    assert info.value.role == "zp_z_um"
    assert guard.refusals == [info.value]
    assert why in caplog.text


def test_guard_refuses_unknown_roles_and_validates_limits():
    guard = Guard({"zp_z_um": {"low": -1.0, "high": 1.0, "max_step": 0.5}})
    with pytest.raises(MoveRefused, match="no limits configured"):
        guard.check(Move("energy_ev", 8000.0, "test"), 7990.0)
    with pytest.raises(KeyError, match="known"):
        guard.limits("energy_ev")
    with pytest.raises(ValueError, match="below high"):
        RoleLimits(1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="max_step"):
        RoleLimits(0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="tolerance"):
        RoleLimits(0.0, 1.0, 1.0, -1.0)
    with pytest.raises(ValueError, match="limits of 'x'"):
        Guard({"x": {"low": 0.0, "high": 1.0}})
    with pytest.raises(TypeError, match="RoleLimits or a mapping"):
        Guard({"x": 3.0})


@given(current=st.floats(-100.0, 100.0), target=st.floats(-100.0, 100.0),
       max_step=st.floats(0.01, 300.0))
def test_property_waypoints_stay_within_limits_and_steps(current, target, max_step):
    guard = Guard({"r": RoleLimits(-100.0, 100.0, max_step, 0.0)})
    points = guard.waypoints("r", current, target)
    here = current
    for p in points:
        guard.check(Move("r", p, "test"), here)  # never refused
        here = p
    assert (points[-1] == target) if points else (target == current)


@given(target=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.none()),
       current=st.floats(-100.0, 100.0))
def test_property_check_never_passes_a_bad_target(target, current):
    guard = Guard(GUARD_LIMITS)
    try:
        accepted = guard.check(Move("zp_z_um", target, "test"), current)
    except MoveRefused:
        return
    assert -100.0 <= accepted <= 100.0 and abs(accepted - current) <= 10.0 + 1e-8


def test_waypoints_refuse_targets_outside_limits():
    guard = Guard(GUARD_LIMITS)
    with pytest.raises(MoveRefused, match="within the soft limits"):
        guard.waypoints("zp_z_um", 0.0, 150.0)
    assert guard.waypoints("zp_z_um", 0.0, 25.0) == pytest.approx([25 / 3, 50 / 3, 25.0])


def result(t_ns: int = 2_000, z: float = 5.0, moving: bool = False, seq: int = 1,
           metrics_seq: int | None = None) -> dict:
    return {"seq": seq, "t_ns": t_ns, "moving": moving, "positions": {"zp_z_um": z},
            "metrics": {"band_power": 1.0}, "metrics_seq": metrics_seq}


def test_stale_frame_rule():
    done = [MoveDone("zp_z_um", 5.0, 5.0, 1_000)]
    tol = {"zp_z_um": 0.1}
    assert frame_problem(result(), done, tol) is None
    assert "not after the move" in frame_problem(result(t_ns=1_000), done, tol)
    assert "not after the move" in frame_problem(result(t_ns=500), done, tol)
    assert "moving" in frame_problem(result(moving=True), done, tol)
    assert "more than 0.1" in frame_problem(result(z=5.2), done, tol)
    assert frame_problem(result(z=5.05), done, tol) is None
    no_pos = result()
    no_pos["positions"] = {}
    assert "no position" in frame_problem(no_pos, done, tol)
    assert "no acquisition time" in frame_problem({"t_ns": None}, done, tol)


def test_fresh_filter_demands_fresh_side_thread_metrics_once():
    done = [MoveDone("zp_z_um", 5.0, 5.0, 1_000)]
    fresh = FreshFilter(done, {"zp_z_um": 0.1}, keys=("band_power",))
    assert not fresh.accept(result(t_ns=900, seq=9, metrics_seq=8))
    # First fresh frame, but its PSD values describe frame 9 (before the move): refused.
    assert not fresh.accept(result(seq=10, metrics_seq=9))
    assert "before the first fresh frame" in fresh.reason
    assert fresh.accept(result(t_ns=2_100, seq=11, metrics_seq=10))
    assert not fresh.accept(result(t_ns=2_200, seq=12, metrics_seq=10))
    assert "already used" in fresh.reason
    cheap = FreshFilter(done, {"zp_z_um": 0.1}, keys=("mean_counts", "centroid_x_px"))
    assert cheap.accept(result(seq=10, metrics_seq=None))


def test_intensity_rule_and_stale_stream():
    rule = IntensityRule(min_mean_counts=5.0, beam_loss_fraction=0.05, low_fraction=0.3)
    assert rule.check(1000.0, 1000.0) is None
    assert rule.check(200.0, 1000.0) == PauseReason.LOW_INTENSITY
    assert rule.check(40.0, 1000.0) == PauseReason.BEAM_LOSS
    assert rule.check(4.0, None) == PauseReason.BEAM_LOSS
    assert rule.check(None, 1000.0) == PauseReason.BEAM_LOSS
    assert rule.check(math.nan) == PauseReason.BEAM_LOSS
    with pytest.raises(ValueError, match="beam_loss_fraction"):
        IntensityRule(beam_loss_fraction=0.5, low_fraction=0.3)
    assert stream_is_stale(None, 10, 1.0)
    assert stream_is_stale(0, 2_000_000_000, 1.0)
    assert not stream_is_stale(0, 500_000_000, 1.0)
    assert metric({"metrics": {"a": 1}}, "a") == 1.0
    assert metric({"metrics": {"a": math.inf}}, "a") is None
    assert metric({"metrics": {"a": "x"}}, "a") is None
    assert metric({}, "a") is None


def test_motion_reads_first_splits_steps_and_keeps_the_rollback():
    guard = Guard(GUARD_LIMITS)
    motion = Motion(guard)
    plan = motion.move("zp_z_um", 25.0, "test", {"score": 1.0})
    assert next(plan) == Read("zp_z_um")
    moves = [plan.send(2.0)]
    try:
        while True:
            m = moves[-1]
            moves.append(plan.send(MoveDone(m.role, m.target, m.target, 10 * len(moves))))
    except StopIteration:
        pass
    assert [m.target for m in moves] == pytest.approx([2 + 23 / 3, 2 + 46 / 3, 25.0])
    assert all(m.rollback == 2.0 and m.metrics == {"score": 1.0} for m in moves)
    assert motion.position["zp_z_um"] == 25.0 and motion.start["zp_z_um"] == 2.0
    usable, problems = motion.fresh([result(t_ns=5, z=25.0), result(t_ns=100, z=25.0)])
    assert len(usable) == 1 and "not after the move" in problems[0]


def test_drive_runs_a_procedure_and_throws_handler_errors_into_it():
    def procedure():
        try:
            yield Move("zp_z_um", 1.0, "test")
        except ConnectionError as exc:
            done = Done(Verdict.ABORTED, str(exc))
        else:
            done = Done(Verdict.RESOLVED, "ok")
        yield done
        return done

    def failing(command):
        if isinstance(command, Move):
            raise ConnectionError("IOC gone")
    assert drive(procedure(), failing).verdict == Verdict.ABORTED
    assert drive(procedure(), lambda c: None).verdict == Verdict.RESOLVED


def test_drive_rejects_broken_procedures():
    def no_done():
        yield Log("hello")

    def after_done():
        yield Done(Verdict.FLAT, "x")
        yield Log("more")

    def not_a_command():
        yield "move please"
    with pytest.raises(RuntimeError, match="without a Done"):
        drive(no_done(), lambda c: None)
    with pytest.raises(RuntimeError, match="after its Done"):
        drive(after_done(), lambda c: None)
    with pytest.raises(TypeError, match="not a command"):
        drive(not_a_command(), lambda c: None)


def test_acquire_validates():
    with pytest.raises(ValueError, match="n_frames"):
        Acquire(0)
    with pytest.raises(ValueError, match="kind"):
        Acquire(1, kind="dark")
    with pytest.raises(ValueError, match="timeout_s"):
        Acquire(1, timeout_s=0.0)
    assert str(Verdict.RESOLVED) == "resolved"
