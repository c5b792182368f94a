"""Zone-plate optics: the formulas the controllers and the simulator share, in one place.

Lengths in µm unless the name says otherwise, energies in eV. The defaults describe the
BL18B-style objective (D = 125 µm, Δr = 25 nm) and a 700 mm sample–detector distance.

- wavelength ``λ[nm] = 1239.84 / E[eV]``;
- focal length ``f = D·Δr/λ`` (grows linearly with E); ``NA = λ/(2Δr)``;
- depth of focus ``±2Δr²/λ`` (±8.07 µm at 8 keV for Δr = 25 nm);
- thin lens with a fixed sample–detector distance ``L``: the ZP–sample distance ``p`` that
  focuses the sample on the detector solves ``1/p + 1/(L − p) = 1/f``; the magnifying root is
  ``p = 2Lf / (L + √(L² − 4Lf))`` and the magnification is ``M = (L − p)/p``. Both change with
  energy, as at a real TXM.

:mod:`hw.sim.optics` builds the simulator's imaging model on these; :mod:`feedback.optics`
holds the controllers' :class:`~feedback.optics.ZonePlate`.
"""

from __future__ import annotations

import math

HC_EV_NM = 1239.84
"""h·c in eV·nm: λ[nm] = HC_EV_NM / E[eV]."""


def positive(name: str, value: float) -> float:
    """``value`` as a float, or ``ValueError`` naming ``name`` unless finite and > 0."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def wavelength_nm(energy_ev: float) -> float:
    """Photon wavelength in nm: ``1239.84 / E``.

    Parameters
    ----------
    energy_ev : float
        Photon energy, eV.
    """
    return HC_EV_NM / positive("energy_ev", energy_ev)


def focal_length_um(energy_ev: float, diameter_um: float = 125.0, dr_nm: float = 25.0) -> float:
    """Zone-plate focal length ``f = D·Δr/λ`` in µm (linear in energy).

    Parameters
    ----------
    energy_ev : float
        Photon energy, eV.
    diameter_um : float
        Zone-plate diameter D, µm.
    dr_nm : float
        Outermost zone width Δr, nm.
    """
    return (positive("diameter_um", diameter_um) * positive("dr_nm", dr_nm)
            / wavelength_nm(energy_ev))


def numerical_aperture(energy_ev: float, dr_nm: float = 25.0) -> float:
    """Zone-plate numerical aperture ``NA = λ/(2Δr)`` (dimensionless)."""
    return wavelength_nm(energy_ev) / (2.0 * positive("dr_nm", dr_nm))


def depth_of_focus_um(energy_ev: float, dr_nm: float = 25.0) -> float:
    """Half-width of the depth of focus, ``2Δr²/λ``, in µm (the DOF is ± this)."""
    dr = positive("dr_nm", dr_nm)
    return 2.0 * dr * dr / wavelength_nm(energy_ev) * 1e-3


def in_focus_zp_um(energy_ev: float, diameter_um: float = 125.0, dr_nm: float = 25.0,
                   sample_detector_um: float = 700e3) -> float:
    """In-focus ZP object distance ``p`` (ZP to sample), µm, for a fixed sample–detector ``L``.

    Solves ``1/p + 1/(L − p) = 1/f`` for the root near the sample (the magnifying one).

    Raises
    ------
    ValueError
        When ``L < 4f``: no ZP position focuses the sample onto the detector.
    """
    length = positive("sample_detector_um", sample_detector_um)
    f = focal_length_um(energy_ev, diameter_um, dr_nm)
    disc = length * length - 4.0 * length * f
    if disc < 0:
        raise ValueError(
            f"sample_detector_um={length:g} is shorter than 4 focal lengths "
            f"({4 * f:g} µm at {energy_ev:g} eV): no in-focus ZP position exists")
    return 2.0 * length * f / (length + math.sqrt(disc))


def magnification(energy_ev: float, diameter_um: float = 125.0, dr_nm: float = 25.0,
                  sample_detector_um: float = 700e3) -> float:
    """X-ray magnification ``M = (L − p)/p`` of the in-focus ZP at this energy."""
    p = in_focus_zp_um(energy_ev, diameter_um, dr_nm, sample_detector_um)
    return (sample_detector_um - p) / p
