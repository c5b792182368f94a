"""Sample transmission maps for the simulated TXM.

A sample is described at the reference energy (8 keV) by two maps on the detector's pixel
grid: the absorption ``μt`` (intensity transmission ``exp(−μt)``) and, for samples with phase
contrast, the phase shift ``φ`` in radian (negative: matter has refractive index ``1 − δ``, so
its exit wave leads the vacuum wave). :mod:`hw.sim.detector` scales them to other energies
(``μt ∝ E⁻³`` and ``φ ∝ 1/E``, away from absorption edges).

Scale: the samples are laid out in a disc of radius ``EXTENT × field_um`` about the sample's
origin, where ``field_um`` is the width of the field of view at the reference energy in the
high-resolution mode (20.4 µm for 2048 pixels of 9.94 nm). A smaller detector therefore sees
a proportionally smaller sample (a scaled-down beamline), while the sizes that define
resolution — the Siemens star's 30 nm finest spokes, cracks, pores, fibres — stay physical.
The disc fits the canvas down to the 6.07 nm pixel of 5 keV.

Samples (:data:`SAMPLES`)
-------------------------
``siemens``
    Siemens star, 1 µm gold-like pure absorber (``μt`` 0.39 at 8 keV): 36 spoke periods whose
    half-period is 30 nm at the inner radius (fewer periods when the field is too small to
    hold them, keeping 30 nm at the inner radius) inside a solid rim. Real gold also shifts
    the phase by ~2 rad per µm at 8 keV; that strong phase is left out because the simulator's
    phase model is linear (weak phase).
``battery``
    Cracked battery-cathode particles (NMC-like): seven absorbing spheres, ``μt`` up to 1.2 at
    the largest one's centre, each crossed by two or three 25–60 nm wide cracks and holding
    20–60 nm pores.
``blank``
    No structure at all (``μt = 0``): the "flat" case of autofocus.
``weak_phase``
    A weak-phase, carbon-like object (``β/δ = 0.003``): cell-like ellipsoids, 40–120 nm fibres
    and 15–40 nm particles with phase shifts of −0.08 to −0.2 rad each. In focus it is almost
    invisible; its Fresnel fringes grow with defocus (the case that fools naive focus scores).

Layouts are fixed (seeded with :data:`LAYOUT_SEED`): a sample is one physical object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SAMPLES = ("siemens", "battery", "blank", "weak_phase")
"""Names of the samples :func:`render_sample` draws."""

EXTENT = 0.28
"""Radius of the disc holding a sample, as a fraction of the reference field width."""

LAYOUT_SEED = 20240518
"""Seed of the random layouts (particles, cracks, fibres): every render is the same object."""

STAR_MU_T = 0.39
"""Siemens-star absorption at 8 keV (1 µm of gold)."""
STAR_PERIODS = 36
"""Spoke periods of the Siemens star around the full circle."""
STAR_FINEST_UM = 0.030
"""Half-period of the spokes at the star's inner radius, µm."""

BATTERY_MU_T = 1.2
"""Absorption through the centre of the largest battery particle at 8 keV."""
WEAK_BETA_DELTA = 0.003
"""β/δ of the weak-phase sample: ``μt = 2 (β/δ) |φ|``."""


@dataclass(frozen=True)
class SampleMaps:
    """A sample on the detector grid at the reference energy.

    Attributes
    ----------
    mu_t : ndarray, shape (N, N), float32, read-only
        Absorption ``μt``; the intensity transmission is ``exp(−μt)``.
    phase_rad : ndarray, shape (N, N), float32, read-only, or None
        Phase shift, radian; None for a pure absorber.
    extent_um : float
        Radius about the sample's origin outside which there is no structure, µm
        (0 for the blank).
    """

    mu_t: np.ndarray
    phase_rad: np.ndarray | None
    extent_um: float


def _axis_um(size_px: int, pixel_nm: float) -> np.ndarray:
    """Pixel-centre coordinates along one axis, µm, 0 at the canvas centre."""
    return ((np.arange(size_px, dtype=np.float64) - (size_px - 1) / 2.0)
            * (pixel_nm * 1e-3)).astype(np.float32)


def _window(axis: np.ndarray, centre_um: float, half_um: float) -> slice:
    """Index range of ``axis`` within ``centre ± half`` (may be empty)."""
    lo = int(np.searchsorted(axis, centre_um - half_um, side="left"))
    hi = int(np.searchsorted(axis, centre_um + half_um, side="right"))
    return slice(lo, hi)


def _soft(distance_um: np.ndarray, px_um: float) -> np.ndarray:
    """Anti-aliased coverage of the region where a signed distance is positive."""
    # minimum/maximum in place: np.clip is several times slower on large float32 arrays.
    out = distance_um * (1.0 / px_um)
    out += 0.5
    np.maximum(out, 0.0, out=out)
    return np.minimum(out, 1.0, out=out)


