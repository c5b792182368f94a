"""The simulated TXM detector: renders frames of illumination × sample ⊗ optics, with noise.

A :class:`Simulator` holds the fixed beamline (:class:`SimParams`) and renders a frame for a
motor/beam state (:class:`BeamlineState`) at a time ``t_s``:
``Simulator(params).render(state, t_s) -> (image uint16 (N, N), truth dict)``. The simulated
IOC sets the state from its motor records; nothing here does I/O.

Scale: a detector of N pixels sees a scaled-down beamline. The spot (FWHM 1.2×), the shaker
amplitude of full fill (0.5×) and the sample layout (:mod:`hw.sim.samples`) default to
fractions of the reference field (N × 9.94 nm, 20.4 µm at N = 2048), so every N shows the
same picture; the physical lengths that set resolution (zone plate, finest sample features,
defocus) do not scale. Start from :meth:`Simulator.default_state`, whose shaker amplitude
fills the ZP for this N (``BeamlineState()``'s 10.18 µm is right for N = 2048 only).

Image formation (per frame)
---------------------------
1. **Optics** (:mod:`hw.sim.optics`): the energy and the objective of the mode give the pixel
   size; the ZP motor position gives the defocus ``z`` of the image; the shaker gives the
   condenser fill σ.
2. **Sample**: the maps of :mod:`hw.sim.samples` at the reference energy (8 keV) are scaled to
   the energy (``μt ∝ E⁻³``, ``φ ∝ 1/E``) and imaged in Fourier space:
   ``Î = FFT(exp(−μt))·h_abs + FFT(φ)·h_phase`` with the partially coherent transfer of
   :func:`hw.sim.optics.transfer_functions` (pupil overlap × defocus envelope × ``cos χ`` /
   ``2 sin χ``). The intensity transmission keeps strong absorption exact in focus; the phase
   enters linearly (weak phase). The result (the "canvas", float32 (N, N), centred on the
   sample's origin) is cached per optical state, so nothing is recomputed while the optics do
   not change.
3. **Position**: the sample stage moves the sample in the field (µm → px); a lateral ZP move
   shifts the whole image, spot included, by ``d·(1 + 1/M)`` at the sample; vibration adds a
   random shift of the sample per frame (RMS per axis) plus an optional sinusoid along x.
   Sub-pixel parts of the stage/ZP shift enter the cached canvas as an exact Fourier phase
   ramp (quantised to 1/32 px); the per-frame vibration is applied with bilinear
   interpolation, whose ≤ 1 px smoothing stands for the motion blur within the exposure.
   Parts of the field beyond the canvas are empty (transmission 1). ``sample_theta_deg`` is
   recorded but ignored: samples are 2-D projections.
4. **Illumination**: the condenser spot — a Gaussian of FWHM ``spot_fwhm_um`` modulated by a
   smooth random structure of relative RMS ``spot_structure`` (capillary figure errors; it
   moves with the spot) — is scanned by the shaker along a circle of radius ``A`` at
   ``ν`` Hz, phase ``2πν·t`` at exposure start. An exposure of ``P = ν·τ`` periods integrates
   ``⌊P⌋`` whole circles (64 points, independent of phase: repeatable, cached) plus an arc of
   the remaining fraction starting at the exposure's phase (varies frame to frame). Small
   ``A``: a hot spot (default spot: field CV ≈ 20 %); ``A ≥ fill_amp_um`` (default half the
   reference field) fills the ZP aperture; ``A ≈ 1.5 × fill_amp_um``: the flattest field
   (CV ≈ 1.3 %), about 3× dimmer at the peak; larger ``A``: a ring with a dim centre. The
   default spot is a 1.2-field-wide capillary focus with 5 % figure structure, so that a
   tuned shaker can flatten the field to the 2 % a flat correction needs. The fill of
   the ZP aperture is ``σ = σ₀ + (1 − σ₀)·min(1, A/A_fill)·min(1, P)`` with
   ``σ₀ = fill_static`` (unscanned condenser). The averaged spot lives on a coarse grid
   (257², 4 fields wide, in px relative to the spot centre) and is interpolated per pixel;
   scan positions beyond it (``A`` > 2 field widths) lose their light.
5. **Beam position**: the spot centre drifts linearly (``drift_px_per_s`` along
   ``drift_angle_deg``), jumps by ``jump_px`` in a random direction at Poisson-distributed
   times (mean interval ``jump_interval_s``, as after a top-up injection), and is steered by
   ``beam_x``, ``beam_y`` through the matrix ``steering_px_per_unit`` (gain and
   cross-coupling). These px are at the reference pixel (8 keV, high mode); the beam moves in
   µm at the sample, so at another energy or mode its offset in px scales with the pixel. The
   beam path is a pure function of time and seed (jumps are drawn once, lazily).
6. **Detector**: expected counts = ``photons × illumination × transmission`` with
   ``photons = flux_counts_per_s × τ × I_ring/I_ref × (pixel/pixel_ref)²`` (flux per unit area
   at the sample; one count per photon), 0 when the shutter is closed, the ring current is 0
   or the frame type is Background. Noise: Poisson, drawn as a Gaussian of variance
   ``mean + read²`` from 20 counts up and exactly (Knuth) with separate Gaussian read noise
   below; plus the dark offset; rounded and clipped to [0, 65535]. Gaussian numbers come from
   a counter-based splitmix64 generator through a 65536-entry inverse-CDF table (four per
   64-bit word; tails cut at ±4.3σ), seeded per frame from the simulator's seeded generator,
   so renders are reproducible and fast.

Frame types follow areaDetector's ``FrameType``: ``Normal`` → ``data``, ``Background`` →
``dark`` (the simulated camera closes the shutter), ``FlatField`` → ``flat`` (the sample is
taken out of the field). The kind of a frame is what the frame type says
(:func:`frame_kind`); the pixels follow the physics, so closing the shutter or moving the
sample away in a Normal frame gives a dark- or flat-looking *data* frame, as on a real
beamline. ``truth["beam_on"]`` and ``truth["sample_in_view"]`` say which.

Speed (one core, :func:`speed_report`): steady state ~1.8 ms per 512² frame (~550 fps) and
~21–25 ms per 2048² frame (~40–48 fps), most of it the noise kernel. A change of the optics
(ZP, energy, fill) costs one inverse FFT of the canvas (2048²: ~70 ms per frame during a
focus scan); an exposure holding a fraction of a shaker period costs one small FFT
convolution per frame (2048²: ~29 ms per frame; 512²: ~8 ms); a new energy or mode also
re-draws the sample (~0.1 s at 2048²).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.fft
from numba import njit
from scipy.special import ndtri

from hw.sim import optics
from hw.sim.samples import SAMPLES, SampleMaps, render_sample

FRAME_TYPES = {"Normal": "data", "Background": "dark", "FlatField": "flat"}
"""areaDetector ``FrameType`` names → wire-protocol frame kinds."""

MODES = ("high", "medium")
"""Detector modes (objective behind the scintillator)."""

ENERGY_RANGE_EV = (5000.0, 14000.0)
"""Energies the simulated beamline delivers, eV."""

SATURATION_COUNTS = 65535
"""Largest value of the 16-bit camera."""

_SATURATION_F = float(SATURATION_COUNTS)

GAUSSIAN_MIN_COUNTS = 20.0
"""From this expected count up, Poisson noise is drawn as a Gaussian of the same variance."""

ILLUM_GRID = 257
"""Cells per side of the illumination grid (odd: the spot centre is a cell centre)."""
ILLUM_SPAN_FIELDS = 4.0
"""Width of the illumination grid in detector widths."""
SHAKER_POINTS = 64
"""Points per shaker period at which the spot is summed."""
SHIFT_QUANTUM_PX = 1.0 / 32.0
"""Sub-pixel stage shifts are put into the cached canvas rounded to this, px."""

_PROFILE_SAMPLES = 16385
_UNIFORMITY_SAMPLES = 64
_SPECKLE_WAVES = 48

# splitmix64 constants (Steele, Lea & Flood 2014)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_POISSON_STREAM = 0x5DEECE66D
"""XORed into a frame's seed to give the independent stream of the exact-Poisson pixels."""

