"""The objective zone plate as the controllers see it.

:class:`ZonePlate` bundles the optics settings of ``[feedback]`` (D, Δr, sample–detector L)
and answers the depth of focus, the in-focus ZP–sample distance and the magnification at an
energy, through the shared formulas of :mod:`stream.optics` (the simulator uses the same).
Lengths in µm unless the name says otherwise, energies in eV.
"""

from __future__ import annotations

from dataclasses import dataclass

from stream.optics import depth_of_focus_um, in_focus_zp_um, magnification, positive


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
            positive(f"ZonePlate.{name}", getattr(self, name))

    def dof_um(self, energy_ev: float) -> float:
        """Half-width of the depth of focus at ``energy_ev``, µm."""
        return depth_of_focus_um(energy_ev, self.dr_nm)

    def focus_distance_um(self, energy_ev: float) -> float:
        """In-focus ZP–sample distance at ``energy_ev``, µm."""
        return in_focus_zp_um(energy_ev, self.diameter_um, self.dr_nm, self.sample_detector_um)

    def magnification(self, energy_ev: float) -> float:
        """X-ray magnification of the in-focus zone plate at ``energy_ev``."""
        return magnification(energy_ev, self.diameter_um, self.dr_nm, self.sample_detector_um)
