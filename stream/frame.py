"""The frame model shared by every stage of the pipeline.

A :class:`Frame` is one detector image plus the acquisition facts that travel with it on the
wire (see ``DESIGN.md``, "Wire protocol v1"). Stages add monotonic timestamps to
``Frame.stamps`` as the frame passes, so latency is measured per stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

KINDS = ("data", "dark", "flat", "end")
"""Frame kinds of wire protocol v1 (areaDetector FrameType Normal/Background/FlatField, + end)."""


@dataclass(slots=True)
class Frame:
    """One detector frame.

    Attributes
    ----------
    seq : int
        Sequence number, increasing within a series.
    t_ns : int
        Acquisition time, ns since the Unix epoch.
    kind : str
        One of :data:`KINDS`.
    image : ndarray, shape (rows, cols)
        Pixels, C order. Frames decoded from the wire hold a read-only view of the received
        buffer (zero copy); an ``end`` frame holds an empty ``(0, 0)`` array.
    exposure_s : float
        Exposure time in s.
    energy_ev : float
        Photon energy in eV.
    positions : dict of str to float
        Motor role to position at exposure start, in that role's unit (``zp_z_um`` ...).
    moving : bool
        True if a feedback-driven motor moved during the exposure.
    series : str or None
        Optional series name; sequence numbers are tracked per series.
    attrs : dict
        Free-form extra facts (``pixel_nm`` ...), msgpack-serialisable.
    stamps : dict of str to int
        ``time.monotonic_ns()`` at each pipeline stage this frame went through.
    """

    seq: int
    t_ns: int
    kind: str
    image: np.ndarray
    exposure_s: float = 0.0
    energy_ev: float = 0.0
    positions: dict[str, float] = field(default_factory=dict)
    moving: bool = False
    series: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    stamps: dict[str, int] = field(default_factory=dict)

    def stamp(self, stage: str) -> None:
        """Record the monotonic time at which this frame reached ``stage``."""
        self.stamps[stage] = time.monotonic_ns()

    @property
    def shape(self) -> tuple[int, ...]:
        return self.image.shape


def end_frame(seq: int, series: str | None = None) -> Frame:
    """The frame that tells a consumer the series is over."""
    return Frame(
        seq=seq,
        t_ns=time.time_ns(),
        kind="end",
        image=np.empty((0, 0), dtype=np.uint16),
        series=series,
    )