NORMAL_TABLE = ndtri((np.arange(65536) + 0.5) / 65536).astype(np.float32)
"""Standard-normal quantiles at the centres of 65536 equal-probability bins."""
NORMAL_TABLE.setflags(write=False)


@dataclass(frozen=True)
class SimParams:
    """The fixed simulated beamline (everything a user does not move during a run).

    Attributes
    ----------
    size_px : int
        Detector size N (frames are N × N).
    sample : str
        One of :data:`hw.sim.samples.SAMPLES`.
    seed : int
        Seed of every random process (noise, vibration, beam jumps, spot structure).
    energy_ref_ev : float
        Reference energy: ``zp_z_um = 0`` is the in-focus ZP there (without focus offset),
        sample maps and the px of the beam parameters are given there.
    zp_diameter_um, zp_dr_nm : float
        Zone-plate diameter D (µm) and outermost zone Δr (nm).
    sample_detector_mm : float
        Fixed sample–scintillator distance L, mm (700 mm: 9.94 nm pixels at 8 keV, high mode).
    camera_pixel_um : float
        Camera pixel pitch, µm.
    objective_high, objective_medium : float
        Visible-light objective magnification in the high (20×: ~10 nm pixels) and medium
        (6.67×: ~30 nm pixels) resolution modes.
    focus_offset_um : float
        Hidden shift of the true focus from its nominal ZP position, µm.
    spot_fwhm_um : float or None
        FWHM of the condenser spot at the sample, µm; None: 1.2 × the reference field width.
    spot_structure : float
        Relative RMS of the spot's random structure (0: a clean Gaussian).
    fill_amp_um : float or None
        Shaker amplitude that fills the ZP aperture (σ = 1), µm; None: 0.5 × the reference
        field width.
    fill_static : float
        Condenser fill σ₀ without scanning, 0…1.
    flux_counts_per_s : float
        Counts per pixel per second at the peak of the unscanned spot, at the reference ring
        current and pixel.
    ring_current_ref_ma : float
        Ring current at which ``flux_counts_per_s`` holds, mA.
    dark_counts, read_noise_counts : float
        Dark offset and Gaussian read noise (RMS), counts.
    drift_px_per_s, drift_angle_deg : float
        Linear drift of the beam spot (rate in reference px/s, direction from +x towards +y).
    jump_px, jump_interval_s : float
        Size of beam jumps (reference px) and their mean interval, s (``inf``: no jumps).
    steering_px_per_unit : ((float, float), (float, float))
        Spot offset (x, y) in reference px per unit of (beam_x, beam_y): rows x, y; the
        diagonal is the gain, the off-diagonal the cross-coupling.
    vibration_rms_nm : float
        Random per-frame image shift, RMS per axis, nm.
    vibration_sine_nm, vibration_sine_hz : float
        Amplitude (nm, along x) and frequency (Hz) of a sinusoidal vibration.
    """

    size_px: int = 2048
    sample: str = "siemens"
    seed: int = 0
    energy_ref_ev: float = 8000.0
    zp_diameter_um: float = 125.0
    zp_dr_nm: float = 25.0
    sample_detector_mm: float = 700.0
    camera_pixel_um: float = 6.5
    objective_high: float = 20.0
    objective_medium: float = 20.0 / 3.0
    focus_offset_um: float = 0.0
    spot_fwhm_um: float | None = None
    spot_structure: float = 0.05
    fill_amp_um: float | None = None
    fill_static: float = 0.2
    flux_counts_per_s: float = 1.0e6
    ring_current_ref_ma: float = 200.0
    dark_counts: float = 100.0
    read_noise_counts: float = 1.6
    drift_px_per_s: float = 0.1
    drift_angle_deg: float = 30.0
    jump_px: float = 20.0
    jump_interval_s: float = 600.0
    steering_px_per_unit: tuple[tuple[float, float], tuple[float, float]] = (
        (10.0, 1.0), (-0.5, 10.0))
    vibration_rms_nm: float = 2.0
    vibration_sine_nm: float = 0.0
    vibration_sine_hz: float = 25.0

    def __post_init__(self) -> None:
        if not isinstance(self.size_px, int) or isinstance(self.size_px, bool) \
                or self.size_px < 8:
            raise ValueError(f"SimParams.size_px must be an integer >= 8, got {self.size_px!r}")
        if self.sample not in SAMPLES:
            raise ValueError(f"SimParams.sample: unknown sample {self.sample!r}; "
                             f"known: {list(SAMPLES)}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"SimParams.seed must be a non-negative integer, got {self.seed!r}")
        positive = ("energy_ref_ev", "zp_diameter_um", "zp_dr_nm", "sample_detector_mm",
                    "camera_pixel_um", "objective_high", "objective_medium",
                    "ring_current_ref_ma", "jump_interval_s", "vibration_sine_hz")
        non_negative = ("spot_structure", "flux_counts_per_s", "dark_counts",
                        "read_noise_counts", "drift_px_per_s", "jump_px", "vibration_rms_nm",
                        "vibration_sine_nm")
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value > 0 and not math.isnan(value)):
                raise ValueError(f"SimParams.{name} must be > 0, got {value!r}")
        for name in non_negative + ("focus_offset_um", "drift_angle_deg"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"SimParams.{name} must be a finite number, got {value!r}")
            if name in non_negative and value < 0:
                raise ValueError(f"SimParams.{name} must be >= 0, got {value!r}")
        for name in ("spot_fwhm_um", "fill_amp_um"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and value > 0
                                          and math.isfinite(value)):
                raise ValueError(f"SimParams.{name} must be None or > 0, got {value!r}")
        if not 0.0 <= self.fill_static <= 1.0:
            raise ValueError(f"SimParams.fill_static must be in [0, 1], got {self.fill_static!r}")
        matrix = np.asarray(self.steering_px_per_unit, dtype=np.float64)
        if matrix.shape != (2, 2) or not np.all(np.isfinite(matrix)):
            raise ValueError("SimParams.steering_px_per_unit must be a finite 2x2 matrix, got "
                             f"{self.steering_px_per_unit!r}")
        # Fails early (and names the parameter) when L is too short for the energy range.
        for energy in ENERGY_RANGE_EV:
            optics.in_focus_zp_um(energy, self.zp_diameter_um, self.zp_dr_nm,
                                  self.sample_detector_mm * 1e3)

    def objective_mag(self, mode: str) -> float:
        """Objective magnification of a detector mode (``"high"`` or ``"medium"``)."""
        if mode == "high":
            return self.objective_high
        if mode == "medium":
            return self.objective_medium
        raise ValueError(f"unknown detector mode {mode!r}; known: {list(MODES)}")

    def pixel_nm(self, energy_ev: float, mode: str = "high") -> float:
        """Effective pixel at the sample for an energy and mode, nm."""
        return optics.pixel_nm(energy_ev, self.objective_mag(mode), self.zp_diameter_um,
                               self.zp_dr_nm, self.sample_detector_mm * 1e3,
                               self.camera_pixel_um)

    @property
    def reference_pixel_nm(self) -> float:
        """Pixel at the reference energy in the high mode, nm (9.94 nm by default)."""
        return self.pixel_nm(self.energy_ref_ev, "high")

    @property
    def reference_field_um(self) -> float:
        """Field-of-view width at the reference energy in the high mode, µm."""
        return self.size_px * self.reference_pixel_nm * 1e-3

    @property
    def spot_fwhm(self) -> float:
        """Condenser spot FWHM in use, µm."""
        return self.spot_fwhm_um if self.spot_fwhm_um is not None \
            else 1.2 * self.reference_field_um

    @property
    def fill_amp(self) -> float:
        """Shaker amplitude of full fill in use, µm."""
        return self.fill_amp_um if self.fill_amp_um is not None \
            else 0.5 * self.reference_field_um


