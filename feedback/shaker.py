"""Condenser shaker tuning: whole shaker periods per exposure, then the smallest amplitude that
makes the field flat enough, judged on flat frames.

The shaker scans the condenser spot on a circle so that, integrated over an exposure, it fills
the field and the zone plate's aperture. Two things make a flat field:

1. **Frequency.** An exposure of ``τ`` s at ``ν`` Hz integrates ``ν·τ`` periods; the fraction
   of a period left over puts an arc of extra light where the scan happened to be, different
   in every frame (a flat that never repeats is a flat correction that never works). So
   ``ν = P/τ`` with ``P`` a whole number ≥ ``min_periods``, the one nearest the present
   frequency within the frequency's soft limits.
2. **Amplitude.** A small circle leaves a hot spot; a circle near the spot size gives the
   flattest field and fills the aperture (the NA fill, the partial coherence σ); a larger one
   leaves a ring with a dim centre and loses light. The procedure scans amplitudes upward,
   measuring the illumination uniformity (``uniformity_cv``) on flat frames and, optionally,
   the NA fill (``na_fill``, from the PSD cut-off, on data frames). It picks the smallest
   amplitude whose CV meets the target (2 % by default) and whose NA fill is within
   ``na_fill_tolerance`` of the best NA fill among the amplitudes that meet the target —
   with ``cv_margin`` of headroom below the target when some amplitude has it — narrows that
   amplitude down by bisection, and verifies it with fresh flats. When the flat region is
   narrower than the grid spacing (no grid amplitude passes), a golden-section search finds
   the bottom of the CV valley first and the bisection then runs down its lower flank.

Verdicts: ``resolved`` (target met and verified), ``railed`` (no frequency gives whole periods
within the limits, or the CV is still falling at the largest amplitude), ``flat`` (no light on
the flat frames), ``ambiguous`` (the best CV misses the target), ``aborted``. Anything but
``resolved`` puts the frequency and amplitude back where they were.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import numpy as np

from feedback.commands import Acquire, Command, Done, Log, Procedure, Verdict
from feedback.safety import STOP_ERRORS, Guard, Motion, finite_or_none, mean_of, metric


@dataclass(frozen=True)
class ShakerConfig:
    """Settings of :func:`tune_shaker`.

    Attributes
    ----------
    amp_role, freq_role : str
        Shaker amplitude (µm) and frequency (Hz) roles.
    target_cv : float
        Uniformity target: coefficient of variation of the flat field (0.02 = 2 %).
    cv_margin : float
        Headroom: the amplitude is the smallest that reaches ``target_cv · (1 − cv_margin)``
        when any scanned amplitude does (the smallest that meets ``target_cv`` otherwise).
    amp_min_um, amp_max_um : float or None
        Amplitude range scanned (None: the role's soft limits).
    n_amplitudes : int
        Amplitudes in the upward scan.
    bisect_steps : int
        Bisection steps between the last failing and the first passing amplitude (or golden
        section steps around the best one when none passes).
    min_periods : int
        Fewest whole shaker periods per exposure.
    flat_frames : int
        Flat frames averaged per amplitude.
    measure_na_fill : bool
        Also measure the NA fill on data frames at each amplitude.
    data_frames : int
        Data frames per amplitude for the NA fill.
    na_fill_tolerance : float
        An amplitude's NA fill counts as best when within this of the best measured.
    dark_counts : float
        Dark level of the flat frames (counts), subtracted before comparing light levels.
    min_light_counts : float
        Flats with less light than this (after the dark) have no light: ``flat`` verdict.
    min_light_fraction : float
        An amplitude whose flats keep less than this fraction of the start's light cannot
        pass (a scan so wide it throws the light away).
    timeout_s : float or None
        Longest wait for frames per acquisition.
    """

    amp_role: str = "shaker_amp_um"
    freq_role: str = "shaker_freq_hz"
    target_cv: float = 0.02
    cv_margin: float = 0.25
    amp_min_um: float | None = None
    amp_max_um: float | None = None
    n_amplitudes: int = 12
    bisect_steps: int = 3
    min_periods: int = 1
    flat_frames: int = 2
    measure_na_fill: bool = True
    data_frames: int = 1
    na_fill_tolerance: float = 0.1
    dark_counts: float = 0.0
    min_light_counts: float = 1.0
    min_light_fraction: float = 0.1
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.target_cv < 1:
            raise ValueError(f"ShakerConfig.target_cv must be in (0, 1), got {self.target_cv!r}")
        if not 0 <= self.cv_margin < 1:
            raise ValueError(f"ShakerConfig.cv_margin must be in [0, 1), got {self.cv_margin!r}")
        if self.n_amplitudes < 3 or self.bisect_steps < 0 or self.min_periods < 1:
            raise ValueError("ShakerConfig: need n_amplitudes >= 3, bisect_steps >= 0 and "
                             "min_periods >= 1")
        if self.flat_frames < 1 or self.data_frames < 1:
            raise ValueError("ShakerConfig: flat_frames and data_frames must be >= 1")


@dataclass
class Probe:
    """Measurements at one amplitude."""

    amplitude_um: float
    uniformity_cv: float | None
    light: float | None
    na_fill: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def whole_period_frequency(freq_hz: float, exposure_s: float, limits: tuple[float, float],
                           min_periods: int = 1) -> tuple[float, int] | None:
    """The frequency nearest ``freq_hz`` that puts a whole number of periods in an exposure.

    Parameters
    ----------
    freq_hz : float
        Present frequency, Hz.
    exposure_s : float
        Exposure time, s (> 0).
    limits : (float, float)
        Allowed frequencies, Hz.
    min_periods : int
        Fewest periods per exposure.

    Returns
    -------
    (float, int) or None
        ``(P/τ, P)``, or None when no whole ``P ≥ min_periods`` fits within the limits.
    """
    if not (exposure_s > 0 and math.isfinite(exposure_s)):
        raise ValueError(f"exposure_s must be > 0, got {exposure_s!r}")
    low, high = limits
    first = max(min_periods, math.ceil(low * exposure_s - 1e-9))
    last = math.floor(high * exposure_s + 1e-9)
    if last < first:
        return None
    wanted = freq_hz * exposure_s if math.isfinite(freq_hz) else first
    periods = int(min(max(round(wanted), first), last))
    return min(max(periods / exposure_s, low), high), periods


class _Stop(Exception):
    """Ends the tuning early with a verdict (settings go back to the start)."""

    def __init__(self, verdict: Verdict, reason: str) -> None:
        super().__init__(reason)
        self.verdict = verdict


class _Tuner:
    def __init__(self, guard: Guard, config: ShakerConfig) -> None:
        self.config = config
        self.motion = Motion(guard)
        self.frames_used = 0
        self.start_light: float | None = None
        self.probes: list[Probe] = []
        self.frequency: float | None = None
        self.periods: int | None = None

    def frames(self, n: int, kind: str, keys: tuple[str, ...]
               ) -> Generator[Command, Any, list[dict[str, Any]]]:
        cfg = self.config
        for _attempt in range(2):
            results = yield Acquire(n, kind=kind, after_move=bool(self.motion.done), keys=keys,
                                    timeout_s=cfg.timeout_s)
            usable, problems = self.motion.fresh(list(results))
            if problems:
                yield Log(f"shaker: dropped {len(problems)} {kind} frame(s)", "warning",
                          {"reasons": problems})
            if usable:
                self.frames_used += len(usable)
                return usable
        raise _Stop(Verdict.ABORTED, f"no usable {kind} frame")

    def probe(self, amplitude: float | None) -> Generator[Command, Any, Probe]:
        """Measure at ``amplitude`` (None: where it is)."""
        cfg = self.config
        if amplitude is not None:
            last = self.probes[-1].as_dict() if self.probes else {}
            yield from self.motion.move(cfg.amp_role, amplitude, "shaker amplitude scan", last)
        here = self.motion.position[cfg.amp_role]
        flats = yield from self.frames(cfg.flat_frames, "flat", ("uniformity_cv", "mean_counts"))
        cvs = [v for v in (metric(r, "uniformity_cv") for r in flats) if v is not None]
        counts = [v for v in (metric(r, "mean_counts") for r in flats) if v is not None]
        light = mean_of(counts) - cfg.dark_counts if counts else None
        probe = Probe(here, mean_of(cvs) if cvs else None, light)
        if cfg.measure_na_fill:
            data = yield from self.frames(cfg.data_frames, "data", ("na_fill",))
            fills = [v for v in (metric(r, "na_fill") for r in data) if v is not None]
            probe.na_fill = mean_of(fills) if fills else None
        if amplitude is not None:
            self.probes.append(probe)
        return probe

    def lit(self, probe: Probe) -> bool:
        cfg = self.config
        if probe.light is None or probe.light <= cfg.min_light_counts:
            return False
        return self.start_light is None or \
            probe.light >= cfg.min_light_fraction * self.start_light

    def passes(self, probe: Probe, cv_limit: float, na_best: float | None) -> bool:
        if probe.uniformity_cv is None or not self.lit(probe) or probe.uniformity_cv > cv_limit:
            return False
        if na_best is None or probe.na_fill is None:
            return True
        return probe.na_fill >= na_best - self.config.na_fill_tolerance


def tune_shaker(guard: Guard, config: ShakerConfig | None = None) -> Procedure:
    """One-shot shaker tuning (a :mod:`feedback.commands` procedure).

    Parameters
    ----------
    guard : Guard
        Limits of the amplitude and frequency roles.
    config : ShakerConfig, optional

    Yields
    ------
    Read, Move, Acquire (flat frames, and data frames for the NA fill), Log, then one Done
        ``Done.result``: ``verdict``, ``frequency_hz``, ``amplitude_um``, ``uniformity_cv``
        (verified at the result when resolved; the best measured otherwise), ``na_fill``,
        ``periods_per_exposure``, ``frames_used``, ``start`` (frequency and amplitude) and
        ``probes`` (one dict per amplitude measured).
    """
    cfg = config if config is not None else ShakerConfig()
    return _tune(_Tuner(guard, cfg))


def _tune(tuner: _Tuner) -> Procedure:
    cfg = tuner.config
    state: dict[str, Any] = {"final": None}

    def summary(verdict: Verdict) -> dict[str, Any]:
        final: Probe | None = state["final"]
        best = final or min((p for p in tuner.probes if p.uniformity_cv is not None),
                            key=lambda p: p.uniformity_cv, default=None)
        return {
            "verdict": str(verdict),
            "frequency_hz": tuner.motion.position.get(cfg.freq_role),
            "amplitude_um": tuner.motion.position.get(cfg.amp_role),
            "uniformity_cv": best.uniformity_cv if best else None,
            "na_fill": best.na_fill if best else None,
            "periods_per_exposure": tuner.periods,
            "frames_used": tuner.frames_used,
            "start": {"frequency_hz": tuner.motion.start.get(cfg.freq_role),
                      "amplitude_um": tuner.motion.start.get(cfg.amp_role)},
            "probes": [p.as_dict() for p in tuner.probes],
        }

    try:
        try:
            verdict, reason = yield from _search(tuner, state)
        except _Stop as stop:
            verdict, reason = stop.verdict, str(stop)
        if verdict != Verdict.RESOLVED:
            for role in (cfg.amp_role, cfg.freq_role):
                if role in tuner.motion.start:
                    yield from tuner.motion.move(role, tuner.motion.start[role],
                                                 f"shaker tuning {verdict}: back to the start")
        done = Done(verdict, reason, summary(verdict))
    except STOP_ERRORS as exc:
        done = Done(Verdict.ABORTED, f"{type(exc).__name__}: {exc}", summary(Verdict.ABORTED))
    yield done
    return done


def _search(tuner: _Tuner, state: dict[str, Any]
            ) -> Generator[Command, Any, tuple[Verdict, str]]:
    cfg = tuner.config
    guard = tuner.motion.guard
    freq_lim, amp_lim = guard.limits(cfg.freq_role), guard.limits(cfg.amp_role)
    freq0 = yield from tuner.motion.read(cfg.freq_role)
    yield from tuner.motion.read(cfg.amp_role)
    flats = yield from tuner.frames(cfg.flat_frames, "flat", ("uniformity_cv", "mean_counts"))
    exposure = finite_or_none(flats[0].get("exposure_s"))
    counts = [v for v in (metric(r, "mean_counts") for r in flats) if v is not None]
    light = mean_of(counts) - cfg.dark_counts if counts else None
    if light is None or light <= cfg.min_light_counts:
        raise _Stop(Verdict.FLAT, f"no light on the flat frames (mean {light!r} counts above "
                                  "the dark)")
    tuner.start_light = light
    if exposure is None or exposure <= 0:
        raise _Stop(Verdict.ABORTED, "the flat frames carry no exposure time")
    choice = whole_period_frequency(freq0, exposure, (freq_lim.low, freq_lim.high),
                                    cfg.min_periods)
    if choice is None:
        raise _Stop(Verdict.RAILED, f"no frequency within [{freq_lim.low:g}, "
                                    f"{freq_lim.high:g}] Hz gives {cfg.min_periods}+ whole "
                                    f"periods in {exposure:g} s")
    tuner.frequency, tuner.periods = choice
    if abs(tuner.frequency - freq0) > freq_lim.tolerance:
        yield from tuner.motion.move(cfg.freq_role, tuner.frequency,
                                     f"{tuner.periods} whole periods per {exposure:g} s exposure",
                                     {"exposure_s": exposure, "was_hz": freq0})
    low = amp_lim.low if cfg.amp_min_um is None else max(cfg.amp_min_um, amp_lim.low)
    high = amp_lim.high if cfg.amp_max_um is None else min(cfg.amp_max_um, amp_lim.high)
    grid = [float(a) for a in np.linspace(low, high, cfg.n_amplitudes)]
    yield Log(f"shaker: {tuner.frequency:g} Hz ({tuner.periods} periods per exposure); "
              f"scanning amplitude over [{low:g}, {high:g}] µm")
    for amplitude in grid:
        yield from tuner.probe(amplitude)
    scanned = list(tuner.probes)
    target = cfg.target_cv

    def na_best(probes: list[Probe]) -> float | None:
        fills = [p.na_fill for p in probes if p.na_fill is not None
                 and tuner.passes(p, target, None)]
        return max(fills) if fills else None

    best_fill = na_best(scanned)
    if not any(tuner.passes(p, target, best_fill) for p in scanned):
        # No grid amplitude passes: look for the bottom of the CV valley between grid points.
        bottom = yield from _golden(tuner, scanned)
        if bottom is None or not tuner.passes(bottom, target, na_best(tuner.probes)):
            lit = [p for p in tuner.probes if p.uniformity_cv is not None and tuner.lit(p)]
            if not lit:
                return Verdict.FLAT, "no amplitude gave a lit flat field"
            best = min(lit, key=lambda p: p.uniformity_cv)
            if best.amplitude_um >= grid[-1] - 1e-9:
                return Verdict.RAILED, (f"uniformity CV {best.uniformity_cv:.3g} still best at the "
                                        f"largest amplitude {best.amplitude_um:g} µm")
            return Verdict.AMBIGUOUS, (f"best uniformity CV {best.uniformity_cv:.3g} at "
                                       f"{best.amplitude_um:g} µm misses the target {target:g}")
        best_fill = na_best(tuner.probes)
    passing = [p for p in tuner.probes if tuner.passes(p, target, best_fill)]
    # Prefer the smallest amplitude with headroom below the target, if any has it; every
    # probe below it misses that aim, so bisection between the nearest one and it narrows
    # down the smallest amplitude that meets the aim.
    aim = target * (1.0 - cfg.cv_margin)
    roomy = [p for p in passing if tuner.passes(p, aim, best_fill)]
    chosen = min(roomy or passing, key=lambda p: p.amplitude_um)
    if not roomy:
        aim = target
    below = [p for p in tuner.probes if p.amplitude_um < chosen.amplitude_um]
    lo = max(below, key=lambda p: p.amplitude_um).amplitude_um if below else None
    hi = chosen.amplitude_um
    for _ in range(cfg.bisect_steps if lo is not None else 0):
        probe = yield from tuner.probe(0.5 * (lo + hi))
        if tuner.passes(probe, aim, best_fill):
            hi, chosen = probe.amplitude_um, probe
        else:
            lo = probe.amplitude_um
    candidates = sorted({chosen.amplitude_um, *(p.amplitude_um for p in tuner.probes
                                                if tuner.passes(p, target, best_fill))})
    for amplitude in [chosen.amplitude_um] + [a for a in candidates if a != chosen.amplitude_um]:
        yield from tuner.motion.move(cfg.amp_role, amplitude, "shaker: verify the chosen amplitude")
        final = yield from tuner.probe(None)
        if tuner.passes(final, target, best_fill):
            state["final"] = final
            return Verdict.RESOLVED, (f"{tuner.frequency:g} Hz, {amplitude:g} µm: uniformity CV "
                                      f"{final.uniformity_cv:.3g} <= {target:g}")
        yield Log(f"shaker: {amplitude:g} µm failed verification (CV {final.uniformity_cv!r})",
                  "warning")
    return Verdict.AMBIGUOUS, "no amplitude passed verification with fresh flat frames"


def _golden(tuner: _Tuner, scanned: list[Probe]) -> Generator[Command, Any, Probe | None]:
    """Golden-section search for the lowest CV between the best grid amplitude's neighbours."""
    lit = [p for p in scanned if p.uniformity_cv is not None and tuner.lit(p)]
    if not lit:
        return None
    ordered = sorted(scanned, key=lambda p: p.amplitude_um)
    best = min(lit, key=lambda p: p.uniformity_cv)
    i = ordered.index(best)
    if i == 0 or i == len(ordered) - 1:
        return best
    a, b = ordered[i - 1].amplitude_um, ordered[i + 1].amplitude_um
    ratio = (math.sqrt(5.0) - 1.0) / 2.0

    def cv(probe: Probe) -> float:
        if probe.uniformity_cv is None or not tuner.lit(probe):
            return math.inf
        return probe.uniformity_cv

    c, d = b - ratio * (b - a), a + ratio * (b - a)
    pc = yield from tuner.probe(c)
    pd = yield from tuner.probe(d)
    for _ in range(tuner.config.bisect_steps):
        if cv(pc) <= cv(pd):
            b, d, pd = d, c, pc
            c = b - ratio * (b - a)
            pc = yield from tuner.probe(c)
        else:
            a, c, pc = c, d, pd
            d = a + ratio * (b - a)
            pd = yield from tuner.probe(d)
    return min([best, pc, pd], key=cv)
