"""The simulated TXM beamline (modelled on SSRF BL18B): optics, samples and the frame renderer.

:class:`Simulator` renders detector frames for a :class:`BeamlineState` (what the simulated
IOC's motors and records hold) with ground truth; :mod:`hw.sim.optics` holds the zone-plate and
thin-lens formulas, :mod:`hw.sim.samples` the test objects.
"""

from hw.sim.detector import (
    FRAME_TYPES,
    MODES,
    BeamlineState,
    SimParams,
    Simulator,
    frame_kind,
)
from hw.sim.samples import SAMPLES

__all__ = ["FRAME_TYPES", "MODES", "SAMPLES", "BeamlineState", "SimParams", "Simulator",
           "frame_kind"]
