"""The simulated motor record and IOC over real Channel Access (caproto server, pyepics client,
loopback, free ports, a unique prefix per test), and the Actuator implementations."""

from __future__ import annotations

import threading
import time
import uuid

import epics
import pytest

from hw.actuators import Actuator, EpicsMotor, FakeActuator, LimitError
from hw.epics_env import CaServerThread, configure_ca_client, free_ca_port
from hw.motor_record import MotorRecord, Trajectory
from hw.sim.ioc import SimIOC, SimIOCConfig, default_motors

pytestmark = pytest.mark.timeout(60)

VELOCITY = 50.0  # um/s


def _prefix() -> str:
    return f"T{uuid.uuid4().hex[:8]}:"


def _wait_for(predicate, timeout: float = 5.0, period: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(period)
    return predicate()


@pytest.fixture
def record():
    """One motor record (-100..100 um, 50 um/s, at 0) served on a free loopback port."""
    name = _prefix() + "M1"
    rec = MotorRecord(name, velocity=VELOCITY, low_limit=-100.0, high_limit=100.0,
                      initial=0.0, egu="um", desc="test motor")
    port = free_ca_port()
    server = CaServerThread(rec.pvdb, port)
    server.start()
    assert rec.initialized.wait(5)
    configure_ca_client([port], reset=True)
    yield rec
    server.stop()


def _uncached(name: str):
    return epics.caget(name, use_monitor=False, timeout=5)


def test_trajectory_moves_at_constant_speed_and_stops_on_target():
    traj = Trajectory(start=10.0, target=4.0, t0=100.0, velocity=2.0)
    assert traj.t_end == pytest.approx(103.0)
    assert traj.position(99.0) == 10.0
    assert traj.position(101.0) == pytest.approx(8.0)
    assert traj.position(103.0) == 4.0
    assert traj.position(1e6) == 4.0
    rest = Trajectory.at_rest(3.0, 5.0)
    assert rest.t_end == 5.0 and rest.position(4.0) == 3.0


def test_motor_record_rejects_inconsistent_configuration():
    with pytest.raises(ValueError, match="velocity"):
        MotorRecord("X:M", velocity=0.0, low_limit=0, high_limit=1)
    with pytest.raises(ValueError, match="outside"):
        MotorRecord("X:M", velocity=1.0, low_limit=0, high_limit=1, initial=5)
    with pytest.raises(ValueError, match="above"):
        MotorRecord("X:M", velocity=1.0, low_limit=2, high_limit=1, initial=1.5)


def test_epics_motor_works_unchanged(record):
    m = epics.Motor(record.prefix)
    assert m.get("RTYP") == "motor"
    assert m.HLM == 100.0 and m.LLM == -100.0
    assert m.VELO == VELOCITY
    assert m.get("EGU", as_string=True) == "um"
    assert m.DESC == "test motor"
    assert m.DMOV == 1 and m.MOVN == 0 and m.LVIO == 0
    assert m.within_limits(99.0) and not m.within_limits(101.0)
    info = m.get_info()
    assert info["SPMG"] == "Go" and info["SET"] == "Use"
    m.check_limits()  # raises on LVIO/HLS/LLS


def test_move_with_wait_takes_distance_over_velocity_and_ends_on_target(record):
    m = epics.Motor(record.prefix)
    target = 15.0
    t0 = time.monotonic()
    assert m.move(target, wait=True, timeout=10) == 0
    elapsed = time.monotonic() - t0
    assert elapsed >= 0.9 * target / VELOCITY
    assert m.DMOV == 1 and m.MOVN == 0
    assert m.RBV == pytest.approx(target, abs=1e-9)
    assert _uncached(record.prefix + ".RBV") == pytest.approx(target, abs=1e-9)
    assert _uncached(record.prefix + ".DRBV") == pytest.approx(target, abs=1e-9)
    assert record.position() == target and not record.moving
    assert record.moved_between(t0, time.monotonic())


def test_readback_updates_while_moving(record):
    rbv_values: list[float] = []
    dmov_values: list[int] = []
    rbv = epics.get_pv(record.prefix + ".RBV",
                       callback=lambda value, **kw: rbv_values.append(value))
    dmov = epics.get_pv(record.prefix + ".DMOV",
                    callback=lambda value, **kw: dmov_values.append(value))
    assert rbv.wait_for_connection(5) and dmov.wait_for_connection(5)
    assert _wait_for(lambda: rbv_values and dmov_values)
    epics.caput(record.prefix + ".VAL", 10.0, wait=True, timeout=10)
    assert _wait_for(lambda: rbv_values[-1] == 10.0)
    intermediate = [v for v in rbv_values if 0.0 < v < 10.0]
    assert len(intermediate) >= 3  # 0.2 s of motion with a 20 ms tick
    assert intermediate == sorted(intermediate)
    assert 0 in dmov_values and dmov_values[-1] == 1


def test_out_of_limit_target_is_refused_as_a_real_motor_record_does(record):
    m = epics.Motor(record.prefix)
    assert m.move(150.0, wait=True) == -12  # epics.Motor checks HLM/LLM before putting
    # A direct put is accepted by the record but causes no motion: LVIO = 1, VAL restored.
    t0 = time.monotonic()
    assert epics.caput(record.prefix + ".VAL", 150.0, wait=True, timeout=5) == 1
    assert _uncached(record.prefix + ".LVIO") == 1
    assert _uncached(record.prefix + ".VAL") == 0.0
    assert _uncached(record.prefix + ".RBV") == 0.0
    assert not record.moved_between(t0, time.monotonic())
    # The next in-limit move clears LVIO.
    assert m.move(-5.0, wait=True) == 0
    assert _uncached(record.prefix + ".LVIO") == 0
    assert m.RBV == -5.0


def test_stop_halts_mid_move(record):
    m = epics.Motor(record.prefix)
    m.move(90.0, wait=False)
    assert _wait_for(lambda: 5.0 < record.position() < 60.0)
    m.stop()
    assert _wait_for(lambda: _uncached(record.prefix + ".DMOV") == 1, timeout=2)
    stopped_at = _uncached(record.prefix + ".RBV")
    assert 5.0 < stopped_at < 90.0
    time.sleep(0.1)
    assert _uncached(record.prefix + ".RBV") == stopped_at
    assert _uncached(record.prefix + ".VAL") == pytest.approx(stopped_at)
    assert _uncached(record.prefix + ".STOP") == 0
    assert not record.moving and record.position() == pytest.approx(stopped_at)


def test_put_completes_only_when_the_motion_is_done(record):
    done = threading.Event()
    seen: dict[str, object] = {}

    def on_complete(**kw):
        # server-side state at the instant the client learns of the completion
        seen.update(moving=record.moving, position=record.position(), t=time.monotonic())
        done.set()

    pv = epics.get_pv(record.prefix + ".VAL")
    assert pv.wait_for_connection(5)
    target = 12.5
    t0 = time.monotonic()
    pv.put(target, wait=False, callback=on_complete)
    assert _wait_for(lambda: record.moving, timeout=2)
    assert not done.is_set()  # put still pending while the motor moves
    assert done.wait(10)
    assert seen["moving"] is False
    assert seen["position"] == target
    assert seen["t"] - t0 >= 0.9 * target / VELOCITY


def test_retarget_during_move_completes_the_first_put_when_motion_ends(record):
    first = threading.Event()
    pv = epics.get_pv(record.prefix + ".VAL")
    assert pv.wait_for_connection(5)
    pv.put(40.0, wait=False, callback=lambda **kw: first.set())
    assert _wait_for(lambda: record.position() > 1.0)
    assert epics.caput(record.prefix + ".VAL", 5.0, wait=True, timeout=10) == 1
    assert first.wait(2)
    assert record.position() == 5.0 and not record.moving


def test_relative_and_tweak_moves(record):
    m = epics.Motor(record.prefix)
    m.put("TWV", 2.0, wait=True)
    assert m.tweak("forward", wait=True) == 0
    assert _uncached(record.prefix + ".RBV") == 2.0
    assert epics.caput(record.prefix + ".RLV", 3.0, wait=True, timeout=5) == 1
    assert _uncached(record.prefix + ".RBV") == 5.0
    assert _uncached(record.prefix + ".RLV") == 0.0


def test_spmg_pause_holds_the_target_and_go_resumes(record):
    m = epics.Motor(record.prefix)
    m.move(30.0, wait=False)
    assert _wait_for(lambda: record.position() > 2.0)
    m.put("SPMG", "Pause", wait=True)
    assert _wait_for(lambda: not record.moving, timeout=2)
    paused_at = record.position()
    assert 2.0 < paused_at < 30.0
    assert _uncached(record.prefix + ".VAL") == 30.0  # Pause keeps the target
    m.put("SPMG", "Go", wait=True)
    assert _wait_for(lambda: record.position() == 30.0 and not record.moving)
    m.put("SPMG", "Stop", wait=True)
    assert epics.caput(record.prefix + ".VAL", 0.0, wait=True, timeout=5) == 1
    assert record.position() == 30.0  # stored, not moved, while stopped
    m.put("SPMG", "Go", wait=True)
    assert _wait_for(lambda: record.position() == 0.0 and not record.moving)


def test_velocity_change_applies_to_the_move_under_way(record):
    m = epics.Motor(record.prefix)
    m.move(60.0, wait=False)
    assert _wait_for(lambda: record.position() > 1.0)
    m.put("VELO", 500.0, wait=True)
    traj = record.trajectory
    assert traj.velocity == 500.0 and traj.target == 60.0 and traj.start > 1.0
    assert _wait_for(lambda: record.position() == 60.0 and not record.moving)
    epics.caput(record.prefix + ".VELO", -1.0, wait=True, timeout=5)
    assert _uncached(record.prefix + ".VELO") == 500.0  # a speed <= 0 is refused


def test_limits_can_be_changed_by_a_client(record):
    m = epics.Motor(record.prefix)
    m.put("HLM", 20.0, wait=True)
    assert _uncached(record.prefix + ".DHLM") == 20.0
    assert record.limits == (-100.0, 20.0)
    assert m.move(30.0, wait=True) == -12
    assert record.position() == 0.0


def test_epics_motor_actuator(record):
    motor = EpicsMotor(record.prefix, name="zp_z_um")
    assert isinstance(motor, Actuator)
    assert motor.unit == "um" and motor.limits == (-100.0, 100.0)
    t0 = time.monotonic()
    motor.move(-7.5)
    assert time.monotonic() - t0 >= 0.9 * 7.5 / VELOCITY
    assert motor.position == -7.5 and not motor.moving
    with pytest.raises(LimitError, match="outside the soft limits"):
        motor.move(101.0)
    with pytest.raises(LimitError, match="not finite"):
        motor.move(float("nan"))
    assert record.position() == -7.5
    motor.move(50.0, wait=False)
    assert _wait_for(lambda: motor.moving, timeout=2)
    motor.stop()
    assert _wait_for(lambda: not motor.moving, timeout=2)
    assert -7.5 < motor.position < 50.0


def test_epics_motor_small_unwaited_move_is_never_done_before_it_reaches_its_target(record):
    # The executor polls `moving` and the readback against a tolerance right after an
    # un-waited put; a step below the tolerance must not look done at its start position.
    motor = EpicsMotor(record.prefix, name="shaker_amp_um")
    target = 0.0
    for _ in range(20):
        target += 0.013
        motor.move(target, wait=False)
        assert motor.moving or motor.position == pytest.approx(target, abs=1e-9)
        assert _wait_for(lambda: not motor.moving, timeout=2)
        assert motor.position == pytest.approx(target, abs=1e-9)


def test_epics_motor_on_a_missing_record_is_a_connection_error(record):
    with pytest.raises(ConnectionError, match="did not connect"):
        EpicsMotor(record.prefix + "NOPE", connect_timeout=0.3)


def test_fake_actuator_moves_on_its_clock_and_refuses_out_of_limits():
    now = [0.0]

    def sleep(dt: float) -> None:
        now[0] += dt

    fake = FakeActuator("zp_z_um", "um", limits=(-10.0, 10.0), position=1.0, velocity=2.0,
                        clock=lambda: now[0], sleep=sleep)
    assert isinstance(fake, Actuator)
    fake.move(5.0, wait=False)
    assert fake.moving and fake.position == 1.0
    now[0] = 1.0
    assert fake.position == pytest.approx(3.0)
    fake.stop()
    assert not fake.moving and fake.position == pytest.approx(3.0)
    fake.move(-1.0)  # waits 2 s of fake time
    assert now[0] == pytest.approx(3.0) and fake.position == -1.0
    with pytest.raises(LimitError):
        fake.move(11.0)
    with pytest.raises(TimeoutError):
        fake.move(9.0, timeout=1.0)
    assert fake.moves == [5.0, -1.0, 9.0]
    instant = FakeActuator("energy_ev", "eV", limits=(5000, 14000), position=8000)
    instant.move(9000)
    assert instant.position == 9000 and not instant.moving


def test_configure_ca_client_refuses_to_silently_keep_a_stale_context(record):
    port = free_ca_port()
    with pytest.raises(RuntimeError, match="before the first pyepics call"):
        configure_ca_client([port])


# -- the simulated beamline IOC ------------------------------------------------------------

@pytest.fixture
def ioc():
    motors = default_motors(zp_z_nominal_um=1000.0)
    sim = SimIOC(SimIOCConfig(motors=motors), prefix=_prefix(), port=free_ca_port())
    sim.start()
    configure_ca_client([sim.port], reset=True)
    yield sim
    sim.stop()


def test_default_motors_take_start_positions_within_limits():
    motors = default_motors(initial={"shaker_amp_um": 12.5, "beam_x": -3.0})
    assert motors["shaker_amp_um"].initial == 12.5 and motors["beam_x"].initial == -3.0
    with pytest.raises(ValueError, match="outside"):
        default_motors(initial={"zp_z_um": 500.0})
    with pytest.raises(KeyError, match="unknown motor role"):
        default_motors(initial={"zp_q_um": 0.0})


def test_sim_ioc_serves_motor_records_and_beamline_pvs(ioc):
    zp = epics.Motor(ioc.motor_pvs["zp_z_um"])
    assert zp.RBV == 1000.0 and zp.LLM == 800.0 and zp.HLM == 1200.0
    assert zp.get("EGU", as_string=True) == "um"
    energy = epics.Motor(ioc.prefix + "ENERGY")
    assert energy.RBV == 8000.0 and energy.get("EGU", as_string=True) == "eV"
    assert epics.caget(ioc.prefix + "CAM:FrameType", as_string=True) == "Normal"
    assert epics.caget(ioc.prefix + "SHUTTER", as_string=True) == "Open"
    assert epics.caget(ioc.prefix + "CAM:Acquire", as_string=True) == "Acquire"
    assert epics.caget(ioc.prefix + "RING:CURRENT") == 200.0
    snap = ioc.snapshot()
    assert snap["positions"]["zp_z_um"] == 1000.0
    assert snap["positions"]["energy_ev"] == 8000.0
    assert set(snap["positions"]) == set(default_motors())
    assert snap["shutter_open"] and snap["acquire"] and snap["frame_type"] == "Normal"
    assert not any(snap["moving"].values())


def test_sim_ioc_snapshot_follows_client_puts(ioc):
    assert epics.caput(ioc.prefix + "SHUTTER", "Closed", wait=True) == 1
    assert epics.caput(ioc.prefix + "CAM:FrameType", "FlatField", wait=True) == 1
    assert epics.caput(ioc.prefix + "CAM:AcquireTime", 0.2, wait=True) == 1
    assert epics.caput(ioc.prefix + "RING:CURRENT", 0.0, wait=True) == 1
    snap = ioc.snapshot()
    assert not snap["shutter_open"] and snap["frame_type"] == "FlatField"
    assert snap["exposure_s"] == 0.2 and snap["ring_current_ma"] == 0.0


def test_sim_ioc_reports_motion_during_an_exposure(ioc):
    t_before = time.monotonic()
    time.sleep(0.01)
    t0 = time.monotonic()
    epics.Motor(ioc.motor_pvs["beam_x"]).move(5.0, wait=True)
    t1 = time.monotonic()
    time.sleep(0.01)
    assert ioc.moved_between(t0, t1)
    assert ioc.moved_between(t0, t1, roles=["beam_x"])
    assert not ioc.moved_between(t0, t1, roles=["zp_z_um", "energy_ev"])
    assert not ioc.moved_between(t_before, t_before + 0.005)
    assert not ioc.moved_between(time.monotonic() - 0.005, time.monotonic())
    assert ioc.snapshot()["positions"]["beam_x"] == 5.0
    with pytest.raises(KeyError, match="unknown motor roles"):
        ioc.moved_between(t0, t1, roles=["nope"])


def test_sim_ioc_publishes_truth_and_counter_from_another_thread(ioc):
    def generator():
        for n in range(1, 51):
            ioc.set_array_counter(n)
            ioc.set_truth(focus_z_um=1000.0 + n, resolution_nm=25.0)

    thread = threading.Thread(target=generator)
    thread.start()
    thread.join()
    counter = ioc.prefix + "CAM:ArrayCounter_RBV"
    assert _wait_for(lambda: _uncached(counter) == 50)
    assert _wait_for(lambda: _uncached(ioc.prefix + "TRUTH:FOCUS_Z_UM") == 1050.0)
    assert _wait_for(lambda: _uncached(ioc.prefix + "TRUTH:RESOLUTION_NM") == 25.0)
    with pytest.raises(epics.ca.CASeverityException, match="Write access denied"):
        epics.caput(ioc.prefix + "TRUTH:FOCUS_Z_UM", 1.0, wait=True, timeout=2)
    ioc.set_ring_current(0.0)
    assert ioc.snapshot()["ring_current_ma"] == 0.0
    assert _wait_for(lambda: _uncached(ioc.prefix + "RING:CURRENT") == 0.0)
    with pytest.raises(KeyError, match="unknown truth keys"):
        ioc.set_truth(focus=1.0)