def _siemens(x: np.ndarray, y: np.ndarray, px_um: float, extent_um: float) -> np.ndarray:
    r_out = extent_um
    periods = int(min(STAR_PERIODS, max(4, math.floor(math.pi * r_out / 3 / STAR_FINEST_UM))))
    r_in = periods * STAR_FINEST_UM / math.pi
    rim_in = 0.94 * r_out
    mu_t = np.zeros((y.size, x.size), np.float32)
    rows, cols = _window(y, 0.0, r_out + px_um), _window(x, 0.0, r_out + px_um)
    yy, xx = np.meshgrid(y[rows], x[cols], indexing="ij")
    r = np.hypot(xx, yy)
    theta = np.arctan2(yy, xx)
    theta *= periods
    # Signed distance to the nearest spoke edge: r·sin(nθ)/n near an edge.
    spokes = _soft(np.sin(theta, out=theta) * r / periods, px_um)
    spokes *= _soft(r - r_in, px_um)
    spokes *= _soft(rim_in - r, px_um)
    rim = _soft(r - rim_in, px_um)
    rim *= _soft(r_out - r, px_um)
    spokes += rim
    spokes *= STAR_MU_T
    mu_t[rows, cols] = spokes
    return mu_t


def _capsule_distance(xx: np.ndarray, yy: np.ndarray, a: np.ndarray, b: np.ndarray
                      ) -> np.ndarray:
    """Distance from points to the segment a–b (µm)."""
    d = b - a
    t = np.clip(((xx - a[0]) * d[0] + (yy - a[1]) * d[1]) / max(float(d @ d), 1e-12), 0, 1)
    return np.hypot(xx - (a[0] + t * d[0]), yy - (a[1] + t * d[1]))


def _place(rng: np.random.Generator, radii: np.ndarray, extent_um: float
           ) -> list[tuple[float, float]]:
    """Centres for discs of ``radii`` inside the extent disc, overlapping as little as it can.

    Each disc takes the best of 200 random candidates: the one farthest (relative to the radii)
    from the discs already placed.
    """
    centres: list[tuple[float, float]] = []
    for radius in radii:
        r = extent_um - radius
        rad = r * np.sqrt(rng.uniform(0.0, 1.0, 200))
        ang = rng.uniform(0.0, 2 * math.pi, 200)
        cand = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
        score = np.full(200, np.inf)
        for (px, py), pr in zip(centres, radii, strict=False):
            score = np.minimum(score, np.hypot(cand[:, 0] - px, cand[:, 1] - py) - pr - radius)
        best = cand[int(np.argmax(score))]
        centres.append((float(best[0]), float(best[1])))
    return centres


def _battery(x: np.ndarray, y: np.ndarray, px_um: float, extent_um: float) -> np.ndarray:
    rng = np.random.default_rng(LAYOUT_SEED)
    mu_t = np.zeros((y.size, x.size), np.float32)
    radii = extent_um * np.array([0.36, 0.30, 0.27, 0.24, 0.21, 0.18, 0.15])
    mu = BATTERY_MU_T / (2.0 * radii[0])  # per µm of chord
    for radius, (cx, cy) in zip(radii, _place(rng, radii, extent_um), strict=True):
        rows, cols = _window(y, cy, radius), _window(x, cx, radius)
        yy, xx = np.meshgrid(y[rows] - cy, x[cols] - cx, indexing="ij")
        chord = 2.0 * np.sqrt(np.maximum(radius * radius - xx * xx - yy * yy, 0.0))
        for _ in range(int(rng.integers(2, 4))):
            phi = rng.uniform(0.0, math.pi)
            offset = rng.uniform(-0.5, 0.5) * radius
            half_width = 0.5 * rng.uniform(0.025, 0.060)
            dist = np.abs(xx * math.sin(phi) - yy * math.cos(phi) - offset)
            chord *= 1.0 - 0.7 * _soft(half_width - dist, px_um)
        for _ in range(20):
            pr = rng.uniform(0.020, 0.060)
            pd = rng.uniform(0.0, radius - pr)
            pa = rng.uniform(0.0, 2 * math.pi)
            d2 = (xx - pd * math.cos(pa)) ** 2 + (yy - pd * math.sin(pa)) ** 2
            chord -= 2.0 * np.sqrt(np.maximum(pr * pr - d2, 0.0))
        mu_t[rows, cols] += (mu * np.maximum(chord, 0.0)).astype(np.float32)
    return mu_t