@dataclass
class BeamlineState:
    """Motor positions and beam/camera settings at exposure start (what the IOC sets).

    Attributes
    ----------
    energy_ev : float
        Photon energy, eV (5–14 keV).
    zp_z_um : float
        ZP position along the beam, µm; 0 is the in-focus position at the reference energy
        without focus offset, positive moves the ZP away from the sample (towards the
        detector).
    zp_x_um, zp_y_um : float
        Lateral ZP position, µm (shifts the image).
    sample_x_um, sample_y_um : float
        Sample stage position, µm (moves the sample across the field: +x to +column).
    sample_theta_deg : float
        Sample rotation, degrees (recorded, ignored by the 2-D samples).
    shaker_amp_um, shaker_freq_hz : float
        Radius (µm at the sample) and frequency of the condenser's circular scan.
    beam_x, beam_y : float
        Steering motor positions, in their own unit.
    shutter_open : bool
    ring_current_ma : float
        Storage-ring current, mA (0: beam lost).
    exposure_s : float
    frame_type : str
        areaDetector FrameType: ``"Normal"``, ``"Background"`` or ``"FlatField"``.
    mode : str
        ``"high"`` (~10 nm pixel) or ``"medium"`` (~30 nm pixel).

    The default shaker amplitude fills the ZP for the default 2048² detector; use
    :meth:`Simulator.default_state` for other sizes.
    """

    energy_ev: float = 8000.0
    zp_z_um: float = 0.0
    zp_x_um: float = 0.0
    zp_y_um: float = 0.0
    sample_x_um: float = 0.0
    sample_y_um: float = 0.0
    sample_theta_deg: float = 0.0
    shaker_amp_um: float = 10.18
    shaker_freq_hz: float = 40.0
    beam_x: float = 0.0
    beam_y: float = 0.0
    shutter_open: bool = True
    ring_current_ma: float = 200.0
    exposure_s: float = 0.05
    frame_type: str = "Normal"
    mode: str = "high"


def frame_kind(state: BeamlineState) -> str:
    """Wire-protocol kind of a frame taken in ``state``: ``"data"``, ``"dark"`` or ``"flat"``.

    It is the areaDetector ``FrameType`` (Normal → data, Background → dark,
    FlatField → flat).
    """
    try:
        return FRAME_TYPES[state.frame_type]
    except KeyError:
        raise ValueError(f"unknown frame_type {state.frame_type!r}; known: "
                         f"{list(FRAME_TYPES)}") from None


def _check_state(state: BeamlineState) -> None:
    if not isinstance(state, BeamlineState):
        raise TypeError(f"expected a BeamlineState, got {type(state).__name__}")
    frame_kind(state)
    if state.mode not in MODES:
        raise ValueError(f"unknown detector mode {state.mode!r}; known: {list(MODES)}")
    lo, hi = ENERGY_RANGE_EV
    if not lo <= state.energy_ev <= hi:
        raise ValueError(f"energy_ev={state.energy_ev!r} is outside the beamline's range "
                         f"{lo:g}–{hi:g} eV")
    for name in ("zp_z_um", "zp_x_um", "zp_y_um", "sample_x_um", "sample_y_um",
                 "sample_theta_deg", "beam_x", "beam_y"):
        value = getattr(state, name)
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    for name in ("shaker_amp_um", "shaker_freq_hz", "ring_current_ma"):
        value = getattr(state, name)
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not isinstance(state.exposure_s, int | float) or not (0 < state.exposure_s < math.inf):
        raise ValueError(f"exposure_s must be > 0 and finite, got {state.exposure_s!r}")


# ----------------------------------------------------------------------------- kernels


@njit(nogil=True, cache=True)
def _splitmix(state: np.uint64) -> tuple[np.uint64, np.uint64]:
    state = state + _GOLDEN
    z = state
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return state, z ^ (z >> np.uint64(31))


@njit(nogil=True, cache=True)
def _poisson(mean: float, state: np.uint64) -> tuple[float, np.uint64]:
    """Knuth's multiplication method (fine for the small means it is used for)."""
    limit = math.exp(-mean)
    k = -1
    p = 1.0
    while True:
        k += 1
        state, word = _splitmix(state)
        p *= float(word >> np.uint64(11)) * (1.0 / 9007199254740992.0)
        if p <= limit:
            return float(k), state


@njit(nogil=True, cache=True)
def _blend_rows(ext, canvas, a0, w, outside):
    """``ext[b + 2]`` = canvas rows ``a0``/``a0 + 1`` blended at column ``b``, padded by 2.

    Rows and columns beyond the canvas read ``outside``, so the per-pixel loop clamps an
    index instead of testing four neighbours.
    """
    n_rows, n_cols = canvas.shape
    ext[:] = outside
    for r, weight in ((a0, 1.0 - w), (a0 + 1, w)):
        if 0 <= r < n_rows:
            for c in range(n_cols):
                ext[c + 2] += weight * (canvas[r, c] - outside)


