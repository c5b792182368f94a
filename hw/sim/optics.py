"""Optics of the simulated TXM: photon energy, zone plate, thin-lens geometry, resolution.

Everything here is a small pure function of explicit arguments (lengths in µm unless the name
says otherwise, energies in eV, spatial frequencies in µm⁻¹). The zone-plate and thin-lens
formulas are those of :mod:`stream.optics` (shared with the controllers), re-exported here.

Zone plate (ZP)
---------------
λ[nm] = 1239.84 / E[eV]; focal length ``f = D·Δr/λ`` (grows linearly with E);
``NA = λ / (2Δr)``; depth of focus ``±2Δr²/λ`` (±8.07 µm at 8 keV for Δr = 25 nm).

Thin-lens imaging with a fixed sample–detector distance
-------------------------------------------------------
The sample and the detector (scintillator) are a fixed distance ``L`` apart and the ZP sits
between them at an object distance ``p`` from the sample. The detector is in focus when
``1/p + 1/(L − p) = 1/f``; of the two roots the one near the sample,
``p = 2Lf / (L + √(L² − 4Lf))``, magnifies: ``M = (L − p)/p``. Both the in-focus ``p`` and
``M`` change with energy, as at a real TXM. The scintillator image is relayed to the camera by
a visible-light objective of magnification ``M_obj`` (20× in the high-resolution mode, 6.67×
in the medium mode in :mod:`hw.sim.detector`), so the effective pixel is
``pixel = camera pixel / (M · M_obj)``. With ``L = 700 mm``, ``D = 125 µm``, ``Δr = 25 nm``
and a 6.5 µm camera pixel that is 9.94 nm at 8 keV (``M = 32.7``) and 29.8 nm in the medium
mode; it grows with energy (18.3 nm at 14 keV, 6.07 nm at 5 keV) because ``M`` falls.

When the ZP is away from focus, the plane imaged sharply onto the detector is no longer the
sample plane: the plane conjugate to the detector lies at ``q`` from the ZP with
``1/q = 1/f − 1/(L − p)``, a distance ``z = p − q`` downstream of the sample (positive when the
ZP is farther from the sample than in focus). ``z`` is the defocus of the image: the sample's
exit wave propagates over ``z`` before it is imaged. ``z ≈ Δp (1 − 1/M²)`` near focus.

Resolution
----------
The condenser fills a fraction σ (0…1) of the ZP aperture. For a weak object the partially
coherent (Hopkins) transfer is the overlap of the pupil disc (radius ``NA/λ = 1/(2Δr)``) with
the condenser disc (radius ``σ·NA/λ``) shifted by the spatial frequency ``ρ``, divided by the
condenser disc's area: 1 up to ``(1 − σ)/(2Δr)`` and 0 from the cut-off
``f_c = (1 + σ)/(2Δr)`` on (the incoherent "chinese hat" at σ = 1, the coherent top-hat at
σ = 0). Defocus multiplies it by the Fresnel contrast transfer — ``cos χ`` for absorption and
``2 sin χ`` for phase, ``χ = πλzρ²`` — and by the source-size envelope
``2 J₁(x)/x, x = π b ρ``, which is the OTF of a uniform disc of diameter ``b = 2σ·NA·|z|``: the
geometric blur of the illumination cone. At full fill (σ = 1, the default shaker setting) this
is the geometric defocus blur ``2·NA·|z|`` of the ZP; a partly filled condenser is more
coherent, blurs less and rings more (the physics of closing a condenser aperture).

The ground-truth resolution is the half-period ``1/(2 f_c)`` of the in-focus cut-off combined
in quadrature with the half-period ``b/2.44`` of the defocus blur disc (first zero of its OTF at
``1.22/b``). It is the model's limit, not what a PSD measures at a finite signal-to-noise ratio.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import j1

from stream.optics import (
    depth_of_focus_um,
    focal_length_um,
    in_focus_zp_um,
    magnification,
    numerical_aperture,
    positive,
    wavelength_nm,
)

# The zone-plate formulas have one home (stream.optics); they are part of this model's API.
__all__ = [
    "blur_diameter_um", "cutoff_per_um", "defocus_envelope", "defocus_um", "depth_of_focus_um",
    "focal_length_um", "in_focus_zp_um", "magnification", "numerical_aperture", "pixel_nm",
    "pupil_transfer", "resolution_nm", "transfer_functions", "wavelength_nm",
]


def _fill(fill: float) -> float:
    fill = float(fill)
    if not 0.0 <= fill <= 1.0:
        raise ValueError(f"condenser fill must be in [0, 1], got {fill!r}")
    return fill


def pixel_nm(energy_ev: float, objective_mag: float = 20.0, diameter_um: float = 125.0,
             dr_nm: float = 25.0, sample_detector_um: float = 700e3,
             camera_pixel_um: float = 6.5) -> float:
    """Effective pixel at the sample, nm: ``camera pixel / (M · M_obj)``.

    Parameters
    ----------
    objective_mag : float
        Magnification of the visible-light objective behind the scintillator.
    camera_pixel_um : float
        Camera pixel pitch, µm.
    """
    m_total = (magnification(energy_ev, diameter_um, dr_nm, sample_detector_um)
               * positive("objective_mag", objective_mag))
    return positive("camera_pixel_um", camera_pixel_um) * 1e3 / m_total


def defocus_um(zp_object_um: float, energy_ev: float, diameter_um: float = 125.0,
               dr_nm: float = 25.0, sample_detector_um: float = 700e3) -> float:
    """Distance from the sample to the plane imaged sharply on the detector, µm.

    Parameters
    ----------
    zp_object_um : float
        Actual ZP–sample distance ``p``, µm.

    Returns
    -------
    float
        ``z = p − q`` with ``1/q = 1/f − 1/(L − p)``: 0 in focus, positive when the ZP is
        farther from the sample than in focus (the imaged plane lies downstream).

    Raises
    ------
    ValueError
        When the ZP is so far off that no real plane is conjugate to the detector.
    """
    p = positive("zp_object_um", zp_object_um)
    length = positive("sample_detector_um", sample_detector_um)
    f = focal_length_um(energy_ev, diameter_um, dr_nm)
    image_um = length - p
    if image_um <= f:
        raise ValueError(
            f"ZP at {p:g} µm from the sample is within one focal length ({f:g} µm) of the "
            "detector: no image is formed")
    q = 1.0 / (1.0 / f - 1.0 / image_um)
    return p - q


def cutoff_per_um(dr_nm: float, fill: float) -> float:
    """Partially coherent cut-off ``f_c = (1 + σ)/(2Δr)`` in µm⁻¹ (40 µm⁻¹ at Δr 25 nm, σ 1)."""
    return (1.0 + _fill(fill)) / (2.0 * positive("dr_nm", dr_nm) * 1e-3)


def blur_diameter_um(energy_ev: float, dr_nm: float, fill: float, defocus: float) -> float:
    """Diameter ``b = 2σ·NA·|z|`` of the defocus blur disc at the sample, µm."""
    return 2.0 * _fill(fill) * numerical_aperture(energy_ev, dr_nm) * abs(float(defocus))


def resolution_nm(energy_ev: float, dr_nm: float, fill: float, defocus: float) -> float:
    """Ground-truth half-period resolution, nm: ``1/(2 f_c)`` ⊕ ``b/2.44`` in quadrature.

    Parameters
    ----------
    defocus : float
        Defocus ``z`` of the image (see :func:`defocus_um`), µm.
    """
    in_focus_um = 0.5 / cutoff_per_um(dr_nm, fill)
    blur_um = blur_diameter_um(energy_ev, dr_nm, fill, defocus) / 2.44
    return math.hypot(in_focus_um, blur_um) * 1e3


def pupil_transfer(rho_per_um: np.ndarray, dr_nm: float, fill: float) -> np.ndarray:
    """In-focus partially coherent transfer at spatial frequency ``ρ`` (weak-object Hopkins).

    The area of the pupil disc (radius ``R = 1/(2Δr)``) that overlaps the condenser disc
    (radius ``σR``) shifted by ``ρ``, over the condenser disc's area.

    Parameters
    ----------
    rho_per_um : ndarray, any shape
        Spatial frequency magnitudes, µm⁻¹.

    Returns
    -------
    ndarray, same shape, float64
        1 for ``ρ ≤ (1 − σ)R``, 0 for ``ρ ≥ (1 + σ)R``.
    """
    rho = np.abs(np.asarray(rho_per_um, dtype=np.float64))
    big = 0.5 / (positive("dr_nm", dr_nm) * 1e-3)
    small = _fill(fill) * big
    if small == 0.0:
        return (rho < big).astype(np.float64)
    inner = rho <= big - small
    outer = rho >= big + small
    d = np.where(inner | outer, big, rho)  # any value in the lens regime; masked below
    a1 = np.clip((d * d + small * small - big * big) / (2 * d * small), -1.0, 1.0)
    a2 = np.clip((d * d + big * big - small * small) / (2 * d * big), -1.0, 1.0)
    kite = ((-d + small + big) * (d + small - big) * (d - small + big) * (d + small + big))
    lens = (small * small * np.arccos(a1) + big * big * np.arccos(a2)
            - 0.5 * np.sqrt(np.maximum(kite, 0.0)))
    out = lens / (math.pi * small * small)
    return np.where(inner, 1.0, np.where(outer, 0.0, out))


def defocus_envelope(rho_per_um: np.ndarray, energy_ev: float, dr_nm: float, fill: float,
                     defocus: float) -> np.ndarray:
    """Source-size envelope ``2 J₁(x)/x``, ``x = π b ρ``: OTF of the defocus blur disc.

    Parameters
    ----------
    rho_per_um : ndarray, any shape
        Spatial frequency magnitudes, µm⁻¹.
    defocus : float
        Defocus ``z``, µm.

    Returns
    -------
    ndarray, same shape, float64
        1 at ``ρ = 0``; negative lobes are real (contrast reversal of a blurred image).
    """
    x = math.pi * blur_diameter_um(energy_ev, dr_nm, fill, defocus) * np.abs(
        np.asarray(rho_per_um, dtype=np.float64))
    safe = np.where(x < 1e-6, 1.0, x)
    return np.where(x < 1e-6, 1.0 - x * x / 8.0, 2.0 * j1(safe) / safe)


def transfer_functions(rho_per_um: np.ndarray, energy_ev: float, dr_nm: float, fill: float,
                       defocus: float) -> tuple[np.ndarray, np.ndarray]:
    """Image transfer of intensity transmission and of phase at spatial frequency ``ρ``.

    The image spectrum is ``Î = T̂·h_abs + φ̂·h_phase`` with ``T = exp(−μt)`` the intensity
    transmission and ``φ`` the phase shift of the sample (radian, negative for matter with
    refractive index ``1 − δ``).

    Returns
    -------
    h_abs, h_phase : ndarray, same shape as ``rho_per_um``, float64
        ``P·E·cos χ`` and ``2·P·E·sin χ`` with ``P`` the pupil transfer, ``E`` the defocus
        envelope and ``χ = πλzρ²``.
    """
    rho = np.abs(np.asarray(rho_per_um, dtype=np.float64))
    common = (pupil_transfer(rho, dr_nm, fill)
              * defocus_envelope(rho, energy_ev, dr_nm, fill, defocus))
    chi = math.pi * wavelength_nm(energy_ev) * 1e-3 * float(defocus) * rho * rho
    return common * np.cos(chi), 2.0 * common * np.sin(chi)
