"""Focus tracking over energy: optics formulas, the thin-lens focus model, the energy scan."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.simbench import SimBench, default_guard, sim_params
from feedback.autofocus import autofocus
from feedback.commands import Verdict, drive
from feedback.focus_tracking import (
    FocusModel,
    TrackingConfig,
    energy_scan,
    fit_focus_model,
)
from feedback.optics import ZonePlate
from feedback.safety import RoleLimits
from hw.sim import optics as sim_optics
from stream import optics as zp_optics
from tests.feedback_bench import ScriptedBench, metric_values

ZP = ZonePlate()


def test_optics_known_values_and_bad_input():
    assert zp_optics.depth_of_focus_um(8000.0, 25.0) == pytest.approx(8.0656, abs=1e-4)
    assert ZP.dof_um(8000.0) == zp_optics.depth_of_focus_um(8000.0, 25.0)
    with pytest.raises(ValueError, match="energy_ev"):
        zp_optics.wavelength_nm(-1.0)
    with pytest.raises(ValueError, match="energy_ev must be a number"):
        zp_optics.wavelength_nm("8 keV")
    with pytest.raises(ValueError, match="shorter than 4 focal lengths"):
        zp_optics.in_focus_zp_um(14000.0, 125.0, 25.0, 1e4)
    with pytest.raises(ValueError, match="dr_nm"):
        ZonePlate(dr_nm=0.0)


def true_focus_um(energy_ev: float, dr_nm: float = 25.4, offset_um: float = 3.0,
                  reference_ev: float = 8000.0) -> float:
    """The simulator's in-focus ZP motor position (its convention: 0 in focus at 8 keV)."""
    p = sim_optics.in_focus_zp_um(energy_ev, 125.0, dr_nm, 700e3)
    return p - sim_optics.in_focus_zp_um(reference_ev, 125.0, dr_nm, 700e3) + offset_um


def test_thin_lens_model_recovers_the_zone_width_and_offset():
    points = [(e, true_focus_um(e)) for e in (7000.0, 8300.0, 11000.0)]
    model = fit_focus_model(points, ZP)
    assert model.kind == "thin_lens"
    assert model.zone_plate.dr_nm == pytest.approx(25.4, rel=1e-6)
    assert model.residual_rms_um < 1e-4
    for energy in np.linspace(5000.0, 14000.0, 19):
        assert model.zp_z_um(energy) == pytest.approx(true_focus_um(energy), abs=1e-3)
    assert model.as_dict()["dr_nm"] == pytest.approx(25.4, rel=1e-6)


def test_two_points_thin_lens_extrapolates_where_the_linear_rule_fails():
    points = [(8250.0, true_focus_um(8250.0)), (8350.0, true_focus_um(8350.0))]
    thin = fit_focus_model(points, ZP)
    line = fit_focus_model(points, ZP, kind="linear")
    # Within the calibrated 100 eV both are exact to far below the DOF ...
    for energy in np.linspace(8250.0, 8350.0, 11):
        dof = ZP.dof_um(energy)
        assert abs(thin.zp_z_um(energy) - true_focus_um(energy)) < 1e-3 * dof
        assert abs(line.zp_z_um(energy) - true_focus_um(energy)) < 0.01 * dof
    # ... but a XANES scan 1 keV away leaves the line out of focus while the lens model holds.
    energy = 9300.0
    dof = ZP.dof_um(energy)
    assert abs(line.zp_z_um(energy) - true_focus_um(energy)) > dof / 5
    assert abs(thin.zp_z_um(energy) - true_focus_um(energy)) < dof / 50


def test_tracking_over_100_ev_stays_within_a_fifth_of_the_dof_with_noisy_calibration():
    rng = np.random.default_rng(7)
    energies = np.arange(8250.0, 8350.1, 5.0)
    worst = 0.0
    for _ in range(200):
        dr_true = rng.uniform(24.5, 25.5)
        offset = rng.uniform(-20.0, 20.0)
        # Calibration by autofocus (±0.3 µm, several times what fit_focus achieves).
        points = [(e, true_focus_um(e, dr_true, offset) + rng.normal(0.0, 0.3))
                  for e in (8250.0, 8350.0)]
        model = fit_focus_model(points, ZP)
        for energy in energies:
            error = abs(model.zp_z_um(energy) - true_focus_um(energy, dr_true, offset))
            worst = max(worst, error / ZP.dof_um(energy))
    assert worst < 0.2


def test_model_direction_and_bad_points():
    points = [(e, -true_focus_um(e)) for e in (8000.0, 9000.0)]
    model = fit_focus_model(points, ZP, direction=-1)
    assert model.zp_z_um(8500.0) == pytest.approx(-true_focus_um(8500.0), abs=1e-3)
    with pytest.raises(ValueError, match="2 distinct energies"):
        fit_focus_model([(8000.0, 1.0), (8000.0, 2.0)], ZP)
    with pytest.raises(ValueError, match="finite"):
        fit_focus_model([(8000.0, 1.0), (8100.0, math.nan)], ZP)
    with pytest.raises(ValueError, match="kind"):
        fit_focus_model([(8000.0, 1.0), (8100.0, 2.0)], ZP, kind="spline")
    with pytest.raises(ValueError, match="energies"):
        energy_scan(default_guard(), model, [])