def _weak_phase(x: np.ndarray, y: np.ndarray, px_um: float, extent_um: float) -> np.ndarray:
    rng = np.random.default_rng(LAYOUT_SEED + 1)
    phase = np.zeros((y.size, x.size), np.float32)

    def add(cx: float, cy: float, reach: float, profile) -> None:
        rows, cols = _window(y, cy, reach), _window(x, cx, reach)
        yy, xx = np.meshgrid(y[rows] - cy, x[cols] - cx, indexing="ij")
        phase[rows, cols] += profile(xx, yy).astype(np.float32)

    semi_axes = extent_um * rng.uniform(0.12, 0.22, (4, 2))
    cells = _place(rng, semi_axes.max(axis=1), extent_um)
    for (a_um, b_um), (cx, cy) in zip(semi_axes, cells, strict=True):
        tilt, peak = rng.uniform(0.0, math.pi), rng.uniform(0.08, 0.12)
        c, s = math.cos(tilt), math.sin(tilt)

        def cell(xx, yy, a_um=a_um, b_um=b_um, c=c, s=s, peak=peak):
            u, v = (xx * c + yy * s) / a_um, (-xx * s + yy * c) / b_um
            body = np.sqrt(np.maximum(1.0 - u * u - v * v, 0.0))
            nucleus = np.sqrt(np.maximum(1.0 - 9.0 * (u * u + v * v), 0.0))
            return -peak * (body + 0.5 * nucleus)  # a denser nucleus
        add(cx, cy, max(a_um, b_um), cell)
    for _ in range(12):  # fibres: polylines of cylinders that stay inside the disc
        radius, peak = 0.5 * rng.uniform(0.040, 0.120), rng.uniform(0.08, 0.20)
        r0, a0 = (extent_um - radius) * math.sqrt(rng.uniform()), rng.uniform(0, 2 * math.pi)
        points = [np.array([r0 * math.cos(a0), r0 * math.sin(a0)])]
        heading = rng.uniform(0.0, 2 * math.pi)
        for _ in range(3):
            heading += rng.normal(0.0, 0.5)
            step = extent_um * rng.uniform(0.10, 0.25)
            end = points[-1] + step * np.array([math.cos(heading), math.sin(heading)])
            if np.hypot(*end) > extent_um - radius:  # turn back towards the centre
                heading = math.atan2(-points[-1][1], -points[-1][0])
                end = points[-1] + step * np.array([math.cos(heading), math.sin(heading)])
            points.append(end)
        for a, b in zip(points[:-1], points[1:], strict=True):
            mid = 0.5 * (a + b)
            reach = 0.5 * float(np.hypot(*(b - a))) + radius

            def fibre(xx, yy, a=a - mid, b=b - mid, radius=radius, peak=peak):
                d = _capsule_distance(xx, yy, a, b) / radius
                return -peak * np.sqrt(np.maximum(1.0 - d * d, 0.0))
            add(float(mid[0]), float(mid[1]), reach, fibre)
    for _ in range(80):  # small particles
        radius, peak = rng.uniform(0.015, 0.040), rng.uniform(0.08, 0.20)
        r0, a0 = (extent_um - radius) * math.sqrt(rng.uniform()), rng.uniform(0, 2 * math.pi)

        def particle(xx, yy, radius=radius, peak=peak):
            return -peak * np.sqrt(np.maximum(1.0 - (xx * xx + yy * yy) / radius ** 2, 0.0))
        add(r0 * math.cos(a0), r0 * math.sin(a0), radius, particle)
    return phase


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@lru_cache(maxsize=4)
def render_sample(name: str, size_px: int, pixel_nm: float, field_um: float) -> SampleMaps:
    """Draw a sample on an ``size_px × size_px`` canvas of ``pixel_nm`` pixels.

    Renders are cached (the same arguments return the same read-only arrays).

    Parameters
    ----------
    name : str
        One of :data:`SAMPLES`.
    size_px : int
        Canvas size N, px.
    pixel_nm : float
        Pixel size at the sample, nm.
    field_um : float
        Reference field width that sizes the sample's layout, µm (see the module notes).

    Returns
    -------
    SampleMaps
        Maps of shape (N, N) centred on the canvas centre ``((N − 1)/2, (N − 1)/2)``.
    """
    if name not in SAMPLES:
        raise ValueError(f"unknown sample {name!r}; known: {list(SAMPLES)}")
    if int(size_px) != size_px or size_px < 8:
        raise ValueError(f"size_px must be an integer >= 8, got {size_px!r}")
    for label, value in (("pixel_nm", pixel_nm), ("field_um", field_um)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{label} must be a positive finite number, got {value!r}")
    axis = _axis_um(int(size_px), pixel_nm)
    px_um = pixel_nm * 1e-3
    extent_um = EXTENT * field_um
    if name == "blank":
        return SampleMaps(_readonly(np.zeros((size_px, size_px), np.float32)), None, 0.0)
    if name == "siemens":
        return SampleMaps(_readonly(_siemens(axis, axis, px_um, extent_um)), None, extent_um)
    if name == "battery":
        return SampleMaps(_readonly(_battery(axis, axis, px_um, extent_um)), None, extent_um)
    phase = _weak_phase(axis, axis, px_um, extent_um)
    mu_t = (2.0 * WEAK_BETA_DELTA) * np.abs(phase)
    return SampleMaps(_readonly(mu_t), _readonly(phase), extent_um)
