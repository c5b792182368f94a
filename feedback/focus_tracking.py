"""Focus tracking over energy (XANES): the in-focus ZP model and the energy-scan procedure.

Model
-----
With the sample and the detector a fixed distance ``L`` apart, the in-focus ZP–sample distance
is ``p(E) = 2Lf/(L + √(L² − 4Lf))`` with ``f = D·Δr·E/hc`` (:mod:`stream.optics`), and the
focus motor reads ``z = s·p(E) + c`` (``s = ±1``: the motor's direction, ``c``: its zero).
:func:`fit_focus_model` fits the effective Δr (it absorbs the uncertainty of D and of the
nominal zone width) and the offset ``c`` to ≥ 2 in-focus calibration points ``(E, z)``. The
linear two-point rule ``z = a + b·E`` that beamlines use today is available only on request
(``kind="linear"``): over 100 eV the two agree to a few nm, but ``p(E)`` curves
(``p ≈ f + f²/L + …``), so over a wide scan or outside the calibrated interval the line drifts
out of the depth of focus while the thin-lens model, fitted once, stays.

Procedure
---------
:func:`energy_scan` walks a list of energies. At each step it moves the energy, then the ZP
to the model's position (each put waits for motion done), measures the focus score on fresh
data frames, and refocuses locally (:func:`feedback.autofocus.focus_search` over ±1.5 DOF)
only when the score has dropped by more than ``drop_fraction`` from the last confirmed focus.
A resolved local refocus re-anchors the model there (its offset moves, the fitted zone width
stays: a focus jump from heat or a motor slip shifts the focus, it does not change the lens),
so the following steps start in focus. Each step reports the energy, the ZP position, the
score, the refocus event and the magnification relative to the first step (the field of view
scales with it).
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy import optimize

from feedback.autofocus import AutofocusConfig, FocusSearch, focus_search
from feedback.commands import Acquire, Command, Done, Log, Procedure, Verdict
from feedback.optics import ZonePlate
from feedback.safety import STOP_ERRORS, Guard, IntensityRule, Motion, mean_of, metric
from stream.optics import in_focus_zp_um

MODEL_KINDS = ("thin_lens", "linear")
"""Kinds of :class:`FocusModel`."""


@dataclass(frozen=True)
class FocusModel:
    """In-focus ZP motor position as a function of energy.

    Attributes
    ----------
    kind : str
        ``"thin_lens"`` or ``"linear"``.
    zone_plate : ZonePlate
        Geometry; for ``thin_lens`` its ``dr_nm`` is the fitted effective Δr.
    offset_um : float
        ``c`` in ``z = s·p(E) + c`` (thin lens) or the intercept ``a`` of ``z = a + b·E``.
    slope_um_per_ev : float
        ``b`` of the linear model (0 for thin lens).
    direction : int
        ``s``: +1 when a larger motor position moves the ZP away from the sample.
    points : tuple of (float, float)
        The calibration points ``(energy_ev, zp_z_um)``.
    residual_rms_um : float
        RMS of the calibration residuals (0 with exactly two points).
    """

    kind: str
    zone_plate: ZonePlate
    offset_um: float
    slope_um_per_ev: float = 0.0
    direction: int = 1
    points: tuple[tuple[float, float], ...] = ()
    residual_rms_um: float = 0.0

    def zp_z_um(self, energy_ev: float) -> float:
        """Predicted in-focus ZP motor position at ``energy_ev``, µm."""
        if self.kind == "linear":
            return self.offset_um + self.slope_um_per_ev * float(energy_ev)
        return self.direction * self.zone_plate.focus_distance_um(energy_ev) + self.offset_um

    def magnification(self, energy_ev: float) -> float:
        """X-ray magnification at ``energy_ev`` (thin lens with the model's zone plate)."""
        return self.zone_plate.magnification(energy_ev)

    def anchored(self, energy_ev: float, zp_z_um: float) -> FocusModel:
        """The same model shifted to pass through ``(energy_ev, zp_z_um)`` (added to points)."""
        shift = float(zp_z_um) - self.zp_z_um(energy_ev)
        return replace(self, offset_um=self.offset_um + shift,
                       points=self.points + ((float(energy_ev), float(zp_z_um)),))

    def as_dict(self) -> dict[str, Any]:
        """JSON-able description."""
        return {"kind": self.kind, "dr_nm": self.zone_plate.dr_nm,
                "diameter_um": self.zone_plate.diameter_um,
                "sample_detector_um": self.zone_plate.sample_detector_um,
                "offset_um": self.offset_um, "slope_um_per_ev": self.slope_um_per_ev,
                "direction": self.direction, "points": [list(p) for p in self.points],
                "residual_rms_um": self.residual_rms_um}


def _points(points: Sequence[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"calibration points must be (energy_ev, zp_z_um) pairs, got shape "
                         f"{arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("calibration points must be finite")
    energy, z = arr[:, 0], arr[:, 1]
    if np.unique(energy).size < 2:
        raise ValueError(f"need in-focus points at >= 2 distinct energies, got "
                         f"{np.unique(energy).size}")
    if np.any(energy <= 0):
        raise ValueError("calibration energies must be > 0 eV")
    return energy, z


def fit_focus_model(points: Sequence[tuple[float, float]], zone_plate: ZonePlate, *,
                    kind: str = "thin_lens", direction: int = 1) -> FocusModel:
    """Fit the in-focus ZP position vs energy to calibration points.

    Parameters
    ----------
    points : sequence of (energy_ev, zp_z_um), length ≥ 2
        In-focus ZP motor positions (e.g. resolved autofocus results) at ≥ 2 energies.
    zone_plate : ZonePlate
        Diameter and sample–detector distance (fixed); its ``dr_nm`` starts the fit.
    kind : str
        ``"thin_lens"`` (fitted effective Δr and offset) or ``"linear"`` (the two-point
        rule, least squares for more points).
    direction : int
        +1 when a larger motor position moves the ZP away from the sample, else −1.

    Returns
    -------
    FocusModel

    Raises
    ------
    ValueError
        Fewer than two distinct energies, non-finite points, an unknown kind, or no Δr within
        a factor 2 of the nominal that fits.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {MODEL_KINDS}, got {kind!r}")
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction!r}")
    energy, z = _points(points)
    pairs = tuple((float(e), float(v)) for e, v in zip(energy, z, strict=True))
    if kind == "linear":
        slope, intercept = np.polyfit(energy, z, 1)
        residual = z - (intercept + slope * energy)
        return FocusModel("linear", zone_plate, float(intercept), float(slope), direction, pairs,
                          float(np.sqrt(np.mean(residual ** 2))))

    def distances(dr_nm: float) -> np.ndarray:
        return np.array([in_focus_zp_um(e, zone_plate.diameter_um, dr_nm,
                                              zone_plate.sample_detector_um) for e in energy])

    def rss(dr_nm: float) -> float:
        try:
            p = direction * distances(dr_nm)
        except ValueError:  # L < 4f: this Δr focuses nothing at some energy
            return math.inf
        residual = z - p
        return float(np.sum((residual - residual.mean()) ** 2))

    nominal = zone_plate.dr_nm
    grid = np.linspace(0.5 * nominal, 2.0 * nominal, 61)
    values = np.array([rss(d) for d in grid])
    if not np.any(np.isfinite(values)):
        raise ValueError("no zone width within a factor 2 of the nominal focuses the sample at "
                         "the calibration energies")
    i = int(np.argmin(values))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    best = optimize.minimize_scalar(rss, bounds=(lo, hi), method="bounded",
                                    options={"xatol": 1e-9 * nominal})
    dr_nm = float(best.x)
    fitted = replace(zone_plate, dr_nm=dr_nm)
    residual = z - direction * distances(dr_nm)
    offset = float(residual.mean())
    return FocusModel("thin_lens", fitted, offset, 0.0, direction, pairs,
                      float(np.sqrt(np.mean((residual - offset) ** 2))))


@dataclass(frozen=True)
class TrackingConfig:
    """Settings of :func:`energy_scan`.

    Attributes
    ----------
    zp_role, energy_role : str
        Focus motor and energy roles.
    score_key : str
        Focus score (see :mod:`feedback.autofocus`).
    frames_per_step : int
        Data frames whose mean score is checked at each step.
    drop_fraction : float
        Refocus when the score falls below ``(1 − drop_fraction)`` × the score at the last
        confirmed focus.
    refocus_first : bool
        Refocus at the first energy to confirm the model and set the reference score.
    refocus : AutofocusConfig
        The local refocus (:func:`feedback.autofocus.focus_search` around the model's
        position; its role and score are this config's ``zp_role`` and ``score_key``).
    learn : bool
        Re-anchor the model at each resolved refocus (:meth:`FocusModel.anchored`).
    intensity : IntensityRule
        Frames darker than this (against the first) abort the scan.
    timeout_s : float or None
        Longest wait for frames per acquisition.
    """

    zp_role: str = "zp_z_um"
    energy_role: str = "energy_ev"
    score_key: str = "band_power"
    frames_per_step: int = 1
    drop_fraction: float = 0.3
    refocus_first: bool = True
    refocus: AutofocusConfig = field(default_factory=lambda: AutofocusConfig(
        half_range_dof=1.5))
    learn: bool = True
    intensity: IntensityRule = field(default_factory=IntensityRule)
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.drop_fraction < 1:
            raise ValueError(f"TrackingConfig.drop_fraction must be in (0, 1), got "
                             f"{self.drop_fraction!r}")
        if self.frames_per_step < 1:
            raise ValueError(f"TrackingConfig.frames_per_step must be >= 1, got "
                             f"{self.frames_per_step!r}")


@dataclass
class EnergyStep:
    """What happened at one energy of a scan (JSON-able through :meth:`as_dict`)."""

    energy_ev: float
    predicted_z_um: float
    zp_z_um: float
    score: float | None
    refocused: bool = False
    refocus_verdict: str | None = None
    magnification: float = math.nan
    magnification_ratio: float = math.nan

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class _Stop(Exception):
    """Ends the scan early: aborted, the reason in the message."""


class _Tracker:
    """State of one energy scan."""

    def __init__(self, guard: Guard, model: FocusModel, config: TrackingConfig) -> None:
        self.config = config
        self.model = model
        self.motion = Motion(guard)
        self.steps: list[EnergyStep] = []
        self.frames_used = 0
        self.reference_score: float | None = None
        self.reference_counts: float | None = None
        self.magnification0: float | None = None

    def scores(self, frames: int) -> Generator[Command, Any, list[tuple[float, float]]]:
        """(zp position, score) of ``frames`` fresh frames (at least one)."""
        cfg = self.config
        for _attempt in range(2):
            results = yield Acquire(frames, keys=(cfg.score_key, "mean_counts"),
                                    timeout_s=cfg.timeout_s)
            usable, problems = self.motion.fresh(list(results))
            out = []
            for result in usable:
                counts = metric(result, "mean_counts")
                pause = cfg.intensity.check(counts, self.reference_counts)
                if pause is not None:
                    raise _Stop(f"{pause} (mean counts {counts!r})")
                if self.reference_counts is None:
                    self.reference_counts = counts
                score = metric(result, cfg.score_key)
                if score is None:
                    problems.append(f"frame {result.get('seq')} has no {cfg.score_key}")
                    continue
                z = (result.get("positions") or {}).get(cfg.zp_role)
                out.append((float(z) if isinstance(z, int | float) and math.isfinite(z)
                            else self.motion.position[cfg.zp_role], score))
            if problems:
                yield Log(f"energy scan: dropped {len(problems)} frame(s)", "warning",
                          {"reasons": problems})
            if out:
                self.frames_used += len(out)
                return out
        raise _Stop("no usable frame")

    def refocus(self, energy_ev: float) -> Generator[Command, Any, FocusSearch]:
        """Local focus search from the model's position; ends at the best or back there."""
        cfg = self.config
        local = replace(cfg.refocus, role=cfg.zp_role, score_key=cfg.score_key)
        search = yield from focus_search(self.motion, self.model.zone_plate, local)
        self.frames_used += search.frames_used
        if search.verdict == Verdict.ABORTED:
            raise _Stop(f"local refocus at {energy_ev:g} eV: {search.reason}")
        return search

    def step(self, energy_ev: float, first: bool) -> Generator[Command, Any, EnergyStep]:
        cfg = self.config
        yield from self.motion.move(cfg.energy_role, energy_ev, "energy scan step")
        predicted = self.model.zp_z_um(energy_ev)
        lim = self.motion.guard.limits(cfg.zp_role)
        if not lim.contains(predicted):
            raise _Stop(f"predicted ZP position {predicted:.4g} µm at {energy_ev:g} eV is "
                        "outside the soft limits")
        yield from self.motion.move(
            cfg.zp_role, predicted, f"follow focus to {energy_ev:g} eV",
            {"model": self.model.kind, "dr_nm": self.model.zone_plate.dr_nm})
        measured = yield from self.scores(cfg.frames_per_step)
        score = mean_of([s for _, s in measured])
        step = EnergyStep(energy_ev, predicted, self.motion.position[cfg.zp_role], score)
        dropped = (self.reference_score is not None
                   and score < (1.0 - cfg.drop_fraction) * self.reference_score)
        if (first and cfg.refocus_first) or dropped:
            why = "first energy" if first else (f"score {score:.3g} fell below "
                                                 f"{1 - cfg.drop_fraction:.0%} of "
                                                 f"{self.reference_score:.3g}")
            yield Log(f"energy scan: refocusing at {energy_ev:g} eV ({why})")
            search = yield from self.refocus(energy_ev)
            fit = search.fit
            step.refocused, step.refocus_verdict = True, str(search.verdict)
            step.zp_z_um = self.motion.position[cfg.zp_role]
            if search.verdict == Verdict.RESOLVED:
                step.score = fit.baseline + fit.amplitude
                if cfg.learn:
                    self.model = self.model.anchored(energy_ev, fit.best_z_um)
                    yield Log(f"energy scan: model re-anchored at {energy_ev:g} eV, "
                              f"{fit.best_z_um:.4g} µm", data=self.model.as_dict())
        if self.reference_score is None or step.refocus_verdict == str(Verdict.RESOLVED):
            self.reference_score = step.score
        step.magnification = self.model.magnification(energy_ev)
        if self.magnification0 is None:
            self.magnification0 = step.magnification
        step.magnification_ratio = step.magnification / self.magnification0
        return step


def energy_scan(guard: Guard, model: FocusModel, energies_ev: Sequence[float],
                config: TrackingConfig | None = None) -> Procedure:
    """Scan the energy with the ZP following the focus model (a :mod:`feedback.commands`
    procedure).

    Parameters
    ----------
    guard : Guard
        Limits of the energy and ZP roles.
    model : FocusModel
        In-focus ZP position vs energy (:func:`fit_focus_model`).
    energies_ev : sequence of float
        Energies in scan order.
    config : TrackingConfig, optional

    Yields
    ------
    Move, Acquire, Log, ... then one Done
        ``Done.result``: ``verdict``, ``steps`` (:meth:`EnergyStep.as_dict` per energy:
        ``energy_ev``, ``predicted_z_um``, ``zp_z_um``, ``score``, ``refocused``,
        ``refocus_verdict``, ``magnification``, ``magnification_ratio``), ``refocus_events``
        (energies), ``frames_used`` and ``model`` (the final model). Verdict ``resolved`` when
        every refocus that happened was resolved, ``ambiguous`` when one was not, ``aborted``
        on an error or dark frames.
    """
    cfg = config if config is not None else TrackingConfig()
    try:
        energies = [float(e) for e in energies_ev]
    except (TypeError, ValueError):
        raise ValueError(f"energies_ev must be numbers, got {energies_ev!r}") from None
    if not energies or not all(math.isfinite(e) and e > 0 for e in energies):
        raise ValueError(f"energies_ev must be a non-empty list of positive energies, got "
                         f"{energies_ev!r}")
    return _energy_scan(_Tracker(guard, model, cfg), energies)


def _energy_scan(tracker: _Tracker, energies: list[float]) -> Procedure:

    def summary(verdict: Verdict) -> dict[str, Any]:
        return {"verdict": str(verdict), "steps": [s.as_dict() for s in tracker.steps],
                "refocus_events": [s.energy_ev for s in tracker.steps if s.refocused],
                "frames_used": tracker.frames_used, "model": tracker.model.as_dict()}

    try:
        for i, energy in enumerate(energies):
            tracker.steps.append((yield from tracker.step(energy, first=i == 0)))
        failed = [s.energy_ev for s in tracker.steps
                  if s.refocused and s.refocus_verdict != str(Verdict.RESOLVED)]
        if failed:
            done = Done(Verdict.AMBIGUOUS, "local refocus not resolved at "
                        + ", ".join(f"{e:g}" for e in failed) + " eV", summary(Verdict.AMBIGUOUS))
        else:
            done = Done(Verdict.RESOLVED, f"{len(energies)} energies tracked",
                        summary(Verdict.RESOLVED))
    except _Stop as stop:
        done = Done(Verdict.ABORTED, str(stop), summary(Verdict.ABORTED))
    except STOP_ERRORS as exc:
        done = Done(Verdict.ABORTED, f"{type(exc).__name__}: {exc}", summary(Verdict.ABORTED))
    yield done
    return done
