"""The few zone-plate optics formulas the controllers need, in one place.

Controllers must not import the simulator (:mod:`hw.sim`), so the formulas they use live
here; ``tests/test_focus_tracking.py`` checks that they agree with :mod:`hw.sim.optics`.

- wavelength ``λ[nm] = 1239.84 / E[eV]``;
- zone-plate focal length ``f = D·Δr/λ`` (linear in energy);
- depth of focus ``±2Δr²/λ`` (±8.07 µm at 8 keV for Δr = 25 nm);
- thin lens with a fixed sample–detector distance ``L``: the ZP–sample distance ``p`` that
  focuses the sample on the detector solves ``1/p + 1/(L − p) = 1/f``; the magnifying root is
  ``p = 2Lf / (L + √(L² − 4Lf))`` and the magnification is ``M = (L − p)/p``.

Lengths in µm unless the name says otherwise, energies in eV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

HC_EV_NM = 1239.84
"""h·c in eV·nm: λ[nm] = HC_EV_NM / E[eV]."""


def _positive(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return value


def wavelength_nm(energy_ev: float) -> float:
    """Photon wavelength, nm, of a photon energy in eV."""
    return HC_EV_NM / _positive("energy_ev", energy_ev)


def depth_of_focus_um(energy_ev: float, dr_nm: float) -> float:
    """Half-width of the zone plate's depth of focus, ``2Δr²/λ``, µm (the DOF is ± this).

    Parameters
    ----------
    energy_ev : float
        Photon energy, eV.
    dr_nm : float
        Outermost zone width Δr, nm.
    """
    dr = _positive("dr_nm", dr_nm)
    return 2.0 * dr * dr / wavelength_nm(energy_ev) * 1e-3


def focal_length_um(energy_ev: float, diameter_um: float, dr_nm: float) -> float:
    """Zone-plate focal length ``f = D·Δr/λ``, µm."""
    return (_positive("diameter_um", diameter_um) * _positive("dr_nm", dr_nm)
            / wavelength_nm(energy_ev))


def in_focus_distance_um(energy_ev: float, diameter_um: float, dr_nm: float,
                         sample_detector_um: float) -> float:
    """ZP–sample distance ``p`` that images the sample onto the detector, µm.

    Parameters
    ----------
    energy_ev : float
        Photon energy, eV.
    diameter_um, dr_nm : float
        Zone-plate diameter D (µm) and outermost zone width Δr (nm).
    sample_detector_um : float
        Fixed sample–detector distance L, µm.

    Raises
    ------
    ValueError
        When ``L < 4f``: no ZP position focuses the sample onto the detector.
    """
    length = _positive("sample_detector_um", sample_detector_um)
    f = focal_length_um(energy_ev, diameter_um, dr_nm)
    disc = length * length - 4.0 * length * f
    if disc < 0:
        raise ValueError(f"sample_detector_um={length:g} is shorter than 4 focal lengths "
                         f"({4 * f:g} µm at {energy_ev:g} eV): no in-focus ZP position")
    return 2.0 * length * f / (length + math.sqrt(disc))


def magnification(energy_ev: float, diameter_um: float, dr_nm: float,
                  sample_detector_um: float) -> float:
    """X-ray magnification ``M = (L − p)/p`` of the in-focus zone plate."""
    p = in_focus_distance_um(energy_ev, diameter_um, dr_nm, sample_detector_um)
    return (sample_detector_um - p) / p


@dataclass(frozen=True)
class ZonePlate:
    """The objective zone plate and the fixed sample–detector geometry.

    Attributes
    ----------
    diameter_um : float
        Zone-plate diameter D, µm.
    dr_nm : float
        Outermost zone width Δr, nm.
    sample_detector_um : float
        Fixed sample–detector (scintillator) distance L, µm.
    """

    diameter_um: float = 125.0
    dr_nm: float = 25.0
    sample_detector_um: float = 700e3

    def __post_init__(self) -> None:
        for name in ("diameter_um", "dr_nm", "sample_detector_um"):
            _positive(f"ZonePlate.{name}", getattr(self, name))

    def dof_um(self, energy_ev: float) -> float:
        """Half-width of the depth of focus at ``energy_ev``, µm."""
        return depth_of_focus_um(energy_ev, self.dr_nm)

    def focus_distance_um(self, energy_ev: float) -> float:
        """In-focus ZP–sample distance at ``energy_ev``, µm."""
        return in_focus_distance_um(energy_ev, self.diameter_um, self.dr_nm,
                                    self.sample_detector_um)

    def magnification(self, energy_ev: float) -> float:
        """X-ray magnification of the in-focus zone plate at ``energy_ev``."""
        return magnification(energy_ev, self.diameter_um, self.dr_nm, self.sample_detector_um)
