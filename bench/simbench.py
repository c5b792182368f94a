"""The simulated beamline behind a stand-in for the executor, for benchmarks and tests.

:class:`SimBench` runs feedback procedures against :mod:`hw.sim`: fake motors on a simulated
clock, frames rendered by the simulator (small N) and measured by
:class:`stream.metrics.MetricsEngine` after dark/flat correction, every move checked by the
guard and every acquisition filtered by the stale-frame rule, as the real executor does — in
simulated time, so minutes of beamline run in seconds. ``txmlive bench feedback`` scores
procedures with it; the feedback tests drive their procedures through it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from feedback.commands import Aborted, Acquire, Command, Done, Log, Move, MoveDone, Read, drive
from feedback.safety import FreshFilter, Guard, RoleLimits
from hw.actuators import FakeActuator
from hw.sim.detector import BeamlineState, SimParams, Simulator
from stream.correct import normalize
from stream.metrics import MetricsConfig, MetricsEngine

SIM_VELOCITY = {"zp_z_um": 50.0, "energy_ev": 2000.0, "shaker_amp_um": 100.0,
                "shaker_freq_hz": 500.0, "beam_x": 100.0, "beam_y": 100.0}
"""Motor speeds of the simulated IOC (role unit per s)."""


def default_guard(**overrides: RoleLimits) -> Guard:
    limits = {
        "zp_z_um": RoleLimits(-200.0, 200.0, 30.0, 0.05),
        "energy_ev": RoleLimits(5000.0, 14000.0, 500.0, 0.05),
        "shaker_amp_um": RoleLimits(0.0, 10.0, 5.0, 0.001),
        "shaker_freq_hz": RoleLimits(1.0, 500.0, 200.0, 0.01),
        "beam_x": RoleLimits(-100.0, 100.0, 5.0, 0.001),
        "beam_y": RoleLimits(-100.0, 100.0, 5.0, 0.001),
    }
    limits.update(overrides)
    return Guard(limits)


class SimBench:
    """Runs procedures against the simulator: a stand-in for the executor (simulated time).

    Parameters
    ----------
    params : SimParams
    guard : Guard
        Checked before every put; a refusal is thrown into the procedure.
    state : BeamlineState, optional
        Start state (default: the simulator's default state).
    leak_stale : bool
        Hand the procedure, after every move, one frame exposed before the move finished
        (at the old position) and skip the executor-side stale filter, to prove that the
        procedure's own check drops it.
    fail_on_move : int or None
        Raise ``ConnectionError`` (IOC gone) at this move (1-based).
    """

    def __init__(self, params: SimParams, guard: Guard, state: BeamlineState | None = None,
                 *, leak_stale: bool = False, fail_on_move: int | None = None) -> None:
        self.sim = Simulator(params)
        self.guard = guard
        self.state = state if state is not None else self.sim.default_state()
        self.t_s = 10.0
        self.actuators = {
            role: FakeActuator(role, limits=(guard.limits(role).low, guard.limits(role).high),
                               position=float(getattr(self.state, role)),
                               velocity=SIM_VELOCITY[role], clock=lambda: self.t_s,
                               sleep=self._sleep)
            for role in guard.roles}
        self.engine = MetricsEngine(MetricsConfig(pixel_nm=10.0, dr_nm=params.zp_dr_nm))
        self.refs: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]] = {}
        self.seq = 0
        self.moves: list[Move] = []
        self.done_moves: dict[str, MoveDone] = {}
        self.logs: list[Log] = []
        self.commands: list[Command] = []
        self.frames = 0
        self.leak_stale = leak_stale
        self.fail_on_move = fail_on_move
        self.abort_on_acquire: int | None = None
        self.acquires = 0
        self.before_frame = None

    def _sleep(self, seconds: float) -> None:
        self.t_s += seconds

    @property
    def t_ns(self) -> int:
        return int(round(self.t_s * 1e9))

    def current_state(self, **extra: Any) -> BeamlineState:
        positions = {role: act.position for role, act in self.actuators.items()}
        return replace(self.state, **positions, **extra)

    def truth(self) -> dict[str, float]:
        return self.sim.optics_truth(self.current_state())

    def _references(self, state: BeamlineState) -> tuple[np.ndarray, np.ndarray]:
        key = (state.energy_ev, state.shaker_amp_um, state.shaker_freq_hz, state.exposure_s)
        if key not in self.refs:
            darks = [self.sim.render(replace(state, frame_type="Background"), self.t_s)[0]
                     for _ in range(2)]
            flats = [self.sim.render(replace(state, frame_type="FlatField"), self.t_s + 0.1)[0]
                     for _ in range(2)]
            self.refs[key] = (np.array(darks), np.array(flats))
        return self.refs[key]

    def result(self, kind: str = "data", state: BeamlineState | None = None,
               t_ns: int | None = None) -> dict[str, Any]:
        """Render one frame now (advancing the clock) and measure it like the pipeline."""
        if self.before_frame is not None:
            self.before_frame(self)
        state = state if state is not None else self.current_state()
        frame_type = "FlatField" if kind == "flat" else "Normal"
        pixel_nm = self.sim.params.pixel_nm(state.energy_ev)
        image, _ = self.sim.render(replace(state, frame_type=frame_type), self.t_s)
        stamp = self.t_ns if t_ns is None else t_ns
        self.t_s += state.exposure_s
        if kind == "data":
            darks, flats = self._references(state)
            image = normalize(image, darks, flats)
        self.seq += 1
        self.frames += 1
        return {
            "seq": self.seq, "t_ns": stamp, "kind": kind, "moving": False,
            "positions": {role: float(getattr(state, role)) for role in self.actuators},
            "energy_ev": state.energy_ev, "exposure_s": state.exposure_s,
            "pixel_nm": pixel_nm, "corrected": kind == "data",
            "metrics": self.engine.compute_all(image, pixel_nm), "metrics_seq": self.seq,
        }

    def handle(self, command: Command) -> Any:
        self.commands.append(command)
        if isinstance(command, Read):
            return self.actuators[command.role].position
        if isinstance(command, Move):
            if self.fail_on_move is not None and len(self.moves) + 1 >= self.fail_on_move:
                raise ConnectionError("simulated IOC disconnected")
            actuator = self.actuators[command.role]
            old = self.current_state()
            self.guard.check(command, actuator.position)
            self.moves.append(command)
            actuator.move(command.target)
            done = MoveDone(command.role, command.target, actuator.position, self.t_ns)
            self.done_moves[command.role] = done
            self.t_s += 0.001
            self._stale = old
            return done
        if isinstance(command, Acquire):
            self.acquires += 1
            if self.abort_on_acquire is not None and self.acquires >= self.abort_on_acquire:
                raise Aborted("operator abort")
            results = []
            if self.leak_stale and getattr(self, "_stale", None) is not None and \
                    command.after_move:
                done = max(self.done_moves.values(), key=lambda d: d.t_done_ns)
                results.append(self.result(command.kind, self._stale, done.t_done_ns - 1))
                self._stale = None
            fresh = FreshFilter(self.done_moves.values() if command.after_move else (),
                                self.guard.tolerances, command.keys)
            while len(results) < command.n_frames:
                result = self.result(command.kind)
                if self.leak_stale or fresh.accept(result):
                    results.append(result)
            return results
        if isinstance(command, Log):
            self.logs.append(command)
            return None
        if isinstance(command, Done):
            return None
        raise TypeError(f"unknown command {command!r}")

    def run(self, procedure) -> Done:
        return drive(procedure, self.handle)


def sim_params(**kw: Any) -> SimParams:
    base = dict(size_px=256, sample="siemens", seed=3, vibration_rms_nm=1.0, drift_px_per_s=0.0,
                jump_px=0.0)
    base.update(kw)
    return SimParams(**base)