def scan_bench(offset_um: float = 4.0, seed: int = 5) -> SimBench:
    guard = default_guard(zp_z_um=RoleLimits(-2000.0, 2000.0, 30.0, 0.05))
    bench = SimBench(sim_params(focus_offset_um=offset_um, seed=seed), guard)
    bench.actuators["energy_ev"].move(8250.0)
    return bench


def calibrate(bench: SimBench, energies: tuple[float, ...]) -> FocusModel:
    """Autofocus at each energy on the simulator; the resolved positions calibrate the model."""
    points = []
    for energy in energies:
        bench.actuators["energy_ev"].move(energy)
        # The operator starts each calibration near focus (here 1 DOF off).
        bench.actuators["zp_z_um"].move(true_focus_in(bench, energy) + ZP.dof_um(energy))
        done = bench.run(autofocus(bench.guard, ZP))
        assert done.verdict == Verdict.RESOLVED, done.reason
        points.append((energy, done.result["best_z_um"]))
    return fit_focus_model(points, ZP)


def true_focus_in(bench: SimBench, energy_ev: float) -> float:
    return bench.sim.optics_truth(replace(bench.current_state(), energy_ev=energy_ev))[
        "focus_z_um"]


def test_energy_scan_on_the_simulator_keeps_focus_and_refocuses_only_when_needed():
    bench = scan_bench()
    model = calibrate(bench, (8250.0, 8350.0))
    energies = np.arange(8250.0, 8350.1, 10.0)
    done = bench.run(energy_scan(bench.guard, model, energies))
    assert done.verdict == Verdict.RESOLVED, done.reason
    steps = done.result["steps"]
    assert [s["energy_ev"] for s in steps] == pytest.approx(list(energies))
    for step in steps:
        dof = ZP.dof_um(step["energy_ev"])
        assert abs(step["zp_z_um"] - true_focus_in(bench, step["energy_ev"])) <= dof / 5
    # The first energy is confirmed by design; no score drop anywhere else.
    assert done.result["refocus_events"] == [8250.0]
    ratios = [s["magnification_ratio"] for s in steps]
    assert ratios[0] == 1.0 and all(np.diff(ratios) < 0)  # magnification falls with energy
    assert ratios[-1] == pytest.approx(ZP.magnification(8350.0) / ZP.magnification(8250.0),
                                       rel=1e-3)
    assert bench.guard.refusals == []


def test_energy_scan_refocuses_after_a_focus_jump_and_learns():
    bench = scan_bench(seed=9)
    model = calibrate(bench, (8250.0, 8350.0))
    jumped = []

    def thermal_jump(b: SimBench) -> None:
        if not jumped and b.actuators["energy_ev"].position >= 8295.0:
            b.sim.params = replace(b.sim.params,
                                   focus_offset_um=b.sim.params.focus_offset_um + 2.0 * 8.3)
            jumped.append(b.actuators["energy_ev"].position)
    bench.before_frame = thermal_jump
    done = bench.run(energy_scan(bench.guard, model, np.arange(8250.0, 8350.1, 10.0),
                                 TrackingConfig(refocus_first=False)))
    assert done.verdict == Verdict.RESOLVED, done.reason
    assert done.result["refocus_events"] == [jumped[0]]
    for step in done.result["steps"]:
        if step["energy_ev"] >= jumped[0]:
            dof = ZP.dof_um(step["energy_ev"])
            assert abs(step["zp_z_um"] - true_focus_in(bench, step["energy_ev"])) <= dof / 5
    assert len(done.result["model"]["points"]) == 3


def test_energy_scan_aborts_on_disconnect_without_further_puts():
    bench = scan_bench()
    model = fit_focus_model([(8250.0, 4.0), (8350.0, 4.0 + 262.0)], ZP)
    bench.fail_on_move = 3
    done = bench.run(energy_scan(bench.guard, model, [8250.0, 8260.0, 8270.0],
                                 TrackingConfig(refocus_first=False)))
    assert done.verdict == Verdict.ABORTED and "ConnectionError" in done.reason
    assert len(bench.moves) == 2


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=metric_values, zp_max_step=st.floats(1.0, 50.0),
       energy_max_step=st.floats(1.0, 50.0), zp_high=st.floats(-10.0, 300.0))
def test_property_energy_scan_never_commands_outside_limits_or_above_max_step(
        values, zp_max_step, energy_max_step, zp_high):
    guard = default_guard(zp_z_um=RoleLimits(-200.0, zp_high, zp_max_step, 0.05),
                          energy_ev=RoleLimits(8000.0, 8600.0, energy_max_step, 0.05))
    model = fit_focus_model([(8250.0, 3.0), (8350.0, 265.0)], ZP)
    bench = ScriptedBench(guard, {"zp_z_um": -10.0, "energy_ev": 8240.0}, values)
    done = drive(energy_scan(guard, model, np.arange(8250.0, 8300.1, 25.0)), bench.handle)
    assert isinstance(done.verdict, Verdict)
    assert guard.refusals == []