@njit(nogil=True, cache=True)
def _row_normals(z, state, table):
    """Fill ``z`` with standard normals, four per splitmix64 word; returns the new state."""
    mask16 = np.uint64(0xFFFF)
    for j in range(0, z.size, 4):
        state, word = _splitmix(state)
        z[j] = table[word & mask16]
        z[j + 1] = table[(word >> np.uint64(16)) & mask16]
        z[j + 2] = table[(word >> np.uint64(32)) & mask16]
        z[j + 3] = table[word >> np.uint64(48)]
    return state


@njit(nogil=True, cache=True)
def _compose(out, canvas, has_sample, outside, row_off, row_w, col_off, col_w,
             illum, ill_r0, ill_rw, ill_c0, ill_cw, photons, dark, read, table, seed, pseed):
    n_rows, n_cols = out.shape
    grid = illum.shape[1]
    line = np.zeros(grid + 2, np.float64)  # [grid], [grid + 1] stay 0: columns off the grid
    ext = np.ones(canvas.shape[1] + 4, np.float64)
    last = canvas.shape[1] + 2
    z = np.empty((n_cols + 3) // 4 * 4, np.float32)
    mean = np.empty(n_cols, np.float64)
    state = np.uint64(seed)
    pstate = np.uint64(pseed)
    read2 = read * read
    for i in range(n_rows):
        r0 = ill_r0[i]
        if r0 >= 0:
            w = ill_rw[i]
            for k in range(grid):
                line[k] = photons * ((1.0 - w) * illum[r0, k] + w * illum[r0 + 1, k])
        else:
            line[:] = 0.0
        if has_sample:
            _blend_rows(ext, canvas, i + row_off, row_w, outside)
        state = _row_normals(z, state, table)
        for j in range(n_cols):
            c0 = ill_c0[j]
            wc = ill_cw[j]
            b = min(max(j + col_off + 2, 0), last)
            mean[j] = max(((1.0 - wc) * line[c0] + wc * line[c0 + 1])
                          * ((1.0 - col_w) * ext[b] + col_w * ext[b + 1]), 0.0)
        # Gaussian pass over the row; the rare low-count pixels are redone exactly below
        # (a Poisson call inside this loop makes it ~2x slower).
        n_low = 0
        for j in range(n_cols):
            m = mean[j]
            n_low += 0.0 < m < GAUSSIAN_MIN_COUNTS  # m = 0 is exact here: read noise only
            v = min(max(m + math.sqrt(m + read2) * z[j] + dark + 0.5, 0.0), _SATURATION_F)
            out[i, j] = np.uint16(v)  # truncation of v + 0.5 >= 0: rounding
        if n_low:
            for j in range(n_cols):
                m = mean[j]
                if 0.0 < m < GAUSSIAN_MIN_COUNTS:
                    k, pstate = _poisson(m, pstate)
                    v = min(max(k + read * z[j] + dark + 0.5, 0.0), _SATURATION_F)
                    out[i, j] = np.uint16(v)


@njit(nogil=True, cache=True)
def _assemble(out, ft_t, ft_phi, has_phi, fy2, fx2, inv_step, h_abs, h_phase, ramp_y, ramp_x):
    last = h_abs.size - 2
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            q = (fy2[i] + fx2[j]) * inv_step
            k = int(q)
            if k > last:
                k = last
            w = q - k
            v = ft_t[i, j] * (h_abs[k] + w * (h_abs[k + 1] - h_abs[k]))
            if has_phi:
                v += ft_phi[i, j] * (h_phase[k] + w * (h_phase[k + 1] - h_phase[k]))
            out[i, j] = v * ramp_y[i] * ramp_x[j]


# ----------------------------------------------------------------------------- wrappers


def _grid_lookup(n: int, offset_px: float, cell_px: float, grid: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per detector row (or column): the illumination-grid cell to its low side and weight.

    Rows/columns outside the grid (no light) get cell ``-1`` for rows and ``grid`` (the
    kernel's zero padding) for columns.
    """
    u = (np.arange(n) - (n - 1) / 2.0 - offset_px) / cell_px + (grid - 1) / 2.0
    u0 = np.floor(u)
    inside = (u0 >= 0) & (u0 <= grid - 2)
    return (np.where(inside, u0, -1).astype(np.int64),
            np.where(inside, u - u0, 0.0).astype(np.float64))


def compose_frame(out: np.ndarray, transmission: np.ndarray | None,
                  shift_px: tuple[float, float], illumination: np.ndarray, cell_px: float,
                  spot_px: tuple[float, float], photons: float, dark_counts: float,
                  read_noise_counts: float, seed: int, outside: float = 1.0) -> np.ndarray:
    """Render one noisy uint16 frame: illumination × transmission → counts + noise.

    Parameters
    ----------
    out : ndarray, shape (rows, cols), uint16, C-contiguous
        Receives the frame.
    transmission : ndarray, shape (n, m), float32, or None
        Sample image (intensity transmission after the optics); its centre
        ``((n − 1)/2, (m − 1)/2)`` is the sample's origin. None: no sample (a flat).
    shift_px : (dy, dx)
        Where the sample's origin sits relative to the field centre, px (bilinear).
    illumination : ndarray, shape (G, G), float32, G odd
        Time-averaged spot, relative to the spot centre (the middle cell), cell ``cell_px``.
    cell_px : float
        Illumination grid step, detector px.
    spot_px : (y, x)
        Spot centre relative to the field centre, px.
    photons : float
        Expected counts at illumination 1 and transmission 1 (0: beam off).
    dark_counts, read_noise_counts : float
        Dark offset and Gaussian read-noise RMS, counts.
    seed : int
        Seed of the frame's noise (0 ≤ seed < 2⁶⁴).
    outside : float
        Transmission beyond the sample image.

    Returns
    -------
    ndarray
        ``out``.
    """
    if out.dtype != np.uint16 or out.ndim != 2 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous 2-D uint16 array, got {out.dtype} "
                         f"{out.shape}")
    if illumination.dtype != np.float32 or illumination.ndim != 2 \
            or illumination.shape[0] != illumination.shape[1] or illumination.shape[0] % 2 == 0 \
            or illumination.shape[0] < 3:
        raise ValueError("illumination must be a square float32 grid of odd size >= 3, got "
                         f"{illumination.dtype} {illumination.shape}")
    if transmission is not None and (transmission.dtype != np.float32
                                     or transmission.ndim != 2):
        raise ValueError(f"transmission must be a 2-D float32 array or None, got "
                         f"{transmission.dtype} {transmission.shape}")
    values = (cell_px, photons, dark_counts, read_noise_counts, outside, *shift_px, *spot_px)
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"non-finite frame parameter in {values!r}")
    if cell_px <= 0 or photons < 0 or read_noise_counts < 0:
        raise ValueError(f"need cell_px > 0, photons >= 0 and read noise >= 0, got "
                         f"{cell_px!r}, {photons!r}, {read_noise_counts!r}")
    if not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed!r}")
    rows, cols = out.shape
    grid = illumination.shape[0]
    ill_r0, ill_rw = _grid_lookup(rows, spot_px[0], cell_px, grid)
    ill_c0, ill_cw = _grid_lookup(cols, spot_px[1], cell_px, grid)
    ill_c0[ill_c0 < 0] = grid
    if transmission is None:
        canvas, has_sample = np.ones((1, 1), np.float32), False
        row_off = col_off = 0
        row_w = col_w = 0.0
    else:
        canvas, has_sample = np.ascontiguousarray(transmission), True
        # Image pixel i shows the sample at i − (field centre + shift) + canvas centre.
        ay = -shift_px[0] - (rows - 1) / 2.0 + (canvas.shape[0] - 1) / 2.0
        ax = -shift_px[1] - (cols - 1) / 2.0 + (canvas.shape[1] - 1) / 2.0
        row_off, col_off = math.floor(ay), math.floor(ax)
        row_w, col_w = ay - row_off, ax - col_off
    _compose(out, canvas, has_sample, float(outside), int(row_off), float(row_w),
             int(col_off), float(col_w), illumination, ill_r0, ill_rw, ill_c0, ill_cw,
             float(photons), float(dark_counts), float(read_noise_counts), NORMAL_TABLE,
             np.uint64(seed), np.uint64(seed ^ _POISSON_STREAM))
    return out


def frequency_axes(shape: tuple[int, int], pixel_nm: float) -> tuple[np.ndarray, np.ndarray]:
    """Spatial frequencies of an ``rfft2`` spectrum, µm⁻¹.

    Returns
    -------
    fy : ndarray, shape (rows,)
        Along axis 0 (full FFT order).
    fx : ndarray, shape (cols // 2 + 1,)
        Along axis 1 (non-negative, rfft).
    """
    px_um = pixel_nm * 1e-3
    return np.fft.fftfreq(shape[0], px_um), np.fft.rfftfreq(shape[1], px_um)


def filtered_spectrum(ft_t: np.ndarray, ft_phi: np.ndarray | None, shape: tuple[int, int],
                      pixel_nm: float, energy_ev: float, dr_nm: float, fill: float,
                      defocus: float, shift_px: tuple[float, float] = (0.0, 0.0)
                      ) -> np.ndarray:
    """Image spectrum ``(T̂·h_abs + φ̂·h_phase)·e^{−2πi f·s}`` of an rfft2-ed sample.

    Parameters
    ----------
    ft_t : ndarray, shape (rows, cols // 2 + 1), complex64
        ``rfft2`` of the intensity transmission.
    ft_phi : ndarray, same shape, complex64, or None
        ``rfft2`` of the phase (radian); None for a pure absorber.
    shape : (rows, cols)
        Real-space shape.
    pixel_nm, energy_ev, dr_nm, fill, defocus
        Optics (see :func:`hw.sim.optics.transfer_functions`; ``defocus`` in µm).
    shift_px : (dy, dx)
        Shift applied to the image, px (exact, periodic).

    Returns
    -------
    ndarray, same shape as ``ft_t``, complex64
        The transfer functions are tabulated over ``ρ²`` (16385 samples) and interpolated
        linearly.
    """
    expected = (shape[0], shape[1] // 2 + 1)
    if ft_t.dtype != np.complex64 or ft_t.shape != expected:
        raise ValueError(f"ft_t must be complex64 of shape {expected}, got {ft_t.dtype} "
                         f"{ft_t.shape}")
    if ft_phi is not None and (ft_phi.dtype != np.complex64 or ft_phi.shape != expected):
        raise ValueError(f"ft_phi must be None or complex64 of shape {expected}, got "
                         f"{ft_phi.dtype} {ft_phi.shape}")
    fy, fx = frequency_axes(shape, pixel_nm)
    fy2, fx2 = fy * fy, fx * fx
    rho2_max = float(fy2.max() + fx2.max())
    rho2 = np.linspace(0.0, rho2_max, _PROFILE_SAMPLES)
    h_abs, h_phase = optics.transfer_functions(np.sqrt(rho2), energy_ev, dr_nm, fill, defocus)
    ramp_y = np.exp(-2j * np.pi * np.fft.fftfreq(shape[0]) * shift_px[0])
    ramp_x = np.exp(-2j * np.pi * np.fft.rfftfreq(shape[1]) * shift_px[1])
    out = np.empty(expected, np.complex64)
    has_phi = ft_phi is not None
    _assemble(out, ft_t, ft_phi if has_phi else ft_t, has_phi, fy2, fx2,
              (_PROFILE_SAMPLES - 1) / rho2_max, h_abs, h_phase, ramp_y, ramp_x)
    return out


def shaker_points(amp_px: float, freq_hz: float, exposure_s: float, phase_rad: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Where the shaker puts the spot during an exposure, split into whole periods and the rest.

    Parameters
    ----------
    amp_px : float
        Radius of the circular scan, px.
    freq_hz, exposure_s : float
        Scan frequency and exposure time; ``P = freq·exposure`` periods.
    phase_rad : float
        Scan phase at exposure start.

    Returns
    -------
    dy, dx : ndarray, shape (K,)
        Positions (px) of the remaining arc (or of the parked spot when ``P = 0``); empty when
        the exposure holds whole periods only.
    weights : ndarray, shape (K,)
        Their weights; they sum to ``1 − whole_weight``.
    whole_weight : float
        Weight of the whole-period circle (:data:`SHAKER_POINTS` phase-independent points).
    """
    periods = freq_hz * exposure_s
    whole = math.floor(periods + 1e-9)
    rest = max(periods - whole, 0.0)
    if rest < 1e-9:
        rest = 0.0
    if periods <= 0.0:  # shaker stopped: the spot sits at the current phase
        return (np.array([amp_px * math.sin(phase_rad)]),
                np.array([amp_px * math.cos(phase_rad)]), np.ones(1), 0.0)
    k = max(2, math.ceil(SHAKER_POINTS * rest)) if rest > 0 else 0
    theta = phase_rad + 2 * math.pi * rest * (np.arange(k) + 0.5) / max(k, 1)
    weights = np.full(k, rest / periods / max(k, 1))
    return amp_px * np.sin(theta), amp_px * np.cos(theta), weights, whole / periods


def _deposit(occupancy: np.ndarray, centre: int, dy: np.ndarray, dx: np.ndarray,
             weights: np.ndarray, cell_px: float) -> None:
    """Bilinear deposit of weighted points (px from the spot centre) on the padded grid."""
    y = centre + dy / cell_px
    x = centre + dx / cell_px
    y0, x0 = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    wy, wx = y - y0, x - x0
    keep = (y0 >= 0) & (x0 >= 0) & (y0 <= 2 * centre - 1) & (x0 <= 2 * centre - 1)
    for oy, ox, w in ((0, 0, (1 - wy) * (1 - wx)), (0, 1, (1 - wy) * wx),
                      (1, 0, wy * (1 - wx)), (1, 1, wy * wx)):
        np.add.at(occupancy, (y0[keep] + oy, x0[keep] + ox), (weights * w)[keep])


def average_spot(spot_spectrum: np.ndarray, grid: int, dy: np.ndarray, dx: np.ndarray,
                 weights: np.ndarray, cell_px: float) -> np.ndarray:
    """Time-averaged spot: the spot convolved with the weighted scan positions.

    Parameters
    ----------
    spot_spectrum : ndarray, shape (2(G−1), G), complex
        ``rfft2`` of the spot on a zero-padded ``2(G−1)``² grid with its centre at [0, 0].
    grid : int
        G, the (odd) size of the returned grid.
    dy, dx, weights : ndarray, shape (K,)
        Scan positions relative to the spot's rest position (px) and weights.
    cell_px : float
        Grid step, px.

    Returns
    -------
    ndarray, shape (G, G), float32
        Centred on the spot's rest position. Positions more than ``(G − 1)/2`` cells away are
        dropped (their light cannot reach the grid).
    """
    centre = (grid - 1) // 2
    pad = 2 * (grid - 1)
    occupancy = np.zeros((pad, pad))
    _deposit(occupancy, centre, dy, dx, weights, cell_px)
    conv = scipy.fft.irfft2(scipy.fft.rfft2(occupancy, workers=1) * spot_spectrum,
                            s=(pad, pad), workers=1)
    return conv[:grid, :grid].astype(np.float32)


def spot_map(grid: int, cell_um: float, fwhm_um: float, structure: float,
             rng: np.random.Generator) -> np.ndarray:
    """The condenser spot at rest: Gaussian envelope × (1 + structure·speckle), peak ≈ 1.

    Parameters
    ----------
    grid : int
        Cells per side (odd; the spot centre is the middle cell).
    cell_um : float
        Cell size at the sample, µm.
    fwhm_um : float
        Envelope FWHM, µm.
    structure : float
        Relative RMS of the structure, a sum of plane waves with wavelengths around
        ``fwhm/8`` (fixed in µm, so it looks the same at every pixel size).
    rng : numpy.random.Generator
        Draws the structure (the same seed gives the same condenser).

    Returns
    -------
    ndarray, shape (grid, grid), float32, ≥ 0
    """
    axis = (np.arange(grid) - (grid - 1) / 2.0) * cell_um
    envelope_1d = np.exp(-4.0 * math.log(2.0) * (axis / fwhm_um) ** 2)
    spot = np.outer(envelope_1d, envelope_1d)
    k_um = rng.uniform(0.5, 1.5, _SPECKLE_WAVES) * 8.0 / fwhm_um
    angle = rng.uniform(0.0, 2 * math.pi, _SPECKLE_WAVES)
    phase = rng.uniform(0.0, 2 * math.pi, _SPECKLE_WAVES)
    speckle = np.zeros((grid, grid))
    for k, a, p in zip(k_um, angle, phase, strict=True):
        wy = np.exp(1j * (2 * math.pi * k * math.sin(a) * axis))
        wx = np.exp(1j * (2 * math.pi * k * math.cos(a) * axis + p))
        speckle += np.outer(wy, wx).real
    speckle *= math.sqrt(2.0 / _SPECKLE_WAVES)
    return (spot * np.maximum(1.0 + structure * speckle, 0.0)).astype(np.float32)


def _warmup() -> None:
    """Compile (or load from cache) the kernels on tiny inputs."""
    compose_frame(np.empty((4, 4), np.uint16), np.ones((4, 4), np.float32), (0.0, 0.0),
                  np.ones((3, 3), np.float32), 4.0, (0.0, 0.0), 5.0, 100.0, 1.0, 1)
    ft = np.zeros((4, 3), np.complex64)
    filtered_spectrum(ft, ft, (4, 4), 10.0, 8000.0, 25.0, 1.0, 1.0)
    filtered_spectrum(ft, None, (4, 4), 10.0, 8000.0, 25.0, 1.0, 1.0)


# ----------------------------------------------------------------------------- simulator


class _Lru:
    """A small least-recently-used cache of computed values."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = make()
        self._items[key] = value
        if len(self._items) > self._size:
            self._items.popitem(last=False)
        return value


@dataclass(frozen=True)
class _Geometry:
    pixel_nm: float
    magnification: float
    focus_z_um: float
    defocus_um: float
    fill: float
    cutoff_per_um: float
    resolution_nm: float


class Simulator:
    """The simulated TXM: renders frames of a :class:`BeamlineState` at a time.

    Parameters
    ----------
    params : SimParams
        The fixed beamline; defaults to ``SimParams()`` (2048², Siemens star).

    Notes
    -----
    Not thread-safe: one thread renders. Renders are reproducible: two simulators with equal
    params given the same sequence of ``render`` calls return identical frames; the beam path
    depends only on time and seed.
    """

    def __init__(self, params: SimParams | None = None) -> None:
        self.params = params if params is not None else SimParams()
        p = self.params
        self._noise_rng = np.random.default_rng([p.seed, 1])
        self._jump_rng = np.random.default_rng([p.seed, 2])
        self._spot_seed = [p.seed, 3]
        self._jump_times: list[float] = []
        self._jump_xy: list[tuple[float, float]] = []
        self._jump_horizon = 0.0
        self._maps = _Lru(2)
        self._canvases = _Lru(4)
        self._spots = _Lru(4)
        self._fields = _Lru(8)
        _warmup()

    # -- state-derived quantities ----------------------------------------------------

    def default_state(self) -> BeamlineState:
        """A ready-to-image state: defaults with the shaker at full fill for this detector."""
        return BeamlineState(shaker_amp_um=self.params.fill_amp)

    def field_um(self, state: BeamlineState) -> float:
        """Width of the field of view at the sample, µm."""
        return self.params.size_px * self.params.pixel_nm(state.energy_ev, state.mode) * 1e-3

    def _geometry(self, state: BeamlineState) -> _Geometry:
        p = self.params
        length_um = p.sample_detector_mm * 1e3
        args = (p.zp_diameter_um, p.zp_dr_nm, length_um)
        p_focus = optics.in_focus_zp_um(state.energy_ev, *args)
        p_ref = optics.in_focus_zp_um(p.energy_ref_ev, *args)
        p_actual = p_ref + state.zp_z_um - p.focus_offset_um
        try:
            defocus = optics.defocus_um(p_actual, state.energy_ev, *args)
        except ValueError as err:
            raise ValueError(f"zp_z_um={state.zp_z_um!r} is out of the imaging range: {err}") \
                from None
        periods = state.shaker_freq_hz * state.exposure_s
        scan = min(1.0, state.shaker_amp_um / p.fill_amp) * min(1.0, periods)
        fill = p.fill_static + (1.0 - p.fill_static) * scan
        return _Geometry(
            pixel_nm=p.pixel_nm(state.energy_ev, state.mode),
            magnification=(length_um - p_focus) / p_focus,
            focus_z_um=p_focus - p_ref + p.focus_offset_um,
            defocus_um=defocus,
            fill=fill,
            cutoff_per_um=optics.cutoff_per_um(p.zp_dr_nm, fill),
            resolution_nm=optics.resolution_nm(state.energy_ev, p.zp_dr_nm, fill, defocus),
        )

    def optics_truth(self, state: BeamlineState) -> dict[str, float]:
        """Ground truth of the optics in ``state`` (no frame is rendered).

        Returns
        -------
        dict
            ``focus_z_um`` (in-focus ZP motor position now), ``defocus_um``, ``pixel_nm``,
            ``magnification`` (X-ray, of the ZP), ``fill`` (σ), ``cutoff_per_um``,
            ``resolution_nm``.
        """
        _check_state(state)
        g = self._geometry(state)
        return {"focus_z_um": g.focus_z_um, "defocus_um": g.defocus_um,
                "pixel_nm": g.pixel_nm, "magnification": g.magnification, "fill": g.fill,
                "cutoff_per_um": g.cutoff_per_um, "resolution_nm": g.resolution_nm}

    def _jumps_until(self, t_s: float) -> np.ndarray:
        """Sum of the beam jumps up to ``t_s`` (reference px, x and y)."""
        p = self.params
        if p.jump_px > 0 and math.isfinite(p.jump_interval_s):
            while self._jump_horizon <= t_s:
                self._jump_horizon += self._jump_rng.exponential(p.jump_interval_s)
                angle = self._jump_rng.uniform(0.0, 2 * math.pi)
                self._jump_times.append(self._jump_horizon)
                self._jump_xy.append((p.jump_px * math.cos(angle), p.jump_px * math.sin(angle)))
        total = np.zeros(2)
        for when, xy in zip(self._jump_times, self._jump_xy, strict=True):
            if when > t_s:
                break
            total += xy
        return total

    def beam_offset_px(self, state: BeamlineState, t_s: float) -> tuple[float, float]:
        """Spot centre relative to the field centre at time ``t_s``, px: ``(x, y)``.

        Drift + jumps + steering (scaled from reference px to the current pixel) plus the image
        shift of a lateral ZP move.
        """
        _check_state(state)
        if not math.isfinite(t_s) or t_s < 0:
            raise ValueError(f"t_s must be a finite time >= 0, got {t_s!r}")
        p = self.params
        angle = math.radians(p.drift_angle_deg)
        ref_px = (p.drift_px_per_s * t_s * np.array([math.cos(angle), math.sin(angle)])
                  + self._jumps_until(t_s)
                  + np.asarray(p.steering_px_per_unit) @ np.array([state.beam_x, state.beam_y]))
        g = self._geometry(state)
        scale = p.reference_pixel_nm / g.pixel_nm
        zy, zx = self._zp_shift_px(state, g)
        return float(ref_px[0] * scale + zx), float(ref_px[1] * scale + zy)

    @staticmethod
    def _zp_shift_px(state: BeamlineState, g: _Geometry) -> tuple[float, float]:
        factor = 1e3 * (1.0 + 1.0 / g.magnification) / g.pixel_nm
        return state.zp_y_um * factor, state.zp_x_um * factor

    # -- cached pieces ---------------------------------------------------------------

    def _sample_spectra(self, energy_ev: float, pixel: float
                        ) -> tuple[SampleMaps, np.ndarray, np.ndarray | None]:
        p = self.params

        def make() -> tuple[SampleMaps, np.ndarray, np.ndarray | None]:
            maps = render_sample(p.sample, p.size_px, pixel, p.reference_field_um)
            ratio = p.energy_ref_ev / energy_ev
            transmission = np.exp(-(ratio ** 3) * maps.mu_t)
            ft_t = scipy.fft.rfft2(transmission, workers=1).astype(np.complex64, copy=False)
            ft_phi = None
            if maps.phase_rad is not None:
                ft_phi = scipy.fft.rfft2(ratio * maps.phase_rad, workers=1).astype(
                    np.complex64, copy=False)
            return maps, ft_t, ft_phi
        return self._maps.get((round(energy_ev, 3), round(pixel, 9)), make)

    def _canvas(self, state: BeamlineState, g: _Geometry, frac_yx: tuple[float, float]
                ) -> np.ndarray:
        p = self.params
        key = (round(state.energy_ev, 3), round(g.pixel_nm, 9), round(g.defocus_um, 4),
               round(g.fill, 6), frac_yx)

        def make() -> np.ndarray:
            _, ft_t, ft_phi = self._sample_spectra(state.energy_ev, g.pixel_nm)
            shape = (p.size_px, p.size_px)
            spectrum = filtered_spectrum(ft_t, ft_phi, shape, g.pixel_nm, state.energy_ev,
                                         p.zp_dr_nm, g.fill, g.defocus_um, frac_yx)
            canvas = scipy.fft.irfft2(spectrum, s=shape, workers=1)
            canvas.setflags(write=False)
            return canvas
        return self._canvases.get(key, make)

    def _cell_px(self) -> float:
        return ILLUM_SPAN_FIELDS * self.params.size_px / (ILLUM_GRID - 1)

    def _spot_spectrum(self, pixel: float) -> np.ndarray:
        p = self.params

        def make() -> np.ndarray:
            grid = ILLUM_GRID
            cell_um = self._cell_px() * pixel * 1e-3
            spot = spot_map(grid, cell_um, p.spot_fwhm, p.spot_structure,
                            np.random.default_rng(self._spot_seed))
            pad = 2 * (grid - 1)
            wrapped = np.zeros((pad, pad))
            idx = (np.arange(grid) - (grid - 1) // 2) % pad
            wrapped[np.ix_(idx, idx)] = spot
            return scipy.fft.rfft2(wrapped, workers=1)
        return self._spots.get(round(pixel, 9), make)

    def _illumination(self, state: BeamlineState, pixel: float, t_s: float) -> np.ndarray:
        # A scan wider than the grid (two field widths) loses the light that falls outside:
        # the spot then never crosses the field.
        amp_px = state.shaker_amp_um * 1e3 / pixel
        spectrum = self._spot_spectrum(pixel)
        phase = 2 * math.pi * ((state.shaker_freq_hz * t_s) % 1.0)
        dy, dx, weights, whole = shaker_points(amp_px, state.shaker_freq_hz, state.exposure_s,
                                               phase)
        cell = self._cell_px()
        field = np.zeros((ILLUM_GRID, ILLUM_GRID), np.float32)
        if whole > 0:
            def make() -> np.ndarray:
                theta = 2 * math.pi * (np.arange(SHAKER_POINTS) + 0.5) / SHAKER_POINTS
                return average_spot(spectrum, ILLUM_GRID, amp_px * np.sin(theta),
                                    amp_px * np.cos(theta),
                                    np.full(SHAKER_POINTS, 1.0 / SHAKER_POINTS), cell)
            field += np.float32(whole) * self._fields.get((round(pixel, 9), round(amp_px, 6)),
                                                          make)
        if weights.size:
            field += average_spot(spectrum, ILLUM_GRID, dy, dx, weights, cell)
        return field

    def _uniformity_cv(self, field: np.ndarray, spot_xy: tuple[float, float]) -> float:
        """CV of the illumination over the field of view (sampled on a 64 × 64 lattice)."""
        n = self.params.size_px
        cell = self._cell_px()
        lattice = (np.arange(_UNIFORMITY_SAMPLES) + 0.5) * n / _UNIFORMITY_SAMPLES - n / 2.0
        centre = (ILLUM_GRID - 1) / 2.0

        def coords(offset: float) -> tuple[np.ndarray, np.ndarray]:
            u = np.clip((lattice - offset) / cell + centre, 0.0, ILLUM_GRID - 1.000001)
            u0 = np.floor(u).astype(np.int64)
            return u0, u - u0
        y0, wy = coords(spot_xy[1])
        x0, wx = coords(spot_xy[0])
        f = field.astype(np.float64)
        rows = (1 - wy)[:, None] * f[y0] + wy[:, None] * f[y0 + 1]
        values = (1 - wx)[None, :] * rows[:, x0] + wx[None, :] * rows[:, x0 + 1]
        mean = values.mean()
        return float(values.std() / mean) if mean > 1e-12 else math.nan

    # -- rendering ---------------------------------------------------------------------

    def sample_in_view(self, state: BeamlineState) -> bool:
        """Whether any of the sample lies in the field of view (False for the blank)."""
        _check_state(state)
        g = self._geometry(state)
        return self._sample_in_view(state, g, self._static_shift_px(state, g))

    def _static_shift_px(self, state: BeamlineState, g: _Geometry) -> tuple[float, float]:
        zy, zx = self._zp_shift_px(state, g)
        return (state.sample_y_um * 1e3 / g.pixel_nm + zy,
                state.sample_x_um * 1e3 / g.pixel_nm + zx)

    def _sample_in_view(self, state: BeamlineState, g: _Geometry,
                        shift: tuple[float, float]) -> bool:
        maps, _, _ = self._sample_spectra(state.energy_ev, g.pixel_nm)
        if maps.extent_um <= 0:
            return False
        radius_px = maps.extent_um * 1e3 / g.pixel_nm + 4.0  # + blur and fringes
        half = self.params.size_px / 2.0
        gap_y = max(abs(shift[0]) - half, 0.0)
        gap_x = max(abs(shift[1]) - half, 0.0)
        return math.hypot(gap_y, gap_x) < radius_px

    def render(self, state: BeamlineState, t_s: float) -> tuple[np.ndarray, dict[str, Any]]:
        """Render the frame of an exposure starting at ``t_s`` in ``state``.

        Parameters
        ----------
        state : BeamlineState
            Motor positions and settings at exposure start.
        t_s : float
            Exposure start on the simulation clock, s (≥ 0; the beam drift starts at 0).

        Returns
        -------
        image : ndarray, shape (N, N), uint16
            A new array (the caller may keep it).
        truth : dict
            :meth:`optics_truth` plus ``beam_x_px``, ``beam_y_px`` (spot centre − field centre
            at mid-exposure), ``uniformity_cv`` (of the illumination over the field, NaN when
            the spot is entirely off), ``vibration_x_nm``, ``vibration_y_nm`` (this frame's
            random + sinusoidal shift), ``photons`` (expected counts at illumination 1 and
            transmission 1), ``beam_on``, ``sample_in_view``, ``kind`` and ``t_s``.
        """
        truth = self.optics_truth(state)
        p = self.params
        g = self._geometry(state)
        kind = frame_kind(state)
        beam_x, beam_y = self.beam_offset_px(state, t_s + state.exposure_s / 2.0)
        beam_on = (state.shutter_open and state.ring_current_ma > 0.0 and kind != "dark")
        photons = 0.0
        if beam_on:
            photons = (p.flux_counts_per_s * state.exposure_s
                       * state.ring_current_ma / p.ring_current_ref_ma
                       * (g.pixel_nm / p.reference_pixel_nm) ** 2)
        field = self._illumination(state, g.pixel_nm, t_s)

        seed_bits = self._noise_rng.integers(0, 2 ** 63, dtype=np.int64)
        vib = self._noise_rng.normal(0.0, p.vibration_rms_nm, 2)
        t_mid = t_s + state.exposure_s / 2.0
        vib[1] += p.vibration_sine_nm * math.sin(2 * math.pi * p.vibration_sine_hz * t_mid)
        static = self._static_shift_px(state, g)
        in_view = self._sample_in_view(state, g, static)
        transmission = None
        shift = (0.0, 0.0)
        if in_view and kind != "flat" and photons > 0:  # no light: the sample is moot
            frac = tuple(
                round((s - math.floor(s)) / SHIFT_QUANTUM_PX) * SHIFT_QUANTUM_PX
                for s in static)
            transmission = self._canvas(state, g, frac)
            shift = (math.floor(static[0]) + vib[0] / g.pixel_nm,
                     math.floor(static[1]) + vib[1] / g.pixel_nm)
        image = np.empty((p.size_px, p.size_px), np.uint16)
        compose_frame(image, transmission, shift, field, self._cell_px(), (beam_y, beam_x),
                      photons, p.dark_counts, p.read_noise_counts, int(seed_bits))
        truth.update(beam_x_px=beam_x, beam_y_px=beam_y,
                     uniformity_cv=self._uniformity_cv(field, (beam_x, beam_y)),
                     vibration_x_nm=float(vib[1]), vibration_y_nm=float(vib[0]),
                     photons=photons, beam_on=beam_on,
                     sample_in_view=in_view and kind != "flat", kind=kind, t_s=float(t_s))
        return image, truth


def speed_report(sizes: tuple[int, ...] = (512, 2048), seconds: float = 2.0) -> None:
    """Print frames per second of steady-state renders of the default beamline.

    ``python -c "from hw.sim.detector import speed_report; speed_report()"``
    """
    for size in sizes:
        sim = Simulator(SimParams(size_px=size))
        state = sim.default_state()
        sim.render(state, 0.0)
        count, start, t = 0, time.perf_counter(), 0.0
        while time.perf_counter() - start < seconds:
            t += state.exposure_s
            sim.render(state, t)
            count += 1
        elapsed = time.perf_counter() - start
        print(f"{size}²: {count / elapsed:7.1f} fps ({1e3 * elapsed / count:6.2f} ms/frame)")
