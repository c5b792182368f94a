"""ZP autofocus: the curve fit and its verdicts, and the procedure against the simulator.

:class:`SimBench` is a small executor for procedures: fake motors on a fake clock, frames
rendered by :mod:`hw.sim` (small N) and measured by :class:`stream.metrics.MetricsEngine`
after dark/flat correction, every move checked by the guard and every acquisition filtered by
the stale-frame rule, as the real executor does. Other feedback tests reuse it.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feedback.autofocus import AutofocusConfig, autofocus, fit_focus
from feedback.commands import (
    Aborted,
    Acquire,
    Command,
    Done,
    Log,
    Move,
    MoveDone,
    Read,
    Verdict,
    drive,
)
from feedback.optics import ZonePlate
from feedback.safety import FreshFilter, Guard, RoleLimits
from hw.actuators import FakeActuator
from hw.sim.detector import BeamlineState, SimParams, Simulator
from stream.correct import normalize
from stream.metrics import MetricsConfig, MetricsEngine

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ZP = ZonePlate()
DOF_8KEV = ZP.dof_um(8000.0)

SIM_VELOCITY = {"zp_z_um": 50.0, "energy_ev": 2000.0, "shaker_amp_um": 100.0,
                "shaker_freq_hz": 500.0, "beam_x": 100.0, "beam_y": 100.0}
"""Motor speeds of the simulated IOC (role unit per s)."""


def default_guard(**overrides: RoleLimits) -> Guard:
    limits = {
        "zp_z_um": RoleLimits(-200.0, 200.0, 30.0, 0.05),
        "energy_ev": RoleLimits(5000.0, 14000.0, 500.0, 0.05),
        "shaker_amp_um": RoleLimits(0.0, 10.0, 5.0, 0.001),
        "shaker_freq_hz": RoleLimits(1.0, 500.0, 200.0, 0.01),
        "beam_x": RoleLimits(-100.0, 100.0, 5.0, 0.001),
        "beam_y": RoleLimits(-100.0, 100.0, 5.0, 0.001),
    }
    limits.update(overrides)
    return Guard(limits)


class SimBench:
    """Runs procedures against the simulator: a test stand-in for the executor.

    Parameters
    ----------
    params : SimParams
    guard : Guard
        Checked before every put; a refusal is thrown into the procedure.
    state : BeamlineState, optional
        Start state (default: the simulator's default state).
    leak_stale : bool
        Hand the procedure, after every move, one frame exposed before the move finished
        (at the old position) and skip the executor-side stale filter, to prove that the
        procedure's own check drops it.
    fail_on_move : int or None
        Raise ``ConnectionError`` (IOC gone) at this move (1-based).
    """

    def __init__(self, params: SimParams, guard: Guard, state: BeamlineState | None = None,
                 *, leak_stale: bool = False, fail_on_move: int | None = None) -> None:
        self.sim = Simulator(params)
        self.guard = guard
        self.state = state if state is not None else self.sim.default_state()
        self.t_s = 10.0
        self.actuators = {
            role: FakeActuator(role, limits=(guard.limits(role).low, guard.limits(role).high),
                               position=float(getattr(self.state, role)),
                               velocity=SIM_VELOCITY[role], clock=lambda: self.t_s,
                               sleep=self._sleep)
            for role in guard.roles}
        self.engine = MetricsEngine(MetricsConfig(pixel_nm=10.0, dr_nm=params.zp_dr_nm))
        self.refs: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]] = {}
        self.seq = 0
        self.moves: list[Move] = []
        self.done_moves: dict[str, MoveDone] = {}
        self.logs: list[Log] = []
        self.commands: list[Command] = []
        self.frames = 0
        self.leak_stale = leak_stale
        self.fail_on_move = fail_on_move
        self.abort_on_acquire: int | None = None
        self.acquires = 0
        self.before_frame = None

    def _sleep(self, seconds: float) -> None:
        self.t_s += seconds

    @property
    def t_ns(self) -> int:
        return int(round(self.t_s * 1e9))

    def current_state(self, **extra: Any) -> BeamlineState:
        positions = {role: act.position for role, act in self.actuators.items()}
        return replace(self.state, **positions, **extra)

    def truth(self) -> dict[str, float]:
        return self.sim.optics_truth(self.current_state())

    def _references(self, state: BeamlineState) -> tuple[np.ndarray, np.ndarray]:
        key = (state.energy_ev, state.shaker_amp_um, state.shaker_freq_hz, state.exposure_s)
        if key not in self.refs:
            darks = [self.sim.render(replace(state, frame_type="Background"), self.t_s)[0]
                     for _ in range(2)]
            flats = [self.sim.render(replace(state, frame_type="FlatField"), self.t_s + 0.1)[0]
                     for _ in range(2)]
            self.refs[key] = (np.array(darks), np.array(flats))
        return self.refs[key]

    def result(self, kind: str = "data", state: BeamlineState | None = None,
               t_ns: int | None = None) -> dict[str, Any]:
        """Render one frame now (advancing the clock) and measure it like the pipeline."""
        if self.before_frame is not None:
            self.before_frame(self)
        state = state if state is not None else self.current_state()
        frame_type = "FlatField" if kind == "flat" else "Normal"
        pixel_nm = self.sim.params.pixel_nm(state.energy_ev)
        image, _ = self.sim.render(replace(state, frame_type=frame_type), self.t_s)
        stamp = self.t_ns if t_ns is None else t_ns
        self.t_s += state.exposure_s
        if kind == "data":
            darks, flats = self._references(state)
            image = normalize(image, darks, flats)
        self.seq += 1
        self.frames += 1
        return {
            "seq": self.seq, "t_ns": stamp, "kind": kind, "moving": False,
            "positions": {role: float(getattr(state, role)) for role in self.actuators},
            "energy_ev": state.energy_ev, "exposure_s": state.exposure_s,
            "pixel_nm": pixel_nm, "corrected": kind == "data",
            "metrics": self.engine.compute_all(image, pixel_nm), "metrics_seq": self.seq,
        }

    def handle(self, command: Command) -> Any:
        self.commands.append(command)
        if isinstance(command, Read):
            return self.actuators[command.role].position
        if isinstance(command, Move):
            if self.fail_on_move is not None and len(self.moves) + 1 >= self.fail_on_move:
                raise ConnectionError("simulated IOC disconnected")
            actuator = self.actuators[command.role]
            old = self.current_state()
            self.guard.check(command, actuator.position)
            self.moves.append(command)
            actuator.move(command.target)
            done = MoveDone(command.role, command.target, actuator.position, self.t_ns)
            self.done_moves[command.role] = done
            self.t_s += 0.001
            self._stale = old
            return done
        if isinstance(command, Acquire):
            self.acquires += 1
            if self.abort_on_acquire is not None and self.acquires >= self.abort_on_acquire:
                raise Aborted("operator abort")
            results = []
            if self.leak_stale and getattr(self, "_stale", None) is not None and \
                    command.after_move:
                done = max(self.done_moves.values(), key=lambda d: d.t_done_ns)
                results.append(self.result(command.kind, self._stale, done.t_done_ns - 1))
                self._stale = None
            fresh = FreshFilter(self.done_moves.values() if command.after_move else (),
                                self.guard.tolerances, command.keys)
            while len(results) < command.n_frames:
                result = self.result(command.kind)
                if self.leak_stale or fresh.accept(result):
                    results.append(result)
            return results
        if isinstance(command, Log):
            self.logs.append(command)
            return None
        if isinstance(command, Done):
            return None
        raise TypeError(f"unknown command {command!r}")

    def run(self, procedure) -> Done:
        return drive(procedure, self.handle)


def sim_params(**kw: Any) -> SimParams:
    base = dict(size_px=256, sample="siemens", seed=3, vibration_rms_nm=1.0, drift_px_per_s=0.0,
                jump_px=0.0)
    base.update(kw)
    return SimParams(**base)


# ---------------------------------------------------------------------------- fit_focus


def gaussian_curve(z: np.ndarray, center: float, width: float, amplitude: float = 1.0,
                   baseline: float = 0.05) -> np.ndarray:
    return baseline + amplitude * np.exp(-0.5 * ((z - center) / width) ** 2)


def test_fit_focus_recovers_a_noisy_gaussian_with_calibrated_uncertainty():
    rng = np.random.default_rng(1)
    z = np.linspace(-24.0, 24.0, 9)
    pulls = []
    for _ in range(200):
        center = rng.uniform(-8.0, 8.0)
        scores = gaussian_curve(z, center, 8.0) + rng.normal(0.0, 0.02, z.size)
        fit = fit_focus(z, scores, dof_um=8.0)
        assert fit.verdict == Verdict.RESOLVED, fit.reason
        assert abs(fit.best_z_um - center) < 1.0
        pulls.append((fit.best_z_um - center) / fit.uncertainty_um)
    # The uncertainty is an honest 1σ: pulls have unit spread (residual-scaled, 5 dof).
    assert 0.7 < np.std(pulls) < 1.5


def test_fit_focus_known_errors_and_any_order():
    z = np.array([4.0, -4.0, 0.0, 8.0, -8.0, 12.0, -12.0])
    scores = gaussian_curve(z, 1.5, 6.0)
    fit = fit_focus(z, scores, score_err=0.01, dof_um=8.0)
    assert fit.verdict == Verdict.RESOLVED
    assert fit.best_z_um == pytest.approx(1.5, abs=1e-3)
    assert fit.uncertainty_um < 0.1
    assert fit.as_dict()["verdict"] == "resolved"


def test_fit_focus_noise_is_flat_never_a_number():
    rng = np.random.default_rng(2)
    z = np.linspace(-24.0, 24.0, 7)
    for _ in range(50):
        fit = fit_focus(z, 1e-6 * rng.normal(size=z.size) + 3e-7, dof_um=8.0)
        assert fit.verdict == Verdict.FLAT, fit.reason
        assert fit.best_z_um is None and fit.uncertainty_um is None
    fit = fit_focus(z, np.full(z.size, 2.0))
    assert fit.verdict == Verdict.FLAT
    strong = gaussian_curve(z, 0.0, 8.0)
    assert fit_focus(z, strong, structure=False).verdict == Verdict.FLAT


def test_fit_focus_two_lobes_are_ambiguous():
    z = np.linspace(-24.0, 24.0, 9)
    lobes = gaussian_curve(z, -9.0, 4.0, 1.0, 0.0) + gaussian_curve(z, 10.0, 4.0, 0.9, 0.0)
    fit = fit_focus(z, lobes, dof_um=8.0)
    assert fit.verdict == Verdict.AMBIGUOUS, fit.reason
    assert fit.best_z_um is None
    assert len(fit.peaks_um) == 2
    # A two-lobed curve that no single peak fits: ambiguous when the images show structure.
    z7 = np.linspace(-24.0, 24.0, 7)
    lobes7 = gaussian_curve(z7, -9.0, 4.0, 1.0, 0.0) + gaussian_curve(z7, 12.0, 4.0, 1.0, 0.0)
    assert fit_focus(z7, lobes7, dof_um=8.0, structure=True).verdict == Verdict.AMBIGUOUS


def test_fit_focus_edge_peak_is_railed_and_bad_width_ambiguous():
    z = np.linspace(-24.0, 24.0, 7)
    rising = gaussian_curve(z, 30.0, 10.0)
    fit = fit_focus(z, rising, dof_um=8.0)
    assert fit.verdict == Verdict.RAILED, fit.reason
    assert fit.best_z_um is None
    z_fine = np.linspace(-24.0, 24.0, 25)
    narrow = gaussian_curve(z_fine, 0.0, 1.0)
    assert fit_focus(z_fine, narrow, dof_um=8.0).verdict == Verdict.AMBIGUOUS
    assert fit_focus(z_fine, narrow).verdict == Verdict.RESOLVED


@pytest.mark.parametrize("z, s, match", [
    ([0, 1, 2, 3], [1, 2, 3, 4], "at least 5"),
    ([0, 1, 2, 3, 4], [1, 2, np.nan, 4, 5], "finite"),
    ([0, 1, 2, 3, 4], [1, 2, 3, 4], "equal length"),
    ([0, 0, 1, 1, 2], [1, 2, 3, 4, 5], "distinct"),
])
def test_fit_focus_rejects_bad_input(z, s, match):
    with pytest.raises(ValueError, match=match):
        fit_focus(z, s)


def test_fit_focus_sls_zone_plate_scan_is_resolved():
    """Real STXM focus scan (SLS, 715 eV, 35 nm zones): the edge is sharpest at ZP-Z index 16."""
    h5py = pytest.importorskip("h5py")
    path = DATA / "sls-zp-focus-scan" / "Focus_2021-03-16_051.hdf5"
    if not path.exists():
        pytest.skip(f"real data not present: {path}")
    with h5py.File(path, "r") as f:
        lines = f["entry1/counter0/data"][()]
        zp_um = f["entry1/control/zone_plate"][()]
    # Gradient energy along each 25-point line across the edge: a 1-D Brenner score.
    scores = np.sum(np.diff(lines, axis=1) ** 2, axis=1)
    fit = fit_focus(zp_um, scores)
    assert fit.verdict == Verdict.RESOLVED, fit.reason
    assert fit.best_z_um == pytest.approx(-4562.48, abs=3.0)  # the best measured position
    assert fit.uncertainty_um < 3.0  # half a 6 µm scan step


# ---------------------------------------------------------------------------- procedure


def run_autofocus(start_dof: float, *, offset_um: float = 3.0, guard: Guard | None = None,
                  config: AutofocusConfig | None = None, **params: Any
                  ) -> tuple[Done, SimBench]:
    bench = SimBench(sim_params(focus_offset_um=offset_um, **params), guard or default_guard())
    bench.actuators["zp_z_um"].move(offset_um + start_dof * DOF_8KEV)
    done = bench.run(autofocus(bench.guard, ZP, config))
    return done, bench


@pytest.mark.parametrize("start_dof, offset_um, seed", [
    (-2.0, 3.0, 1), (-1.2, -5.0, 2), (0.0, 0.0, 3), (0.7, 4.0, 4), (1.6, -2.0, 5), (2.0, 1.0, 6),
])
def test_autofocus_normal_dose_within_a_tenth_of_the_dof(start_dof, offset_um, seed):
    done, bench = run_autofocus(start_dof, offset_um=offset_um, seed=seed)
    truth = bench.truth()["focus_z_um"]
    res = done.result
    assert done.verdict == Verdict.RESOLVED, done.reason
    assert abs(res["best_z_um"] - truth) <= DOF_8KEV / 10
    assert res["frames_used"] <= 15
    assert res["uncertainty_um"] < DOF_8KEV / 10
    assert bench.actuators["zp_z_um"].position == pytest.approx(res["best_z_um"])
    assert res["start_z_um"] == pytest.approx(offset_um + start_dof * DOF_8KEV)
    assert bench.guard.refusals == []


@pytest.mark.parametrize("start_dof, seed", [(-1.8, 11), (1.5, 12), (0.4, 13)])
def test_autofocus_low_dose_averages_and_stays_within_a_fifth_of_the_dof(start_dof, seed):
    done, bench = run_autofocus(start_dof, seed=seed, flux_counts_per_s=4.0e3)  # ~100 counts/px
    raw_mean = bench.sim.render(bench.current_state(), 0.0)[0].mean() - 100.0
    assert 70 < raw_mean < 150
    truth = bench.truth()["focus_z_um"]
    assert done.verdict == Verdict.RESOLVED, done.reason
    assert abs(done.result["best_z_um"] - truth) <= DOF_8KEV / 5


def test_autofocus_very_low_dose_averages_frames_instead_of_guessing():
    done, bench = run_autofocus(-1.0, seed=52, flux_counts_per_s=0.5e3)  # ~12 counts/px
    truth = bench.truth()["focus_z_um"]
    assert done.verdict == Verdict.RESOLVED, done.reason
    assert abs(done.result["best_z_um"] - truth) <= DOF_8KEV / 5
    assert done.result["frames_used"] > 15
    assert any("frames per point" in log.message for log in bench.logs)


def test_autofocus_blank_sample_is_flat_and_returns_to_start():
    done, bench = run_autofocus(1.0, sample="blank")
    assert done.verdict == Verdict.FLAT, done.reason
    assert done.result["best_z_um"] is None and done.result["uncertainty_um"] is None
    assert bench.actuators["zp_z_um"].position == pytest.approx(done.result["start_z_um"])


@pytest.mark.parametrize("start_dof", [-1.5, 0.0, 1.0])
def test_autofocus_weak_phase_gives_truth_or_ambiguous_never_a_fringe(start_dof):
    done, bench = run_autofocus(start_dof, sample="weak_phase")
    truth = bench.truth()["focus_z_um"]
    if done.verdict == Verdict.RESOLVED:
        assert abs(done.result["best_z_um"] - truth) <= DOF_8KEV / 10
    else:
        assert done.verdict == Verdict.AMBIGUOUS, done.reason
        assert bench.actuators["zp_z_um"].position == pytest.approx(done.result["start_z_um"])


def test_autofocus_expands_once_when_railed():
    done, bench = run_autofocus(-4.5, seed=7)
    truth = bench.truth()["focus_z_um"]
    assert done.verdict == Verdict.RESOLVED, done.reason
    assert abs(done.result["best_z_um"] - truth) <= DOF_8KEV / 10
    assert any("expanding" in log.message for log in bench.logs)


def test_autofocus_railed_at_a_soft_limit_returns_to_start():
    # Focus at +3 µm, but z may not go above -20 µm: the peak lies beyond the limit.
    guard = default_guard(zp_z_um=RoleLimits(-200.0, -20.0, 30.0, 0.05))
    done, bench = run_autofocus(-4.0, guard=guard)
    assert done.verdict == Verdict.RAILED, done.reason
    assert bench.actuators["zp_z_um"].position == pytest.approx(done.result["start_z_um"])
    assert all(m.target <= -20.0 for m in bench.moves)


def test_autofocus_drops_frames_taken_before_the_move_finished():
    bench = SimBench(sim_params(focus_offset_um=2.0, seed=8), default_guard(), leak_stale=True)
    bench.actuators["zp_z_um"].move(2.0 - 1.5 * DOF_8KEV)
    done = bench.run(autofocus(bench.guard, ZP))
    truth = bench.truth()["focus_z_um"]
    assert done.verdict == Verdict.RESOLVED
    assert abs(done.result["best_z_um"] - truth) <= DOF_8KEV / 10
    dropped = [log for log in bench.logs if log.message.startswith("autofocus: dropped")]
    assert len(dropped) >= 10
    assert all("not after the move" in r for log in dropped for r in log.data["reasons"])
    # Every used point sits at a commanded position, none at the stale (previous) one.
    targets = {round(m.target, 6) for m in bench.moves} | {round(done.result["start_z_um"], 6)}
    assert all(round(z, 6) in targets for z, _ in done.result["points"])


def test_autofocus_ioc_disconnect_aborts_with_no_further_puts():
    bench = SimBench(sim_params(), default_guard(), fail_on_move=4)
    done = bench.run(autofocus(bench.guard, ZP))
    assert done.verdict == Verdict.ABORTED
    assert "ConnectionError" in done.reason
    failed_at = next(i for i, c in enumerate(bench.commands)
                     if isinstance(c, Move) and c not in bench.moves)
    assert not any(isinstance(c, Move | Acquire) for c in bench.commands[failed_at + 1:])
    assert len(bench.moves) == 3


def test_autofocus_operator_abort_stops_without_moving():
    bench = SimBench(sim_params(), default_guard())
    bench.abort_on_acquire = 3
    done = bench.run(autofocus(bench.guard, ZP))
    assert done.verdict == Verdict.ABORTED and "operator abort" in done.reason
    last_acquire = max(i for i, c in enumerate(bench.commands) if isinstance(c, Acquire))
    assert not any(isinstance(c, Move) for c in bench.commands[last_acquire:])


def test_autofocus_beam_loss_aborts_and_returns_to_start():
    bench = SimBench(sim_params(), default_guard())
    bench.actuators["zp_z_um"].move(5.0)

    def lose_beam(b: SimBench) -> None:
        if b.frames >= 4:
            b.state = replace(b.state, ring_current_ma=0.0)
    bench.before_frame = lose_beam
    done = bench.run(autofocus(bench.guard, ZP))
    assert done.verdict == Verdict.ABORTED
    assert "beam loss" in done.reason
    assert bench.actuators["zp_z_um"].position == pytest.approx(5.0)


# ---------------------------------------------------------------------------- properties


class ScriptedBench:
    """Answers procedures with synthetic Results whose metric values come from a script."""

    def __init__(self, guard: Guard, positions: dict[str, float], values: list[Any],
                 energy_ev: float = 8000.0) -> None:
        self.guard = guard
        self.position = dict(positions)
        self.values = values
        self.energy_ev = energy_ev
        self.t_ns = 1_000_000_000
        self.seq = 0
        self.moves = 0
        self.done: dict[str, MoveDone] = {}

    def next_value(self) -> Any:
        return self.values[self.seq % len(self.values)] if self.values else None

    def metrics(self) -> dict[str, Any]:
        v = self.next_value()
        return {key: v for key in ("band_power", "uniformity_cv", "na_fill", "centroid_x_px",
                                   "centroid_y_px", "cutoff_per_um")} | {
            "mean_counts": 1000.0, "psd_verdict": "resolved"}

    def handle(self, command: Command) -> Any:
        if isinstance(command, Read):
            return self.position[command.role]
        if isinstance(command, Move):
            # The property: the guard would accept every move a controller proposes.
            self.guard.check(command, self.position[command.role])
            self.moves += 1
            self.position[command.role] = float(command.target)
            self.t_ns += 1_000_000
            done = MoveDone(command.role, command.target, float(command.target), self.t_ns)
            self.done[command.role] = done
            return done
        if isinstance(command, Acquire):
            out = []
            for _ in range(command.n_frames):
                self.t_ns += 1_000_000
                self.seq += 1
                out.append({"seq": self.seq, "t_ns": self.t_ns, "moving": False,
                            "positions": dict(self.position), "energy_ev": self.energy_ev,
                            "exposure_s": 0.05, "metrics": self.metrics(),
                            "metrics_seq": self.seq})
            return out
        return None


metric_values = st.lists(
    st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
              st.floats(min_value=-1e-3, max_value=1e-2)), min_size=1, max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=metric_values, start=st.floats(-150.0, 150.0),
       max_step=st.floats(0.5, 40.0), high=st.floats(-100.0, 200.0))
def test_property_autofocus_never_commands_outside_limits_or_above_max_step(
        values, start, max_step, high):
    low = -200.0
    start = min(start, high)
    guard = default_guard(zp_z_um=RoleLimits(low, max(high, low + 1.0), max_step, 0.05))
    bench = ScriptedBench(guard, {"zp_z_um": min(start, max(high, low + 1.0))}, values)
    done = drive(autofocus(guard, ZP), bench.handle)
    assert isinstance(done.verdict, Verdict)
    assert guard.refusals == []
    if done.verdict != Verdict.RESOLVED:
        assert done.result["best_z_um"] is None
    assert math.isfinite(bench.position["zp_z_um"])
