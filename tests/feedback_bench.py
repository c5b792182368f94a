"""Test stand-ins shared by the feedback tests (the simulator bench is :mod:`bench.simbench`).

:class:`ScriptedBench` answers procedures with synthetic Results whose metric values come
from a script (the property tests), and :data:`metric_values` is the hypothesis strategy for
those scripts.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from feedback.commands import Acquire, Command, Move, MoveDone, Read
from feedback.safety import Guard


class ScriptedBench:
    """Answers procedures with synthetic Results whose metric values come from a script."""

    def __init__(self, guard: Guard, positions: dict[str, float], values: list[Any],
                 energy_ev: float = 8000.0) -> None:
        self.guard = guard
        self.position = dict(positions)
        self.values = values
        self.energy_ev = energy_ev
        self.t_ns = 1_000_000_000
        self.seq = 0
        self.moves = 0
        self.done: dict[str, MoveDone] = {}

    def next_value(self) -> Any:
        return self.values[self.seq % len(self.values)] if self.values else None

    def metrics(self) -> dict[str, Any]:
        v = self.next_value()
        return {key: v for key in ("band_power", "uniformity_cv", "na_fill", "centroid_x_px",
                                   "centroid_y_px", "cutoff_per_um")} | {
            "mean_counts": 1000.0, "psd_verdict": "resolved"}

    def handle(self, command: Command) -> Any:
        if isinstance(command, Read):
            return self.position[command.role]
        if isinstance(command, Move):
            # The property: the guard would accept every move a controller proposes.
            self.guard.check(command, self.position[command.role])
            self.moves += 1
            self.position[command.role] = float(command.target)
            self.t_ns += 1_000_000
            done = MoveDone(command.role, command.target, float(command.target), self.t_ns)
            self.done[command.role] = done
            return done
        if isinstance(command, Acquire):
            out = []
            for _ in range(command.n_frames):
                self.t_ns += 1_000_000
                self.seq += 1
                out.append({"seq": self.seq, "t_ns": self.t_ns, "moving": False,
                            "positions": dict(self.position), "energy_ev": self.energy_ev,
                            "exposure_s": 0.05, "metrics": self.metrics(),
                            "metrics_seq": self.seq})
            return out
        return None


metric_values = st.lists(
    st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True),
              st.floats(min_value=-1e-3, max_value=1e-2)), min_size=1, max_size=40)
