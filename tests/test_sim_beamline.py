"""The simulated beamline process body (hw.sim.beamline) over real Channel Access and ZMQ.

One SimBeamline (caproto IOC + frame loop) runs in a thread of the test process on free
loopback ports; the tests drive it with pyepics exactly as a client of ``txmlive sim`` would
and read its frames from a PULL socket through the wire codec.
"""

from __future__ import annotations

import math
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator

import epics
import numpy as np
import pytest
import zmq

from hw.epics_env import LOOPBACK, configure_ca_client, free_ca_port
from hw.pvnames import MOTOR_ROLES
from hw.sim import BeamlineState, SimParams, Simulator, optics
from hw.sim.beamline import (
    MAX_FOCUS_OFFSET_UM,
    SERIES,
    ZP_Z_MARGIN_UM,
    ZP_Z_VELOCITY_UM_S,
    SimBeamline,
    nominal_focus_z_um,
    zp_z_travel_um,
)
from stream.beam import beam_stats, bin_image, illumination_uniformity
from stream.correct import normalize
from stream.frame import Frame
from stream.psd import radial_psd
from stream.wire import decode
from txmlive.ports import free_tcp_url

pytestmark = pytest.mark.timeout(60)

SIZE = 256
FPS = 20.0
FOCUS_OFFSET_UM = 3.0
DARK_COUNTS = SimParams().dark_counts


class Rig:
    """A running SimBeamline and a receiver thread that keeps its newest frames.

    Frames are read continuously (as a pipeline would), so none is lost to a full queue while
    a test waits on a move.
    """

    def __init__(self, beamline: SimBeamline, keep: int = 200) -> None:
        self.beamline = beamline
        self.stop = threading.Event()
        self.thread = threading.Thread(target=beamline.serve, args=(self.stop,),
                                       name="sim-beamline")
        self._frames: deque[Frame] = deque(maxlen=keep)
        self._cond = threading.Condition()
        self._done = threading.Event()
        self._receiver = threading.Thread(target=self._receive, name="test-pull")

    def start(self) -> None:
        self.thread.start()
        self._receiver.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self._done.set()
        self._receiver.join(10)

    def _receive(self) -> None:
        ctx = zmq.Context()
        pull = ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.connect(self.beamline.bind)
        try:
            while not self._done.is_set():
                if pull.poll(100):
                    frame = decode(pull.recv_multipart(copy=False))
                    with self._cond:
                        self._frames.append(frame)
                        self._cond.notify_all()
        finally:
            pull.close()
            ctx.term()

    def frames(self, n: int, where: Callable[[Frame], bool] = lambda f: True,
               after_ns: int | None = None, timeout: float = 10.0) -> list[Frame]:
        """The first ``n`` frames acquired after ``after_ns`` (default: now) that satisfy
        ``where``."""
        after_ns = time.time_ns() if after_ns is None else after_ns
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [f for f in self._frames if f.t_ns > after_ns and where(f)]
                if len(found) >= n:
                    return found[:n]
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"only {len(found)} of {n} frames in {timeout} s"
                self._cond.wait(remaining)

    def pv(self, suffix: str) -> str:
        return self.beamline.prefix + suffix

    def motor(self, role: str) -> epics.Motor:
        return epics.Motor(self.beamline.ioc.motor_pvs[role])

    def put(self, suffix: str, value: object) -> None:
        assert epics.caput(self.pv(suffix), value, wait=True, timeout=5) == 1


def _stack(frames: list[Frame]) -> np.ndarray:
    return np.array([f.image for f in frames], dtype=np.float64)


