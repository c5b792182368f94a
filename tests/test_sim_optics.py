"""Zone-plate and thin-lens optics of the simulated TXM (hw.sim.optics)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hw.sim import optics

L_UM = 700e3
ENERGIES = (5000.0, 6500.0, 8000.0, 11000.0, 14000.0)


def test_wavelength_and_numerical_aperture_at_8_kev() -> None:
    assert optics.wavelength_nm(8000.0) == pytest.approx(0.15498, rel=1e-4)
    assert optics.numerical_aperture(8000.0, 25.0) == pytest.approx(0.15498 / 50.0, rel=1e-4)


def test_focal_length_is_d_dr_over_lambda_and_linear_in_energy() -> None:
    f8 = optics.focal_length_um(8000.0, 125.0, 25.0)
    assert f8 == pytest.approx(125.0 * 25.0 / (1239.84 / 8000.0))
    assert f8 == pytest.approx(20164.0, rel=1e-4)  # ~20.2 mm
    for energy in ENERGIES:
        assert optics.focal_length_um(energy) == pytest.approx(f8 * energy / 8000.0)
    assert optics.focal_length_um(8000.0, 250.0, 40.0) == pytest.approx(f8 * 2 * 40 / 25)


def test_depth_of_focus_is_8_um_at_8_kev_for_25_nm_zones() -> None:
    assert optics.depth_of_focus_um(8000.0, 25.0) == pytest.approx(8.0, rel=0.01)
    assert optics.depth_of_focus_um(8000.0, 25.0) == pytest.approx(2 * 25.0 ** 2 / 0.15498e3,
                                                                   rel=1e-4)
    # grows linearly with energy and with the square of the zone width
    assert optics.depth_of_focus_um(16000.0, 25.0) == pytest.approx(
        2 * optics.depth_of_focus_um(8000.0, 25.0))
    assert optics.depth_of_focus_um(8000.0, 50.0) == pytest.approx(
        4 * optics.depth_of_focus_um(8000.0, 25.0))


@pytest.mark.parametrize("energy", ENERGIES)
def test_in_focus_position_solves_the_thin_lens_equation(energy: float) -> None:
    f = optics.focal_length_um(energy)
    p = optics.in_focus_zp_um(energy, sample_detector_um=L_UM)
    assert 1.0 / p + 1.0 / (L_UM - p) == pytest.approx(1.0 / f, rel=1e-12)
    assert f < p < 2 * f  # the magnifying root, near the sample
    m = optics.magnification(energy, sample_detector_um=L_UM)
    assert m == pytest.approx((L_UM - p) / p)
    assert optics.defocus_um(p, energy, sample_detector_um=L_UM) == pytest.approx(0.0, abs=1e-6)


def test_focus_and_magnification_move_with_energy() -> None:
    p = [optics.in_focus_zp_um(e) for e in ENERGIES]
    m = [optics.magnification(e) for e in ENERGIES]
    assert np.all(np.diff(p) > 0), "the in-focus ZP moves away from the sample as f grows"
    assert np.all(np.diff(m) < 0), "magnification falls with energy at a fixed L"
    # 8 -> 9 keV moves the focus by about Δf (1 + 2/M) ≈ 2.7 mm
    df = optics.focal_length_um(9000.0) - optics.focal_length_um(8000.0)
    dp = optics.in_focus_zp_um(9000.0) - optics.in_focus_zp_um(8000.0)
    assert dp == pytest.approx(df * (1 + 2 / optics.magnification(8000.0)), rel=0.01)


def test_pixel_sizes_of_the_two_modes() -> None:
    high = optics.pixel_nm(8000.0, 20.0)
    assert high == pytest.approx(10.0, rel=0.01)
    assert high == pytest.approx(6500.0 / (optics.magnification(8000.0) * 20.0))
    assert optics.pixel_nm(8000.0, 20.0 / 3.0) == pytest.approx(30.0, rel=0.01)
    nyquist_per_um = 1.0 / (2 * high * 1e-3)
    assert optics.cutoff_per_um(25.0, 1.0) < nyquist_per_um
    pixels = [optics.pixel_nm(e, 20.0) for e in ENERGIES]
    assert np.all(np.diff(pixels) > 0)


def test_defocus_is_the_distance_to_the_plane_conjugate_to_the_detector() -> None:
    energy = 8000.0
    p0 = optics.in_focus_zp_um(energy)
    m = optics.magnification(energy)
    f = optics.focal_length_um(energy)
    for dp in (-20.0, -3.0, 0.5, 8.0, 40.0):
        z = optics.defocus_um(p0 + dp, energy)
        q = p0 + dp - z  # the imaged plane, measured from the ZP
        assert 1 / q + 1 / (L_UM - p0 - dp) == pytest.approx(1 / f, rel=1e-12)
        assert z == pytest.approx(dp * (1 - 1 / m ** 2), rel=1e-3)
    with pytest.raises(ValueError, match="focal length"):
        optics.defocus_um(L_UM - f / 2, energy)


def test_cutoff_and_resolution() -> None:
    assert optics.cutoff_per_um(25.0, 0.0) == pytest.approx(20.0)
    assert optics.cutoff_per_um(25.0, 1.0) == pytest.approx(40.0)
    assert optics.cutoff_per_um(40.0, 1.0) == pytest.approx(25.0)
    assert optics.resolution_nm(8000.0, 25.0, 1.0, 0.0) == pytest.approx(12.5)
    assert optics.resolution_nm(8000.0, 25.0, 0.0, 0.0) == pytest.approx(25.0)
    # blur 2σ·NA·|z|: at the DOF edge and full fill it is 2Δr = 50 nm
    dof = optics.depth_of_focus_um(8000.0, 25.0)
    assert optics.blur_diameter_um(8000.0, 25.0, 1.0, dof) == pytest.approx(0.050)
    assert optics.resolution_nm(8000.0, 25.0, 1.0, dof) == pytest.approx(
        math.hypot(12.5, 50.0 / 2.44))
    res = [optics.resolution_nm(8000.0, 25.0, 1.0, z) for z in (0, 2, 5, 10, 20)]
    assert np.all(np.diff(res) > 0)


def test_pupil_transfer_limits() -> None:
    rho = np.linspace(0.0, 50.0, 501)
    # full fill: the incoherent OTF of a circular pupil ("chinese hat") with cut-off 1/Δr
    nu = np.clip(rho / 40.0, 0, 1)
    hat = 2 / np.pi * (np.arccos(nu) - nu * np.sqrt(1 - nu ** 2))
    np.testing.assert_allclose(optics.pupil_transfer(rho, 25.0, 1.0), hat, atol=1e-9)
    # no fill: the coherent top-hat at 1/(2Δr)
    np.testing.assert_array_equal(optics.pupil_transfer(rho, 25.0, 0.0), rho < 20.0)
    # partial fill: flat to (1-σ)/(2Δr), zero from (1+σ)/(2Δr), monotonic in between
    part = optics.pupil_transfer(rho, 25.0, 0.5)
    assert np.all(part[rho <= 10.0] == 1.0) and np.all(part[rho >= 30.0] == 0.0)
    assert np.all(np.diff(part) <= 1e-12)


def test_transfer_functions_in_focus_and_defocused() -> None:
    rho = np.linspace(0.0, 45.0, 451)
    h_abs, h_phase = optics.transfer_functions(rho, 8000.0, 25.0, 1.0, 0.0)
    np.testing.assert_allclose(h_abs, optics.pupil_transfer(rho, 25.0, 1.0))
    np.testing.assert_array_equal(h_phase, 0.0)  # a phase object is invisible in focus
    h_abs, h_phase = optics.transfer_functions(rho, 8000.0, 25.0, 1.0, 4.0)
    assert h_abs[0] == pytest.approx(1.0)
    assert np.abs(h_phase).max() > 0.3
    band = (rho > 20) & (rho < 35)
    assert np.abs(h_abs[band]).mean() < 0.5 * optics.pupil_transfer(rho[band], 25.0, 1.0).mean()
    env = optics.defocus_envelope(np.array([0.0, 1.22 / 0.05]), 8000.0, 25.0, 1.0,
                                  optics.depth_of_focus_um(8000.0, 25.0))
    assert env[0] == pytest.approx(1.0) and env[1] == pytest.approx(0.0, abs=2e-3)


@pytest.mark.parametrize("call", [
    lambda: optics.wavelength_nm(0.0),
    lambda: optics.wavelength_nm(float("nan")),
    lambda: optics.focal_length_um(8000.0, -1.0),
    lambda: optics.depth_of_focus_um(8000.0, 0.0),
    lambda: optics.cutoff_per_um(25.0, 1.5),
    lambda: optics.in_focus_zp_um(8000.0, sample_detector_um=50e3),
])
def test_bad_input_raises(call) -> None:
    with pytest.raises(ValueError):
        call()
