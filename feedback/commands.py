"""Typed commands of the feedback procedures, their answers, verdicts and the driver loop.

A *procedure* (autofocus, shaker tuning, a focus-tracked energy step, the beam calibration) is
a generator of commands, in the style of bluesky plans: it yields a command, the one executor
carries it out and sends back the answer, and the procedure decides the next command from it.
Procedures never touch hardware or sockets, so tests run them to the end against fakes.

Commands and what the executor answers (``answer = yield command``):

=============  ===============================================================================
command        executor
=============  ===============================================================================
:class:`Read`  answers the role's readback position (float, in the role's unit).
:class:`Move`  checks it with :class:`feedback.safety.Guard` (refused → throws
               :class:`feedback.safety.MoveRefused` into the procedure), puts the target,
               waits for motion done (put completion / ``.DMOV``, not a fixed sleep), logs it
               with ``metrics`` and ``rollback``, and answers a :class:`MoveDone` stamped with
               the wall-clock completion time. Dry-run: logs, does not put, answers a
               ``MoveDone`` at the target.
:class:`Acquire` answers a list of ``n_frames`` Results (dicts as the pipeline publishes them,
               see :mod:`stream.publish`) of frames of ``kind``; with ``after_move`` only frames
               that :class:`feedback.safety.FreshFilter` accepts against the procedure's
               latest :class:`MoveDone` per role (acquired strictly after the move finished,
               not moving, at the commanded position, expensive metrics of a fresh frame).
:class:`Log`   logs; answers None.
:class:`Done`  publishes the verdict (PVs, CLI result); answers None. Always the last command.
=============  ===============================================================================

An executor reports a failure by raising it from its handler: :func:`drive` throws it into the
procedure, which ends with a :class:`Done` of verdict ``aborted`` and puts nothing more
(:data:`feedback.safety.STOP_ERRORS` lists what procedures treat so: :class:`Aborted` for an
operator abort, ``MoveRefused``, the actuator errors, ``TimeoutError`` for a stale stream or a
move that did not finish, ``ConnectionError`` for an IOC disconnect).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any

Result = Mapping[str, Any]
"""One processed-frame result as published on the results stream (see :mod:`stream.publish`)."""

FRAME_KINDS = ("data", "flat")
"""Frame kinds a procedure may acquire."""


class Verdict(enum.StrEnum):
    """How a one-shot procedure ended (DESIGN.md, "Feedback safety")."""

    RESOLVED = "resolved"
    """The optimum was found; the motor is there; the number comes with its uncertainty."""
    RAILED = "railed"
    """The optimum lies at (or beyond) the edge of the allowed range."""
    FLAT = "flat"
    """No signal: the score does not depend on the motor (no structure, no light)."""
    AMBIGUOUS = "ambiguous"
    """Signal, but no single trustworthy optimum (several peaks, an implausible shape)."""
    ABORTED = "aborted"
    """Stopped by the operator or a fault; the reason says which."""


class Aborted(Exception):
    """Operator abort, thrown into a procedure by the executor."""


@dataclass(frozen=True)
class Read:
    """Ask for the readback position of ``role``; answered with a float."""

    role: str


@dataclass(frozen=True)
class Move:
    """Move one role to an absolute target; answered with a :class:`MoveDone`.

    Attributes
    ----------
    role : str
        Motor role, e.g. ``"zp_z_um"`` (:data:`hw.pvnames.MOTOR_ROLES`).
    target : float
        Absolute target in the role's unit.
    reason : str
        Why, in words, for the log.
    metrics : mapping
        The metric values that justified the move (JSON-able), for the log.
    rollback : float or None
        Where to return the role if the procedure's result is rejected (its start position).
    """

    role: str
    target: float
    reason: str
    metrics: Mapping[str, Any] = field(default_factory=dict)
    rollback: float | None = None


@dataclass(frozen=True)
class MoveDone:
    """The executor's answer to a :class:`Move`.

    Attributes
    ----------
    role : str
    target : float
        The commanded target.
    position : float
        Readback after motion done.
    t_done_ns : int
        Wall-clock time (ns since the epoch, the clock of a frame's ``t_ns``) at which motion
        was done; frames acquired before it are stale.
    """

    role: str
    target: float
    position: float
    t_done_ns: int


@dataclass(frozen=True)
class Acquire:
    """Ask for the Results of ``n_frames`` new frames; answered with a list of Results.

    Attributes
    ----------
    n_frames : int
        How many frames (≥ 1).
    kind : str
        ``"data"`` (sample frames) or ``"flat"`` (sample out of the field, raw illumination).
    after_move : bool
        Only frames acquired strictly after the procedure's last move finished, at rest and
        at the commanded positions (:class:`feedback.safety.FreshFilter`).
    keys : tuple of str
        Metric keys the procedure will read; for keys computed on a side thread
        (:data:`stream.metrics.EXPENSIVE_KEYS`) each returned Result must carry values of a
        distinct fresh frame (``metrics_seq``).
    timeout_s : float or None
        Longest wait; None: the executor's default. A wait that runs out raises
        ``TimeoutError`` (stale stream) into the procedure.
    """

    n_frames: int
    kind: str = "data"
    after_move: bool = True
    keys: tuple[str, ...] = ()
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.n_frames, bool) or not isinstance(self.n_frames, int) \
                or self.n_frames < 1:
            raise ValueError(f"Acquire.n_frames must be an integer >= 1, got {self.n_frames!r}")
        if self.kind not in FRAME_KINDS:
            raise ValueError(f"Acquire.kind must be one of {FRAME_KINDS}, got {self.kind!r}")
        if self.timeout_s is not None and not (self.timeout_s > 0
                                               and math.isfinite(self.timeout_s)):
            raise ValueError(f"Acquire.timeout_s must be > 0 or None, got {self.timeout_s!r}")


@dataclass(frozen=True)
class Log:
    """A message for the executor's log; answered with None."""

    message: str
    level: str = "info"
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Done:
    """The end of a procedure: its verdict, why, and its numbers (JSON-able)."""

    verdict: Verdict
    reason: str
    result: Mapping[str, Any] = field(default_factory=dict)


Command = Read | Move | Acquire | Log | Done
"""Everything a procedure may yield."""

Procedure = Generator[Command, Any, Done]
"""A procedure: yields commands, receives answers, yields one :class:`Done` last and returns it."""


def drive(procedure: Procedure, handle: Callable[[Command], Any]) -> Done:
    """Run a procedure to its end, answering each command with ``handle``.

    Parameters
    ----------
    procedure : generator
        A fresh procedure.
    handle : callable
        ``handle(command) -> answer``. An exception it raises is thrown into the procedure
        (which ends with an ``aborted`` :class:`Done` for the errors it expects and lets others
        through). ``handle`` also receives the final :class:`Done`.

    Returns
    -------
    Done
        The procedure's last command.

    Raises
    ------
    RuntimeError
        If the procedure ends without yielding a :class:`Done`, or yields after it.
    """
    answer: Any = None
    error: BaseException | None = None
    done: Done | None = None
    while True:
        try:
            command = procedure.throw(error) if error is not None else procedure.send(answer)
        except StopIteration:
            if done is None:
                raise RuntimeError("procedure ended without a Done command") from None
            return done
        if done is not None:
            procedure.close()
            raise RuntimeError(f"procedure yielded {command!r} after its Done")
        if not isinstance(command, Command):
            procedure.close()
            raise TypeError(f"procedure yielded {command!r}, not a command")
        answer, error = None, None
        if isinstance(command, Done):
            done = command
        try:
            answer = handle(command)
        except Exception as exc:  # handed to the procedure, which decides
            if done is not None:
                raise
            error = exc
