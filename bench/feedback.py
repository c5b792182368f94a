"""``txmlive bench feedback``: the feedback procedures against today's practice, on the simulator.

Accuracy, not speed. Each comparison runs both methods on the same simulated beamline (same
seeds, same starts) through :class:`bench.simbench.SimBench` — the simulator behind a
stand-in for the executor that renders and measures frames like the pipeline and hands the
procedures only frames taken after their last move — and scores them against the simulator's
ground truth:

- **autofocus** vs a **hill-climber** (step one depth of focus towards a higher score, reverse
  and halve on a drop, stop at DOF/20 or when the frame budget is spent; no fit, no verdict),
  from starts across ±2 DOF at normal dose and at ~100 counts/pixel. The climber gets as many
  frames as the autofocus used on the same start, and never a stale frame.
- **shaker**: the rule of thumb (amplitude at full fill, frequency left where it is) vs
  ``tune_shaker``, from a parked shaker: the field's CV.
- **beam**: the PI loop on a calibrated response matrix vs **fixed steps** (each frame outside
  the deadband, move each steering motor by a fixed step in the direction that reduces its
  error), with the beam drifting 1 px/s and jumping 20 px: the true spot's RMS deviation from
  where it was held, and the number of moves.

Writes one JSON (``kind`` = ``feedback``) and prints a Markdown summary.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Generator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.kernels import code_version
from bench.simbench import SimBench, default_guard, sim_params
from feedback.autofocus import AutofocusConfig, autofocus
from feedback.beam import BeamFeedback, SetpointTable, calibrate_response
from feedback.commands import Acquire, Command, Done, Move, Procedure, Verdict, drive
from feedback.optics import ZonePlate
from feedback.runtime import response_from_result
from feedback.safety import Guard, Motion, RoleLimits, metric
from feedback.shaker import tune_shaker

OUT_DIR = Path(__file__).resolve().parent / "out"


# ---------------------------------------------------------------------------- autofocus


def hill_climb(guard: Guard, dof_um: float, frames: int, score_key: str = "band_power",
               role: str = "zp_z_um") -> Procedure:
    """The common autofocus of today: a hill-climber on one score (a baseline procedure)."""
    motion = Motion(guard)
    z = yield from motion.read(role)
    lim = guard.limits(role)

    def score() -> Generator[Command, Any, float]:
        results = yield Acquire(1, after_move=bool(motion.done), keys=(score_key,))
        value = metric(results[0], score_key) if results else None
        return -math.inf if value is None else value

    best = yield from score()
    used, step, direction = 1, dof_um, 1.0
    while used < frames and step > dof_um / 20:
        target = z + direction * step
        if not lim.low <= target <= lim.high:
            direction, step = -direction, step / 2
            continue
        yield from motion.move(role, target, "hill climb")
        value = yield from score()
        used += 1
        if value > best:
            z, best = target, value
        else:
            direction, step = -direction, step / 2
    if motion.position[role] != z:
        yield from motion.move(role, z, "hill climb: best seen")
    done = Done(Verdict.RESOLVED, "hill climb ended (no verdict)",
                {"best_z_um": z, "frames_used": used})
    yield done
    return done


def compare_autofocus(starts_dof: list[float], dose_fluxes: dict[str, float],
                      offset_um: float = 3.0) -> dict[str, Any]:
    zone_plate = ZonePlate()
    dof = zone_plate.dof_um(8000.0)
    out: dict[str, Any] = {"dof_um": dof, "starts_dof": starts_dof, "doses": {}}
    for dose, flux in dose_fluxes.items():
        rows = []
        for i, start in enumerate(starts_dof):
            params = sim_params(focus_offset_um=offset_um, flux_counts_per_s=flux, seed=100 + i)
            runs = {}
            ours = SimBench(params, default_guard())
            ours.actuators["zp_z_um"].move(offset_um + start * dof)
            done = ours.run(autofocus(ours.guard, zone_plate, AutofocusConfig()))
            truth = ours.truth()["focus_z_um"]
            final = ours.actuators["zp_z_um"].position
            runs["autofocus"] = {"verdict": str(done.verdict), "final_z_um": final,
                                 "error_dof": abs(final - truth) / dof,
                                 "frames": done.result["frames_used"]}
            climber = SimBench(params, default_guard())
            climber.actuators["zp_z_um"].move(offset_um + start * dof)
            budget = max(int(done.result["frames_used"]), 5)
            climber.run(hill_climb(climber.guard, dof, budget))
            final = climber.actuators["zp_z_um"].position
            runs["hill_climb"] = {"final_z_um": final, "error_dof": abs(final - truth) / dof,
                                  "frames": climber.frames}
            rows.append({"start_dof": start, "truth_z_um": truth, **runs})
        out["doses"][dose] = {"flux_counts_per_s": flux, "runs": rows,
                              **{method: _error_stats([r[method] for r in rows])
                                 for method in ("autofocus", "hill_climb")}}
    return out


def _error_stats(runs: list[dict[str, Any]]) -> dict[str, float]:
    arr = np.asarray([r["error_dof"] for r in runs])
    return {"median_error_dof": float(np.median(arr)), "max_error_dof": float(arr.max()),
            "within_tenth": float(np.mean(arr <= 0.1)), "within_fifth": float(np.mean(arr <= 0.2)),
            "median_frames": float(np.median([r["frames"] for r in runs]))}


# ---------------------------------------------------------------------------- shaker


def compare_shaker() -> dict[str, Any]:
    guard = default_guard(shaker_amp_um=RoleLimits(0.0, 4.0, 5.0, 0.001))

    def parked() -> SimBench:
        bench = SimBench(sim_params(), guard)
        bench.actuators["shaker_amp_um"].move(0.0)
        bench.actuators["shaker_freq_hz"].move(45.0)  # 2.25 periods per 50 ms exposure
        return bench

    def field_cv(bench: SimBench) -> float:
        flat = replace(bench.current_state(), frame_type="FlatField")
        return float(bench.sim.render(flat, bench.t_s)[1]["uniformity_cv"])

    rule = parked()
    start_cv = field_cv(rule)
    rule.actuators["shaker_amp_um"].move(rule.sim.params.fill_amp)
    tuned = parked()
    done = tuned.run(tune_shaker(tuned.guard))
    return {"start_cv": start_cv,
            "rule_of_thumb": {"amplitude_um": rule.sim.params.fill_amp, "frequency_hz": 45.0,
                              "cv": field_cv(rule)},
            "tuned": {"verdict": str(done.verdict), "amplitude_um": done.result["amplitude_um"],
                      "frequency_hz": done.result["frequency_hz"], "cv": field_cv(tuned),
                      "frames": done.result["frames_used"]}}


# ---------------------------------------------------------------------------- beam


def _beam_bench(seed: int) -> SimBench:
    params = sim_params(sample="blank", seed=seed, drift_px_per_s=1.0, jump_px=20.0,
                        jump_interval_s=30.0)
    bench = SimBench(params, default_guard())
    bench.t_s = 0.0
    return bench


def _raw(bench: SimBench) -> dict[str, Any]:
    """A frame measured raw, as the pipeline measures the beam (flat correction divides the
    illumination out); the sample is blank, so it is a data frame of the illumination."""
    return {**bench.result("flat"), "kind": "data"}


def run_beam(method: str, seconds: float, seed: int, fixed_step: float = 0.05
             ) -> dict[str, Any]:
    """Hold the beam for ``seconds`` of simulated time with ``method`` (``pi`` or ``fixed``)."""
    bench = _beam_bench(seed)

    def raw_frames(command: Command) -> Any:
        if isinstance(command, Acquire):
            command = replace(command, kind="flat")
        return bench.handle(command)
    calibration = drive(calibrate_response(bench.guard), raw_frames)
    if calibration.verdict != Verdict.RESOLVED:
        return {"error": f"calibration {calibration.verdict}: {calibration.reason}"}
    response = response_from_result(dict(calibration.result))
    first = _raw(bench)
    setpoint = (metric(first, "centroid_x_px"), metric(first, "centroid_y_px"))
    loop = BeamFeedback(bench.guard, response, SetpointTable.constant(*setpoint))
    loop.enable(bench.t_ns)
    gains = np.diag(np.asarray(response.px_per_unit, dtype=np.float64))
    deadband = loop.config.deadband_px
    held: list[tuple[float, float]] = []
    moves = 0
    t_end = bench.t_s + seconds
    while bench.t_s < t_end:
        result = _raw(bench)
        state = bench.current_state()  # the frame's: the moves it causes come below
        held.append(bench.sim.beam_offset_px(  # where the frame saw it: mid-exposure
            state, result["t_ns"] * 1e-9 + 0.5 * state.exposure_s))
        if method == "pi":
            step = loop.update(result, bench.t_ns)
            for move in step.moves:
                loop.moved(bench.handle(move))
            moves += len(step.moves)
            continue
        cx, cy = metric(result, "centroid_x_px"), metric(result, "centroid_y_px")
        if cx is None or cy is None:
            continue
        error = np.array([setpoint[0] - cx, setpoint[1] - cy])
        # the fixed-step rule: each motor one step towards the error of the axis it drives
        for axis, role in enumerate(("beam_x", "beam_y")):
            if abs(error[axis]) > deadband and gains[axis] != 0:
                target = bench.actuators[role].position + fixed_step * math.copysign(
                    1.0, error[axis] * gains[axis])
                bench.handle(Move(role, target, "fixed step", {}, None))
                moves += 1
    xy = np.asarray(held)
    deviation = np.hypot(*(xy - xy[0]).T)
    # after settling: outside 1 s after each jump (a step of the true spot > 5 px)
    frame_s = seconds / len(held)
    settled = np.ones(len(held), dtype=bool)
    jumps = np.flatnonzero(np.hypot(*np.diff(xy, axis=0).T) > 5.0)
    for i in jumps:
        settled[i + 1:i + 1 + int(round(1.0 / frame_s))] = False
    return {"rms_px": float(np.sqrt(np.mean(deviation ** 2))),
            "settled_rms_px": float(np.sqrt(np.mean(deviation[settled] ** 2))),
            "max_px": float(deviation.max()), "moves": moves, "frames": len(held),
            "jump_like_steps": int(jumps.size)}


def compare_beam(seconds: float, seed: int) -> dict[str, Any]:
    return {"seconds": seconds, "drift_px_per_s": 1.0, "jump_px": 20.0, "jump_interval_s": 30.0,
            "pi": run_beam("pi", seconds, seed), "fixed_step": run_beam("fixed", seconds, seed)}


# ---------------------------------------------------------------------------- report


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = ["| comparison | today's practice | txmlive |", "|---|---|---|"]
    for dose, block in report["autofocus"]["doses"].items():
        a, h = block["autofocus"], block["hill_climb"]
        lines.append(
            f"| autofocus, {dose} dose ({len(block['runs'])} starts in ±2 DOF): median / max "
            f"error, DOF (frames) | hill-climber {h['median_error_dof']:.3f} / "
            f"{h['max_error_dof']:.3f} ({h['within_tenth']:.0%} within DOF/10; "
            f"{h['median_frames']:g}) | {a['median_error_dof']:.3f} / {a['max_error_dof']:.3f} "
            f"({a['within_tenth']:.0%} within DOF/10; {a['median_frames']:g}) |")
    sh = report["shaker"]
    lines.append(f"| shaker from a hot spot (CV {sh['start_cv']:.3f}): field CV | rule of thumb "
                 f"{sh['rule_of_thumb']['cv']:.4f} | {sh['tuned']['cv']:.4f} "
                 f"({sh['tuned']['verdict']}) |")
    beam = report["beam"]
    if "error" not in beam["pi"] and "error" not in beam["fixed_step"]:
        p, f = beam["pi"], beam["fixed_step"]
        lines.append(f"| beam held {beam['seconds']:g} s, 1 px/s drift + 20 px jumps: true spot "
                     f"RMS after settling / overall, px (moves) | fixed steps "
                     f"{f['settled_rms_px']:.2f} / {f['rms_px']:.2f} ({f['moves']}) | "
                     f"{p['settled_rms_px']:.2f} / {p['rms_px']:.2f} ({p['moves']}) |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="txmlive bench feedback",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=12,
                        help="autofocus starts, uniform in ±2 DOF, per dose")
    parser.add_argument("--beam-seconds", type=float, default=300.0,
                        help="simulated time the beam is held, s")
    parser.add_argument("--seed", type=int, default=7,
                        help="seed of the autofocus starts and of the beam comparison")
    parser.add_argument("--json", type=Path, default=OUT_DIR / "feedback.json",
                        help="where the JSON report goes")
    args = parser.parse_args(argv)
    if args.starts < 1 or args.beam_seconds <= 0:
        parser.error("--starts must be >= 1 and --beam-seconds > 0")
    # random starts: a grid would put the climber's halving steps on the truth by construction
    starts = [float(s) for s in np.random.default_rng(args.seed).uniform(-2.0, 2.0, args.starts)]
    report = {
        "kind": "feedback", "code": code_version(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "autofocus": compare_autofocus(starts, {"normal": 1.0e6, "low": 4.0e3}),
        "shaker": compare_shaker(),
        "beam": compare_beam(args.beam_seconds, args.seed),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print("\n".join(summary_lines(report)))
    print(f"wrote {args.json}", file=sys.stderr)
    return 0
