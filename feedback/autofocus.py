"""Zone-plate autofocus: fit a focus curve with a verdict, and the one-shot procedure.

Score
-----
The default score is the PSD band power (``metrics["band_power"]``, :mod:`stream.psd`): the
squared image contrast in a band of spatial frequencies (5–15 µm⁻¹ by default), with the
photon-noise floor subtracted and normalised by the mean². Its expectation does not depend on
dose or beam intensity, it falls smoothly and monotonically as defocus blurs the band away
(the blur disc ``2·NA·|z|`` grows linearly with defocus), and it is a continuous number at
every z. The PSD cut-off is the physically meaningful resolution but a poor focus score: it
saturates at the optics' limit over most of the depth of focus (flat top), it moves in
frequency-bin steps, and it is undefined (None) when the PSD finds no significant signal.
Gradient scores (Brenner, Tenengrad, normalised variance) carry the photon-noise variance
itself, so at low dose their focus peak sits on a large dose-dependent pedestal.

Fit
---
:func:`fit_focus` fits a Gaussian plus a constant, ``c + A·exp(−(z − z₀)²/(2w²))``, by
non-linear least squares (the constant takes the score of far-defocused images and the
residual noise; near its peak a Gaussian is the parabola-on-log-score model). ``z₀``'s
uncertainty comes from the fit covariance (scaled by the residuals unless the score's own
error is given). Guards against a wrong number, each giving a verdict instead:

- ``flat``: the Gaussian does not explain the curve significantly better than a constant
  (F-test), or its amplitude is not significant — a sample without structure;
- ``ambiguous``: two or more prominent maxima (a weak-phase object shows its largest contrast
  on both sides of focus, where phase turns into intensity, and the least contrast *at*
  focus; a fit there must not land on a fringe maximum), a width inconsistent with the depth
  of focus, or a peak position that the data do not pin down;
- ``railed``: the peak lies within half a step of the edge of the scanned range, or beyond.

Procedure
---------
:func:`autofocus` is a generator of :mod:`feedback.commands` (:func:`focus_search` is the
same without its final ``Done``, for use inside other procedures): read the start, acquire at
the start, a coarse pass over ±``half_range_dof`` depths of focus approached from below, fit.
When the frames show structure (a PSD verdict other than ``no_signal``) but the curve is not
yet significant — a low dose — the coarse points get more frames (×3, up to
``max_frames_per_point``) and the curve is refitted. If railed, the range is expanded once
beyond the railed edge; if resolved, a refinement around the fitted peak (more frames per
point when the coarse residuals show a noisy score) and a fit of everything; finally the
motor goes to the best position (resolved) or back to the start (any other verdict). Frames
taken before or while a move finished, or off the commanded position, are dropped; 12 frames
suffice at normal dose.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from scipy import optimize, signal, stats

from feedback.commands import Acquire, Command, Done, Log, Procedure, Result, Verdict
from feedback.optics import ZonePlate
from feedback.safety import STOP_ERRORS, Guard, IntensityRule, Motion, finite_or_none, metric

FIT_PARAMETERS = ("baseline", "amplitude", "center_um", "width_um")
"""Parameters of the Gaussian-plus-constant focus model, in fit order."""


@dataclass(frozen=True)
class FocusFit:
    """A fitted focus curve and its verdict.

    Attributes
    ----------
    verdict : Verdict
        ``resolved``, ``railed``, ``flat`` or ``ambiguous``.
    best_z_um : float or None
        Best focus, µm — only when resolved (never a number for another verdict).
    uncertainty_um : float or None
        1σ uncertainty of ``best_z_um``, µm — only when resolved.
    reason : str
        Why this verdict, in words.
    center_um, width_um, amplitude, baseline : float or None
        The fitted model (``width_um`` is the Gaussian σ); None when no fit converged.
    amplitude_err : float or None
        1σ uncertainty of the amplitude.
    noise : float or None
        Score noise per point used for the tests (given, or the fit's residual RMS).
    p_flat : float or None
        F-test probability that a constant explains the curve as well as the peak model.
    peaks_um : tuple of float
        Positions of the prominent maxima of the measured curve.
    n_points : int
        Points fitted.
    signal : bool
        Whether the curve varies significantly (not flat by the F-test); a procedure may
        average more frames when the images show structure but the curve has no signal yet.
    """

    verdict: Verdict
    best_z_um: float | None
    uncertainty_um: float | None
    reason: str
    center_um: float | None = None
    width_um: float | None = None
    amplitude: float | None = None
    baseline: float | None = None
    amplitude_err: float | None = None
    noise: float | None = None
    p_flat: float | None = None
    peaks_um: tuple[float, ...] = ()
    n_points: int = 0
    signal: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON-able dict (the verdict as its string)."""
        out = asdict(self)
        out["verdict"] = str(self.verdict)
        out["peaks_um"] = list(self.peaks_um)
        return out


def _gauss(z: np.ndarray, baseline: float, amplitude: float, center: float,
           width: float) -> np.ndarray:
    return baseline + amplitude * np.exp(-0.5 * ((z - center) / width) ** 2)


def _as_curve(z_um: Sequence[float], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    z = np.asarray(z_um, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if z.ndim != 1 or s.ndim != 1 or z.shape != s.shape:
        raise ValueError(f"z_um and scores must be 1-D of equal length, got shapes {z.shape} "
                         f"and {s.shape}")
    if z.size < 5:
        raise ValueError(f"need at least 5 points to fit a focus curve, got {z.size}")
    if not (np.all(np.isfinite(z)) and np.all(np.isfinite(s))):
        raise ValueError("z_um and scores must be finite (drop frames without a score first)")
    order = np.argsort(z, kind="stable")
    z, s = z[order], s[order]
    if np.unique(z).size < 4:
        raise ValueError(f"need at least 4 distinct z positions, got {np.unique(z).size}")
    return z, s


def _fit_gaussian(z: np.ndarray, s: np.ndarray, sigma: np.ndarray | None
                  ) -> tuple[np.ndarray, np.ndarray] | None:
    """Least-squares Gaussian + constant from a few starts; (params, covariance) or None."""
    span = float(z[-1] - z[0])
    steps = np.diff(np.unique(z))
    low = [-np.inf, 0.0, float(z[0]) - span, float(steps.min()) / 2.0]
    high = [np.inf, np.inf, float(z[-1]) + span, 2.0 * span]
    base0 = float(np.min(s))
    amp0 = max(float(np.max(s)) - base0, 1e-30)
    best = None
    for center0 in (float(z[np.argmax(s)]), float(np.mean(z))):
        for width0 in (span / 6.0, span / 3.0):
            p0 = [base0, amp0, center0, min(max(width0, low[3] * 1.01), high[3] * 0.99)]
            try:
                params, cov = optimize.curve_fit(
                    _gauss, z, s, p0=p0, sigma=sigma, absolute_sigma=sigma is not None,
                    bounds=(low, high), max_nfev=2000)
            except (RuntimeError, ValueError, optimize.OptimizeWarning):
                continue
            rss = float(np.sum(((s - _gauss(z, *params)) / (1.0 if sigma is None else sigma))
                               ** 2))
            if best is None or rss < best[0]:
                best = (rss, params, cov)
    return None if best is None else (best[1], best[2])


def _two_gauss(z: np.ndarray, baseline: float, amp1: float, amp2: float, center1: float,
               center2: float, width: float) -> np.ndarray:
    return (baseline + amp1 * np.exp(-0.5 * ((z - center1) / width) ** 2)
            + amp2 * np.exp(-0.5 * ((z - center2) / width) ** 2))


def _two_peak_rss(z: np.ndarray, s: np.ndarray, weights: np.ndarray | float) -> float | None:
    """Weighted RSS of the best two-Gaussian (shared width) fit, from the two highest maxima."""
    index, _ = signal.find_peaks(np.concatenate(([-np.inf], s, [-np.inf])))
    if index.size < 2:
        return None
    top = sorted(index - 1, key=lambda i: s[i])[-2:]
    span = float(z[-1] - z[0])
    step = float(np.diff(np.unique(z)).min())
    base0 = float(np.min(s))
    p0 = [base0, max(s[top[0]] - base0, 1e-30), max(s[top[1]] - base0, 1e-30),
          float(z[top[0]]), float(z[top[1]]), max(span / 8.0, step)]
    low = [-np.inf, 0.0, 0.0, float(z[0]) - span, float(z[0]) - span, step / 2.0]
    high = [np.inf, np.inf, np.inf, float(z[-1]) + span, float(z[-1]) + span, 2.0 * span]
    p0[5] = min(max(p0[5], low[5] * 1.01), high[5] * 0.99)
    sigma = None if np.isscalar(weights) else 1.0 / weights
    try:
        params, _ = optimize.curve_fit(_two_gauss, z, s, p0=p0, sigma=sigma, bounds=(low, high),
                                       max_nfev=4000)
    except (RuntimeError, ValueError, optimize.OptimizeWarning):
        return None
    return float(np.sum(((s - _two_gauss(z, *params)) * weights) ** 2))


def _prominent_peaks(z: np.ndarray, s: np.ndarray, floor: float, min_prominence: float
                     ) -> tuple[float, ...]:
    """Maxima of the measured curve standing out by ``min_prominence`` (edges included)."""
    padded = np.concatenate(([floor], s, [floor]))
    index, _ = signal.find_peaks(padded, prominence=min_prominence)
    return tuple(float(z[i - 1]) for i in index)


def _p_constant(rss0: float, rss: float, n: int, n_params: int, known_errors: bool) -> float:
    """Probability that a constant explains the curve as well as a model with ``n_params``.

    F-test on the residual sums of squares (χ² test of the improvement when the score errors
    are known).
    """
    extra = n_params - 1
    if known_errors:
        return float(stats.chi2.sf(max(rss0 - rss, 0.0), extra))
    if rss <= 0.0:
        return 0.0 if rss0 > 0 else 1.0
    f_stat = ((rss0 - rss) / extra) / (rss / (n - n_params))
    return float(stats.f.sf(f_stat, extra, n - n_params))


def fit_focus(z_um: Sequence[float], scores: Sequence[float], *, dof_um: float | None = None,
              score_err: float | Sequence[float] | None = None,
              structure: bool | None = None, min_amplitude: float = 0.0,
              p_flat_max: float = 1e-3, min_significance: float = 4.0,
              peak_fraction: float = 0.3) -> FocusFit:
    """Fit a measured focus curve and judge it.

    Parameters
    ----------
    z_um : sequence of float, shape (n,)
        Focus motor positions, µm (any order; repeats allowed), n ≥ 5 with ≥ 4 distinct.
    scores : sequence of float, shape (n,)
        Focus score at each position (larger is sharper), finite.
    dof_um : float, optional
        Half-width of the depth of focus, µm; when given, a fitted σ outside
        ``[DOF/4, 4·DOF]`` is ``ambiguous`` (not a zone-plate focus curve).
    score_err : float or sequence of float, optional
        1σ error of each score (e.g. from repeated frames); None: estimated from the residuals.
    structure : bool, optional
        Whether the images show structure, judged independently of this curve (e.g. any PSD
        verdict other than ``no_signal``). False: ``flat`` whatever the curve. True: a curve
        without a significant single peak is ``ambiguous``, not ``flat`` (a weak-phase
        object's two-lobed curve fits no single peak). None: judged from the curve alone.
    min_amplitude : float
        Smallest score variation (score units) that counts as signal.
    p_flat_max : float
        Largest F-test probability (neither one peak nor, from 8 points on, two peaks
        explain the curve better than a constant) still accepted as signal.
    min_significance : float
        Smallest amplitude / amplitude error of the single peak for a number; a less
        significant peak on a varying curve is ``ambiguous``.
    peak_fraction : float
        A maximum counts as prominent when it stands out (above the higher of the minima on
        either side, the range ends counting as the curve's minimum) by this fraction of the
        curve's full range; two or more make the curve ``ambiguous``.

    Returns
    -------
    FocusFit
    """
    z, s = _as_curve(z_um, scores)
    if dof_um is not None and not (dof_um > 0 and math.isfinite(dof_um)):
        raise ValueError(f"dof_um must be a positive number or None, got {dof_um!r}")
    sigma = None
    if score_err is not None:
        sigma = np.broadcast_to(np.asarray(score_err, dtype=np.float64), s.shape).copy()
        if not np.all(np.isfinite(sigma) & (sigma > 0)):
            raise ValueError("score_err must be positive and finite")
    # Work in units of the largest |score| so that no score magnitude overflows the fit.
    scale = float(np.max(np.abs(s))) or 1.0
    s = s / scale
    if sigma is not None:
        sigma = sigma / scale
    n = s.size
    common = {"n_points": n}
    fitted = _fit_gaussian(z, s, sigma)
    spread = float(np.max(s) - np.min(s))
    if fitted is None:
        return FocusFit(Verdict.FLAT if spread == 0 else Verdict.AMBIGUOUS, None, None,
                        "the focus model could not be fitted", **common)
    params, cov = fitted
    baseline, amplitude, center, width = (float(v) for v in params)
    errors = np.sqrt(np.clip(np.diag(cov), 0.0, np.inf)) if np.all(np.isfinite(cov)) \
        else np.full(4, np.inf)
    weights = 1.0 if sigma is None else 1.0 / sigma
    rss1 = float(np.sum(((s - _gauss(z, *params)) * weights) ** 2))
    mean = float(np.average(s, weights=None if sigma is None else weights ** 2))
    rss0 = float(np.sum(((s - mean) * weights) ** 2))
    noise = math.sqrt(rss1 / (n - 4)) if sigma is None else float(np.median(sigma))
    p_flat = _p_constant(rss0, rss1, n, 4, sigma is not None)
    if n >= 8:
        # A curve with two lobes fits no single peak; test it against a constant too, so
        # that it is judged (ambiguous) rather than called flat.
        rss2 = _two_peak_rss(z, s, weights)
        if rss2 is not None:
            p_flat = min(p_flat, _p_constant(rss0, rss2, n, 6, sigma is not None))
    fit = dict(center_um=center, width_um=width, amplitude=amplitude * scale,
               baseline=baseline * scale, amplitude_err=float(errors[1]) * scale,
               noise=noise * scale, p_flat=p_flat, **common)
    significance = amplitude / errors[1] if errors[1] > 0 else math.inf
    lowest = float(np.min(s))
    peaks = _prominent_peaks(z, s, lowest, peak_fraction * spread) if spread > 0 else ()
    fit["peaks_um"] = peaks
    listed = ", ".join(f"{p:.4g}" for p in peaks)
    if structure is False:
        return FocusFit(Verdict.FLAT, None, None,
                        "the images show no structure (no significant PSD signal)", **fit)
    stats_text = (f"amplitude {float(amplitude) * scale:.3g} ± {float(errors[1]) * scale:.3g}, "
                  f"p(flat) = {p_flat:.2g}")
    fit["signal"] = not (spread * scale <= min_amplitude or p_flat > p_flat_max)
    if not fit["signal"]:
        if structure:
            return FocusFit(Verdict.AMBIGUOUS, None, None,
                            f"the images show structure but the score does not vary "
                            f"significantly ({stats_text}; maxima at z = {listed} µm)", **fit)
        return FocusFit(Verdict.FLAT, None, None, f"no significant focus peak ({stats_text})",
                        **fit)
    if len(peaks) >= 2:
        return FocusFit(Verdict.AMBIGUOUS, None, None,
                        f"several comparable maxima at z = {listed} µm (a phase object's "
                        "fringes?)", **fit)
    distinct = np.unique(z)
    low_edge = distinct[0] + 0.5 * (distinct[1] - distinct[0])
    high_edge = distinct[-1] - 0.5 * (distinct[-1] - distinct[-2])
    if not low_edge <= center <= high_edge:
        return FocusFit(Verdict.RAILED, None, None,
                        f"peak at {center:.4g} µm is at or beyond the edge of the scanned range "
                        f"[{z[0]:.4g}, {z[-1]:.4g}] µm", **fit)
    if amplitude * scale <= min_amplitude or significance < min_significance:
        return FocusFit(Verdict.AMBIGUOUS, None, None,
                        f"the score varies but no single peak is significant ({stats_text}; "
                        f"maxima at z = {listed} µm)", **fit)
    if dof_um is not None and not 0.25 * dof_um <= width <= 4.0 * dof_um:
        return FocusFit(Verdict.AMBIGUOUS, None, None,
                        f"peak width σ = {width:.3g} µm is inconsistent with a depth of focus "
                        f"of ±{dof_um:.3g} µm", **fit)
    uncertainty = float(errors[2])
    if not (math.isfinite(uncertainty) and uncertainty < width):
        return FocusFit(Verdict.AMBIGUOUS, None, None,
                        f"peak position not determined (±{uncertainty:.3g} µm for a width of "
                        f"{width:.3g} µm)", **fit)
    return FocusFit(Verdict.RESOLVED, center, uncertainty,
                    f"single peak at {center:.4g} ± {uncertainty:.2g} µm", **fit)


@dataclass(frozen=True)
class AutofocusConfig:
    """Settings of :func:`autofocus`.

    Attributes
    ----------
    role : str
        Focus motor role.
    score_key : str
        Metric used as the focus score (larger is sharper); see the module docstring.
    half_range_dof : float
        Coarse range, ± this many depths of focus around the start.
    coarse_points : int
        Positions of the coarse pass (the start, if on the grid, is measured only once).
    refine_points : int
        Positions of the refinement around the coarse peak.
    refine_half_width_dof : float
        Refinement range, ± this many depths of focus around the coarse peak.
    expand_dof : float
        When the coarse peak is railed, the range is extended once by this many depths of
        focus beyond the railed edge.
    frames_per_point : int
        Frames per position in the coarse pass.
    max_frames_per_point : int
        Most frames per refinement position.
    noise_per_frame : float
        Relative score noise (noise / peak amplitude, from the coarse fit) that one frame per
        refinement position tolerates; a noisier score (low dose) gets
        ``(noise / noise_per_frame)²`` frames per position, up to ``max_frames_per_point``.
    backlash : float
        Each ascending sweep starts from this far below its first position (µm; 0: off).
    intensity : IntensityRule
        Frames darker than this (against the first frames) abort the procedure.
    timeout_s : float or None
        Longest wait for frames per acquisition (None: the executor's default).
    """

    role: str = "zp_z_um"
    score_key: str = "band_power"
    half_range_dof: float = 3.0
    coarse_points: int = 7
    refine_points: int = 5
    refine_half_width_dof: float = 1.0
    expand_dof: float = 3.0
    frames_per_point: int = 1
    max_frames_per_point: int = 8
    noise_per_frame: float = 0.03
    backlash: float = 0.0
    intensity: IntensityRule = field(default_factory=IntensityRule)
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("half_range_dof", "refine_half_width_dof", "expand_dof",
                     "noise_per_frame"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"AutofocusConfig.{name} must be > 0, got {value!r}")
        if self.coarse_points < 5 or self.refine_points < 3:
            raise ValueError("AutofocusConfig: need coarse_points >= 5 and refine_points >= 3, "
                             f"got {self.coarse_points}, {self.refine_points}")
        if not 1 <= self.frames_per_point <= self.max_frames_per_point:
            raise ValueError("AutofocusConfig: need 1 <= frames_per_point <= "
                             f"max_frames_per_point, got {self.frames_per_point}, "
                             f"{self.max_frames_per_point}")
        if not (math.isfinite(self.backlash) and self.backlash >= 0):
            raise ValueError(f"AutofocusConfig.backlash must be >= 0, got {self.backlash!r}")


class _Stop(Exception):
    """Ends a focus search early with a verdict (the motor goes back to the start)."""

    def __init__(self, verdict: Verdict, reason: str) -> None:
        super().__init__(reason)
        self.verdict = verdict


@dataclass(frozen=True)
class FocusSearch:
    """Outcome of :func:`focus_search` (the autofocus without its :class:`Done`).

    Attributes
    ----------
    verdict : Verdict
        The fit's verdict, or ``aborted`` when frames were too dark or none was usable.
    reason : str
    fit : FocusFit or None
        The last fit (None when the search stopped before one).
    start_z_um, final_z_um : float or None
        Focus motor before and after.
    frames_used : int
    energy_ev, dof_um : float or None
    points : list of [z_um, score]
    """

    verdict: Verdict
    reason: str
    fit: FocusFit | None
    start_z_um: float | None
    final_z_um: float | None
    frames_used: int
    energy_ev: float | None
    dof_um: float | None
    points: list[list[float]]

    def summary(self, score_key: str) -> dict[str, Any]:
        """The JSON-able result of an autofocus (see :func:`autofocus`)."""
        resolved = self.verdict == Verdict.RESOLVED and self.fit is not None
        return {
            "verdict": str(self.verdict),
            "best_z_um": self.fit.best_z_um if resolved else None,
            "uncertainty_um": self.fit.uncertainty_um if resolved else None,
            "start_z_um": self.start_z_um, "final_z_um": self.final_z_um,
            "frames_used": self.frames_used, "energy_ev": self.energy_ev,
            "dof_um": self.dof_um, "score_key": score_key,
            "fit": self.fit.as_dict() if self.fit is not None else None,
            "points": self.points,
        }


class _FocusScan:
    """The measured focus curve and the bookkeeping of one focus search."""

    def __init__(self, motion: Motion, config: AutofocusConfig) -> None:
        self.config = config
        self.motion = motion
        self.z: list[float] = []
        self.scores: list[float] = []
        self.frames_used = 0
        self.structure = False
        self.reference_counts: float | None = None
        self.energy_ev: float | None = None
        self.start: float | None = None
        self.dof_um: float | None = None
        self.fit: FocusFit | None = None

    def _take(self, results: list[Result], z_commanded: float) -> list[str]:
        """Keep the usable frames' scores; the reasons for the dropped ones."""
        cfg = self.config
        usable, problems = self.motion.fresh(results)
        for result in usable:
            counts = metric(result, "mean_counts")
            pause = cfg.intensity.check(counts, self.reference_counts)
            if pause is not None:
                raise _Stop(Verdict.ABORTED, f"{pause} (mean counts {counts!r} against "
                                             f"{self.reference_counts!r} at the start)")
            if self.reference_counts is None:
                self.reference_counts = counts
            score = metric(result, cfg.score_key)
            if score is None:
                problems.append(f"frame {result.get('seq')} has no {cfg.score_key}")
                continue
            if self.energy_ev is None:
                self.energy_ev = finite_or_none(result.get("energy_ev"))
            if (result.get("metrics") or {}).get("psd_verdict") not in (None, "no_signal"):
                self.structure = True
            position = finite_or_none((result.get("positions") or {}).get(cfg.role))
            self.z.append(z_commanded if position is None else position)
            self.scores.append(score)
            self.frames_used += 1
        return problems

    def measure(self, z_um: float | None, frames: int, why: str) -> Generator[Command, Any, None]:
        """Move to ``z_um`` (None: stay) and add the scores of ``frames`` fresh frames."""
        cfg = self.config
        if z_um is not None:
            last = {cfg.score_key: self.scores[-1]} if self.scores else {}
            yield from self.motion.move(cfg.role, z_um, why, last)
        here = self.motion.position[cfg.role]
        for _attempt in range(2):
            results = yield Acquire(frames, after_move=bool(self.motion.done),
                                    keys=(cfg.score_key, "mean_counts"), timeout_s=cfg.timeout_s)
            before = self.frames_used
            problems = self._take(list(results), here)
            if problems:
                yield Log(f"autofocus: dropped {len(problems)} frame(s) at {here:.4g} µm",
                          "warning", {"reasons": problems})
            if self.frames_used > before:
                return
        raise _Stop(Verdict.ABORTED, f"no usable frame at {cfg.role} = {here:.4g} µm")

    def sweep(self, points: Sequence[float], frames: int, why: str
              ) -> Generator[Command, Any, None]:
        """Measure at ``points`` in ascending order, approached from below."""
        ordered = sorted(points)
        if ordered:
            yield from self.approach(ordered[0], "backlash: approach the sweep from below",
                                     final=False)
        for z in ordered:
            yield from self.measure(z, frames, why)

    def approach(self, target: float, why: str, metrics: dict[str, Any] | None = None, *,
                 final: bool = True) -> Generator[Command, Any, None]:
        """With backlash compensation, first go below ``target``; then to it when ``final``."""
        cfg = self.config
        lim = self.motion.guard.limits(cfg.role)
        if cfg.backlash > 0 and self.motion.position[cfg.role] > target:
            yield from self.motion.move(cfg.role, max(target - cfg.backlash, lim.low),
                                        "backlash: approach from below")
        if final:
            yield from self.motion.move(cfg.role, target, why, metrics)

    def refit(self) -> FocusFit:
        self.fit = fit_focus(self.z, self.scores, dof_um=self.dof_um, structure=self.structure)
        return self.fit

    def outcome(self, verdict: Verdict, reason: str) -> FocusSearch:
        return FocusSearch(verdict, reason, self.fit, self.start,
                           self.motion.position.get(self.config.role), self.frames_used,
                           self.energy_ev, self.dof_um,
                           [[z, s] for z, s in zip(self.z, self.scores, strict=True)])


def _grid(center: float, half_width: float, n: int, low: float, high: float) -> list[float]:
    """``n`` evenly spaced positions over ``center ± half_width`` within ``[low, high]``."""
    lo, hi = max(center - half_width, low), min(center + half_width, high)
    return [float(v) for v in np.linspace(lo, hi, n)] if hi > lo else [float(lo)]


def focus_search(motion: Motion, zone_plate: ZonePlate, config: AutofocusConfig | None = None
                 ) -> Generator[Command, Any, FocusSearch]:
    """The autofocus as a sub-procedure: everything but the final :class:`Done`.

    Starts where the focus motor is, ends at the best focus (resolved) or back at that start
    (any other outcome). Dark frames or no usable frame end it with verdict ``aborted`` after
    returning to the start; an error thrown in by the executor
    (:data:`feedback.safety.STOP_ERRORS`) ends it with verdict ``aborted`` at once. After an
    ``aborted`` search the caller must put nothing more.

    Parameters
    ----------
    motion : Motion
        The calling procedure's motion bookkeeping (its moves count for the stale-frame rule).
    zone_plate : ZonePlate
        Gives the depth of focus at the frames' energy.
    config : AutofocusConfig, optional

    Returns
    -------
    FocusSearch
    """
    cfg = config if config is not None else AutofocusConfig()
    scan = _FocusScan(motion, cfg)
    try:
        try:
            fit = yield from _search(scan, zone_plate)
        except _Stop as stop:
            yield Log(f"autofocus: {stop}; returning to the start", "warning")
            if scan.start is not None:
                yield from scan.approach(scan.start, f"autofocus stopped ({stop}): back to start")
            return scan.outcome(stop.verdict, str(stop))
        if fit.verdict == Verdict.RESOLVED:
            yield from scan.approach(fit.best_z_um, f"autofocus resolved: {fit.reason}",
                                     {"verdict": str(fit.verdict)})
        else:
            yield from scan.approach(scan.start, f"autofocus {fit.verdict}: back to the start",
                                     {"verdict": str(fit.verdict)})
    except STOP_ERRORS as exc:
        return scan.outcome(Verdict.ABORTED, f"{type(exc).__name__}: {exc}")
    return scan.outcome(fit.verdict, fit.reason)


def autofocus(guard: Guard, zone_plate: ZonePlate,
              config: AutofocusConfig | None = None) -> Procedure:
    """One-shot zone-plate autofocus (a procedure of :mod:`feedback.commands`).

    Parameters
    ----------
    guard : Guard
        Limits of ``config.role`` (the scan is planned inside them, in steps of at most the
        maximum step).
    zone_plate : ZonePlate
        Gives the depth of focus at the energy of the first frame (range and width check).
    config : AutofocusConfig, optional

    Yields
    ------
    Read, Move, Acquire, Log, then one Done
        ``Done.result`` holds ``verdict``, ``best_z_um`` and ``uncertainty_um`` (numbers only
        when resolved), ``start_z_um``, ``final_z_um``, ``frames_used``, ``energy_ev``,
        ``dof_um``, ``score_key``, ``fit`` (:meth:`FocusFit.as_dict`) and ``points``
        (``[z_um, score]`` per used frame).

    Notes
    -----
    The motor ends at the best focus when resolved and at its start otherwise; after an error
    thrown in by the executor (:data:`feedback.safety.STOP_ERRORS`) it puts nothing more.
    """
    cfg = config if config is not None else AutofocusConfig()
    return _autofocus(Motion(guard), zone_plate, cfg)


def _autofocus(motion: Motion, zone_plate: ZonePlate, cfg: AutofocusConfig) -> Procedure:
    search = yield from focus_search(motion, zone_plate, cfg)
    done = Done(search.verdict, search.reason, search.summary(cfg.score_key))
    yield done
    return done


def _search(scan: _FocusScan, zone_plate: ZonePlate) -> Generator[Command, Any, FocusFit]:
    cfg = scan.config
    role = cfg.role
    lim = scan.motion.guard.limits(role)
    if role in scan.motion.position:
        start = scan.motion.position[role]
    else:
        start = yield from scan.motion.read(role)
    scan.start = start
    if not lim.contains(start):
        raise _Stop(Verdict.ABORTED, f"{role} starts at {start:g}, outside the soft limits")
    yield from scan.measure(None, cfg.frames_per_point, "autofocus: score at the start")
    if scan.energy_ev is None or scan.energy_ev <= 0:
        raise _Stop(Verdict.ABORTED, "the frames carry no photon energy")
    dof = scan.dof_um = zone_plate.dof_um(scan.energy_ev)
    half = cfg.half_range_dof * dof
    coarse = _grid(start, half, cfg.coarse_points, lim.low, lim.high)
    step = (coarse[-1] - coarse[0]) / max(len(coarse) - 1, 1)
    yield Log(f"autofocus: coarse pass over [{coarse[0]:.4g}, {coarse[-1]:.4g}] µm "
              f"(±{cfg.half_range_dof:g} DOF, DOF ±{dof:.3g} µm at {scan.energy_ev:g} eV)")
    yield from scan.sweep([z for z in coarse if abs(z - start) > 1e-9 * max(1.0, abs(start))],
                          cfg.frames_per_point, "autofocus coarse pass")
    fit = scan.refit()
    yield Log(f"autofocus: coarse fit {fit.verdict}: {fit.reason}", data=fit.as_dict())
    frames = cfg.frames_per_point
    while not fit.signal and scan.structure and frames < cfg.max_frames_per_point:
        # Structure in the images but no significant curve: a low dose. Average more frames.
        more = min(cfg.max_frames_per_point, 3 * frames) - frames
        frames += more
        yield Log(f"autofocus: the score is noisy; {frames} frames per point")
        yield from scan.sweep(coarse, more, "autofocus coarse pass, more frames")
        fit = scan.refit()
        yield Log(f"autofocus: averaged coarse fit {fit.verdict}: {fit.reason}",
                  data=fit.as_dict())
    if fit.verdict == Verdict.RAILED and step > 0:
        upward = fit.center_um is not None and fit.center_um > start
        reach = cfg.expand_dof * dof
        if upward:
            extra = np.arange(coarse[-1] + step, min(coarse[-1] + reach, lim.high) + 1e-9, step)
        else:
            extra = np.arange(coarse[0] - step, max(coarse[0] - reach, lim.low) - 1e-9, -step)
        if extra.size:
            yield Log(f"autofocus: railed; expanding the range once to "
                      f"[{min(coarse[0], extra.min()):.4g}, {max(coarse[-1], extra.max()):.4g}] µm")
            yield from scan.sweep([float(v) for v in extra], frames, "autofocus range expansion")
            fit = scan.refit()
            yield Log(f"autofocus: expanded fit {fit.verdict}: {fit.reason}", data=fit.as_dict())
    if fit.verdict != Verdict.RESOLVED:
        return fit
    relative_noise = (fit.noise or 0.0) / fit.amplitude if fit.amplitude else math.inf
    if math.isfinite(relative_noise):
        # Each frame is a point of the fit, so this is the noise of one frame's score.
        needed = (relative_noise / cfg.noise_per_frame) ** 2
        frames = int(min(cfg.max_frames_per_point, max(frames, math.ceil(needed))))
    else:
        frames = cfg.max_frames_per_point
    refine = _grid(fit.best_z_um, cfg.refine_half_width_dof * dof, cfg.refine_points,
                   lim.low, lim.high)
    yield Log(f"autofocus: refining over [{refine[0]:.4g}, {refine[-1]:.4g}] µm with {frames} "
              f"frame(s) per point (relative score noise {relative_noise:.3g})")
    yield from scan.sweep(refine, frames, "autofocus refinement")
    fit = scan.refit()
    yield Log(f"autofocus: final fit {fit.verdict}: {fit.reason}", data=fit.as_dict())
    if fit.verdict == Verdict.RESOLVED and not lim.contains(fit.best_z_um):
        scan.fit = replace(fit, verdict=Verdict.RAILED, best_z_um=None, uncertainty_um=None,
                           reason=f"best focus {fit.best_z_um:.4g} µm lies outside the soft "
                                  "limits")
        return scan.fit
    return fit