def _wait(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def _uncached(name: str) -> object:
    return epics.caget(name, use_monitor=False, timeout=5)


@pytest.fixture(scope="module")
def running() -> Iterator[Rig]:
    rig = Rig(SimBeamline(prefix=f"T{uuid.uuid4().hex[:8]}:", ca_port=free_ca_port(),
                          bind=free_tcp_url(), size=SIZE, fps=FPS,
                          focus_offset_um=FOCUS_OFFSET_UM, beam_drift_px_per_s=0.0,
                          vibration_nm=0.0, seed=1))
    rig.start()
    try:
        rig.frames(1, after_ns=0)  # the IOC serves and frames flow
        configure_ca_client([rig.beamline.ioc.port], reset=True)
        yield rig
    finally:
        rig.close()


@pytest.fixture
def rig(running: Rig) -> Iterator[Rig]:
    """The running beamline, put back into its start state after the test."""
    yield running
    running.put("CAM:Acquire", "Acquire")
    running.put("CAM:AcquireTime", 0.05)
    running.put("CAM:FrameType", "Normal")
    running.put("SHUTTER", "Open")
    for role, motor in running.beamline.ioc.config.motors.items():
        running.motor(role).move(motor.initial, wait=True, timeout=30)


def _references(rig: Rig, n: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Darks (FrameType Background) and flats (FlatField) acquired through the IOC."""
    stacks = []
    for frame_type, kind in (("Background", "dark"), ("FlatField", "flat")):
        rig.put("CAM:FrameType", frame_type)
        stacks.append(_stack(rig.frames(n, lambda f, k=kind: f.kind == k)))
    rig.put("CAM:FrameType", "Normal")
    return stacks[0], stacks[1]


# -- frames and motors ---------------------------------------------------------------------

def test_frames_carry_the_readbacks_at_exposure_start(rig: Rig) -> None:
    rig.motor("sample_x_um").move(0.25, wait=True)
    rig.motor("beam_y").move(-1.5, wait=True)
    frames = rig.frames(5, lambda f: f.positions["beam_y"] == -1.5)
    received_ns = time.time_ns()
    readbacks = {role: _uncached(rig.beamline.ioc.motor_pvs[role] + ".RBV")
                 for role in MOTOR_ROLES}
    assert readbacks["sample_x_um"] == 0.25 and readbacks["beam_y"] == -1.5
    for frame in frames:
        assert frame.positions == readbacks
        assert frame.kind == "data" and not frame.moving and frame.series == SERIES
        assert frame.shape == (SIZE, SIZE) and frame.image.dtype == np.dtype("<u2")
        assert frame.energy_ev == readbacks["energy_ev"] == 8000.0
        assert frame.exposure_s == _uncached(rig.pv("CAM:AcquireTime")) == 0.05
        assert frame.attrs == {"pixel_nm": pytest.approx(optics.pixel_nm(8000.0)),
                               "frame_type": "Normal", "shutter_open": True,
                               "ring_current_ma": 200.0}
        # sent only after its exposure window closed
        assert received_ns >= frame.t_ns + frame.exposure_s * 1e9
    seqs = [f.seq for f in frames]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert _wait(lambda: _uncached(rig.pv("CAM:ArrayCounter_RBV")) >= seqs[-1])
    # the start state: the shaker fills the ZP for this detector size, ZP at nominal focus
    assert readbacks["shaker_amp_um"] == pytest.approx(SimParams(size_px=SIZE).fill_amp)
    assert readbacks["zp_z_um"] == 0.0


def test_zp_travel_and_speed_allow_focus_tracking_over_energy(rig: Rig) -> None:
    zp = rig.motor("zp_z_um")
    low, high = zp.LLM, zp.HLM
    assert low == pytest.approx(nominal_focus_z_um(SimParams(), 5000.0) - ZP_Z_MARGIN_UM)
    assert high == pytest.approx(nominal_focus_z_um(SimParams(), 14000.0) + ZP_Z_MARGIN_UM)
    assert zp.VELO == ZP_Z_VELOCITY_UM_S


def test_zp_move_marks_frames_during_the_move_as_moving(rig: Rig) -> None:
    zp = rig.motor("zp_z_um")
    target = 40.0  # 0.2 s at 200 µm/s: several exposures
    t_before = time.time_ns()
    assert zp.move(target, wait=True) == 0  # the receiver thread keeps the frames meanwhile
    t_done = time.time_ns() + 20_000_000  # margin for the frame loop's own clock reads
    frames = rig.frames(1, after_ns=t_before)
    while sum(f.t_ns > t_done for f in frames) < 3:
        frames = rig.frames(len(frames) + 1, after_ns=t_before)
    during = [f for f in frames if f.t_ns < t_done]
    after = [f for f in frames if f.t_ns > t_done]
    assert len(after) >= 3
    for frame in after:
        assert frame.positions["zp_z_um"] == target and not frame.moving
    in_between = [f for f in during if 0.0 < f.positions["zp_z_um"] < target]
    assert in_between, "no exposure started while the ZP was on its way"
    assert all(f.moving for f in in_between)
    assert any(f.moving for f in during)


# -- physics seen through the IOC ------------------------------------------------------------

def test_defocusing_lowers_the_measured_cutoff(rig: Rig) -> None:
    darks, flats = _references(rig)
    zp = rig.motor("zp_z_um")
    focus = _uncached(rig.pv("TRUTH:FOCUS_Z_UM"))
    assert focus == pytest.approx(FOCUS_OFFSET_UM)
    model = Simulator(SimParams(size_px=SIZE, focus_offset_um=FOCUS_OFFSET_UM))
    cutoffs, truth_nm = {}, {}
    for z in (focus, focus + 8.0, focus - 8.0):
        zp.move(z, wait=True)
        frames = rig.frames(4, lambda f, z=z: f.positions["zp_z_um"] == z and not f.moving)
        corrected = normalize(_stack(frames).mean(axis=0), darks, flats)
        result = radial_psd(corrected, frames[0].attrs["pixel_nm"])
        assert result.verdict == "resolved"
        cutoffs[z] = result.cutoff_per_um
        state = BeamlineState(zp_z_um=z, shaker_amp_um=frames[0].positions["shaker_amp_um"])
        truth_nm[z] = model.optics_truth(state)["resolution_nm"]
        assert _wait(lambda t=truth_nm[z]: math.isclose(
            _uncached(rig.pv("TRUTH:RESOLUTION_NM")), t, rel_tol=1e-6))
    assert 20.0 <= cutoffs[focus] <= 45.0  # a focused 25 nm zone plate
    for z in (focus + 8.0, focus - 8.0):
        assert cutoffs[z] < cutoffs[focus] - 5.0
        assert truth_nm[z] > truth_nm[focus]


def test_shaker_amplitude_changes_the_uniformity_of_flats(rig: Rig) -> None:
    darks, _ = _references(rig, n=2)
    dark = darks.mean(axis=0)
    shaker = rig.motor("shaker_amp_um")
    full = shaker.RBV
    cv, truth_cv = {}, {}
    rig.put("CAM:FrameType", "FlatField")
    for amp in (full, 0.3 * full):
        shaker.move(amp, wait=True)
        flats = rig.frames(2, lambda f, a=amp: f.kind == "flat"
                           and f.positions["shaker_amp_um"] == a and not f.moving)
        binned = bin_image((_stack(flats).mean(axis=0) - dark).astype(np.float32), 4)
        cv[amp] = illumination_uniformity(binned, sigma_px=2.0)
        truth_cv[amp] = _uncached(rig.pv("TRUTH:UNIFORMITY_CV"))
    assert cv[full] < 0.12
    assert cv[0.3 * full] > 1.5 * cv[full]
    assert truth_cv[0.3 * full] > truth_cv[full]


def test_steering_moves_the_centroid_in_the_configured_direction(rig: Rig) -> None:
    rig.motor("shaker_amp_um").move(0.0, wait=True)  # a bare spot: its centroid is clear
    rig.put("CAM:FrameType", "FlatField")
    steer = rig.motor("beam_x")
    matrix = np.array(SimParams().steering_px_per_unit)
    centroids = {}
    for position in (0.0, 4.0):
        steer.move(position, wait=True)
        frames = rig.frames(2, lambda f, p=position: f.kind == "flat"
                            and f.positions["beam_x"] == p and not f.moving)
        image = _stack(frames).mean(axis=0) - DARK_COUNTS
        stats = beam_stats(image, background=0.5 * image.max())
        centroids[position] = np.array([stats.centroid_x_px, stats.centroid_y_px])
        # no drift, and seed 1 draws its first beam jump 423 s after the start
        spot = matrix @ np.array([position, 0.0])
        assert _wait(lambda s=spot: _uncached(rig.pv("TRUTH:BEAM_X_PX")) == pytest.approx(s[0]))
        assert _uncached(rig.pv("TRUTH:BEAM_Y_PX")) == pytest.approx(spot[1])
    expected = matrix @ np.array([4.0, 0.0])  # +x gain, small y cross-coupling
    moved = centroids[4.0] - centroids[0.0]
    assert moved[0] > 0.4 * expected[0]
    assert abs(moved[1]) < 0.2 * moved[0]


def test_closing_the_shutter_gives_dark_pixels_in_data_frames(rig: Rig) -> None:
    rig.put("SHUTTER", "Closed")
    frames = rig.frames(3, lambda f: not f.attrs["shutter_open"])
    for frame in frames:
        assert frame.kind == "data"  # the tag follows CAM:FrameType, the pixels the physics
        assert frame.image.mean() == pytest.approx(DARK_COUNTS, abs=0.5)
        assert frame.image.std() < 3.0  # read noise only
    rig.put("SHUTTER", "Open")
    (bright,) = rig.frames(1, lambda f: f.attrs["shutter_open"])
    assert bright.image.mean() > 10 * DARK_COUNTS


def test_flatfield_frames_are_flat_tagged_and_hold_no_sample(rig: Rig) -> None:
    rig.put("CAM:FrameType", "FlatField")
    flats = rig.frames(2, lambda f: f.attrs["frame_type"] == "FlatField")
    assert all(f.kind == "flat" for f in flats)
    rig.put("CAM:FrameType", "Normal")
    (data,) = rig.frames(1, lambda f: f.attrs["frame_type"] == "Normal")
    assert data.kind == "data"
    centre = (slice(SIZE // 4, 3 * SIZE // 4),) * 2
    a, b = (f.image[centre].astype(np.float64) - DARK_COUNTS for f in flats)
    photon_noise = math.sqrt(2.0 / a.mean())
    assert np.std(a / b) < 1.3 * photon_noise  # two flats differ by photon noise only
    sample = data.image[centre].astype(np.float64) - DARK_COUNTS
    assert np.std(sample / b) > 5 * photon_noise  # the Siemens star is in the data frame


def test_acquire_done_stops_the_frames_and_acquire_resumes_them(rig: Rig) -> None:
    counter = rig.pv("CAM:ArrayCounter_RBV")
    rig.put("CAM:Acquire", "Done")
    assert _wait(lambda: not rig.beamline.summary()["acquiring"])
    time.sleep(0.1)  # the exposure under way when acquisition stopped is still read out
    seq = rig.beamline.summary()["seq"]
    assert _wait(lambda: _uncached(counter) == seq)  # the counter is posted asynchronously
    time.sleep(0.3)
    assert _uncached(counter) == seq and rig.beamline.summary()["seq"] == seq
    rig.put("CAM:Acquire", "Acquire")
    (frame,) = rig.frames(1)
    assert frame.seq == seq + 1  # the camera counts on


def test_an_exposure_longer_than_the_period_stretches_the_frame_period(rig: Rig) -> None:
    rig.put("CAM:AcquireTime", 0.12)  # > 1/FPS
    frames = rig.frames(4, lambda f: f.exposure_s == 0.12)
    starts_s = np.array([f.t_ns for f in frames]) * 1e-9
    # an absolute schedule of 0.12 s (each start may lag its slot by the loop's latency),
    # well apart from the 0.05 s asked for
    assert np.all(np.diff(starts_s) > 0.1) and np.diff(starts_s).mean() > 0.115
    assert np.all(np.diff([f.seq for f in frames]) == 1)  # stretched, not dropped
    long_counts = frames[-1].image.mean() - DARK_COUNTS
    rig.put("CAM:AcquireTime", 0.05)
    (short,) = rig.frames(1, lambda f: f.exposure_s == 0.05)
    assert long_counts == pytest.approx(0.12 / 0.05 * (short.image.mean() - DARK_COUNTS),
                                        rel=0.05)


def test_truth_follows_the_energy_and_keeps_the_hidden_focus_offset(rig: Rig) -> None:
    assert _uncached(rig.pv("TRUTH:FOCUS_Z_UM")) == pytest.approx(FOCUS_OFFSET_UM)
    for key in ("BEAM_X_PX", "BEAM_Y_PX", "UNIFORMITY_CV", "RESOLUTION_NM"):
        assert math.isfinite(_uncached(rig.pv("TRUTH:" + key)))
    rig.motor("energy_ev").move(8100.0, wait=True)
    (frame,) = rig.frames(1, lambda f: f.energy_ev == 8100.0 and not f.moving)
    assert frame.positions["energy_ev"] == 8100.0
    assert frame.attrs["pixel_nm"] == pytest.approx(optics.pixel_nm(8100.0))
    focus = nominal_focus_z_um(SimParams(), 8100.0) + FOCUS_OFFSET_UM
    assert focus == pytest.approx(FOCUS_OFFSET_UM + 100 * 2.68, rel=0.01)  # ~2.7 µm/eV
    assert _wait(lambda: math.isclose(_uncached(rig.pv("TRUTH:FOCUS_Z_UM")), focus))
    summary = rig.beamline.summary()
    assert summary["frames_rendered"] == summary["seq"] > 0
    assert summary["render_errors"] == 0 and summary["achieved_fps"] > 0


def test_a_state_outside_the_model_is_skipped_and_counted_not_fatal(rig: Rig) -> None:
    energy = rig.beamline.ioc.motor_pvs["energy_ev"]
    errors = rig.beamline.summary()["render_errors"]
    # a client widens the limit beyond the beamline's energy range and drives out there
    velocity = _uncached(energy + ".VELO")
    assert epics.caput(energy + ".HLM", 15000.0, wait=True, timeout=5) == 1
    assert epics.caput(energy + ".VELO", 1e5, wait=True, timeout=5) == 1
    try:
        assert epics.caput(energy + ".VAL", 14500.0, wait=True, timeout=5) == 1
        assert _wait(lambda: rig.beamline.summary()["render_errors"] > errors + 2)
        seq = rig.beamline.summary()["seq"]
        time.sleep(0.2)
        assert rig.beamline.summary()["seq"] == seq  # no frames out there
        assert epics.caput(energy + ".VAL", 8000.0, wait=True, timeout=5) == 1
        (frame,) = rig.frames(1, lambda f: f.energy_ev == 8000.0 and not f.moving)
        assert frame.seq > seq  # the camera carries on
    finally:
        epics.caput(energy + ".HLM", 14000.0, wait=True, timeout=5)
        epics.caput(energy + ".VELO", velocity, wait=True, timeout=5)


# -- life cycle --------------------------------------------------------------------------------

def test_stop_without_a_consumer_counts_undelivered_frames_and_frees_the_ports() -> None:
    port, url = free_ca_port(), free_tcp_url()
    beamline = SimBeamline(prefix=f"T{uuid.uuid4().hex[:8]}:", ca_port=port, bind=url,
                           size=64, fps=50.0)
    stop = threading.Event()
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(beamline.serve(stop)))
    thread.start()
    assert _wait(lambda: beamline.summary()["frames_undelivered"] >= 3)
    stop.set()
    thread.join(2.0)
    assert not thread.is_alive()
    assert result["frames_sent"] == 0
    assert result["frames_rendered"] == result["frames_undelivered"] == result["seq"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((LOOPBACK, port))  # the CA search port is released
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.bind(url)  # and so is the frame endpoint
    push.close(linger=0)
    ctx.term()


def test_no_end_frame_is_sent_on_stop() -> None:
    url = free_tcp_url()
    beamline = SimBeamline(prefix=f"T{uuid.uuid4().hex[:8]}:", ca_port=free_ca_port(),
                           bind=url, size=64, fps=50.0)
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(url)
    stop = threading.Event()
    thread = threading.Thread(target=beamline.serve, args=(stop,))
    thread.start()
    try:
        frames = [decode(pull.recv_multipart()) for _ in range(3) if pull.poll(10_000)]
        assert [f.kind for f in frames] == ["data"] * 3
        assert all(f.exposure_s == 1 / 50.0 for f in frames)  # the exposure fits the period
        stop.set()
        thread.join(5)
        while pull.poll(300):
            assert decode(pull.recv_multipart()).kind != "end"
    finally:
        stop.set()
        thread.join(5)
        pull.close(linger=0)
        ctx.term()


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(fps=0.0), "fps"),
    (dict(fps=math.inf), "fps"),
    (dict(energy_ev=20000.0), "energy_ev"),
    (dict(focus_offset_um=2 * MAX_FOCUS_OFFSET_UM), "focus_offset_um"),
    (dict(sample="teapot"), "unknown sample"),
    (dict(size=4), "size_px"),
    (dict(bind="127.0.0.1:5555"), "bind"),
    (dict(vibration_nm=-1.0), "vibration_rms_nm"),
])
def test_bad_settings_are_refused_with_a_clear_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SimBeamline(**kwargs)


def test_an_unbindable_endpoint_is_a_clear_error_and_stops_the_ioc() -> None:
    port = free_ca_port()
    beamline = SimBeamline(prefix=f"T{uuid.uuid4().hex[:8]}:", ca_port=port,
                           bind="tcp://256.0.0.1:1", size=64)
    with pytest.raises(ValueError, match="cannot bind"):
        beamline.start()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((LOOPBACK, port))


def test_zp_travel_spans_the_focus_over_the_energy_range() -> None:
    params = SimParams()
    low, high = zp_z_travel_um(params)
    assert nominal_focus_z_um(params, 8000.0) == 0.0
    for energy in (5000.0, 8000.0, 14000.0):
        focus = nominal_focus_z_um(params, energy)
        assert low + ZP_Z_MARGIN_UM - 1e-6 <= focus <= high - ZP_Z_MARGIN_UM + 1e-6
    slope = nominal_focus_z_um(params, 8001.0) - nominal_focus_z_um(params, 8000.0)
    assert 2.5 < slope < 2.9  # µm/eV: f = D·Δr/λ grows with E, the object distance with f
    with pytest.raises(ValueError, match="margin_um"):
        zp_z_travel_um(params, -1.0)
