"""Channel Access plumbing: loopback address lists for pyepics, caproto servers in threads.

Several CA servers on one host each serve on their own port (UDP search + TCP); a pyepics
client finds them through ``EPICS_CA_ADDR_LIST`` = ``127.0.0.1:PORT ...`` with
``EPICS_CA_AUTO_ADDR_LIST=NO``, so no search ever leaves the host. libca reads those variables
when its context is created, i.e. on the first pyepics call in the process:
:func:`configure_ca_client` must run before that (or reset the context, see its notes).

A caproto server runs in its own thread with its own asyncio loop (:class:`CaServerThread`),
so the pyepics client and any number of servers share one process; code on other threads
hands values to the server with :meth:`CaServerThread.post` (keep-latest, never blocks).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import os
import random
import socket
import threading
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any

import epics.ca
from caproto.asyncio.server import Context

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"

_client_addresses: tuple[str, ...] | None = None
"""Addresses of the pyepics context this module created, None if it created none."""


def _check_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"CA port must be an int in 1..65535, got {port!r}")
    return port


def free_ca_port(low: int = 20000, high: int = 32767, seed: int | None = None) -> int:
    """A loopback port free for both UDP and TCP, for a CA server (tests, the demo).

    A CA server needs the UDP port (searches) as much as the TCP one, and CA clients hold
    ephemeral UDP ports, so a TCP-only check is not enough. Ports are drawn below the usual
    ephemeral range (32768+) so that no client socket grabs one between this check and the
    server's bind.
    """
    rng = random.Random(seed)
    candidates = list(range(low, high + 1))
    rng.shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                tcp.bind((LOOPBACK, port))
                udp.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no port free for both UDP and TCP in {low}..{high}")


def ca_client_env(ports: Iterable[int], host: str = LOOPBACK) -> dict[str, str]:
    """Environment for a CA client that searches only ``host:PORT`` for each port.

    Also useful for a child process: ``subprocess.run(..., env=os.environ | ca_client_env(p))``.
    """
    ports = [_check_port(p) for p in ports]
    if not ports:
        raise ValueError("at least one CA server port is needed")
    return {
        "EPICS_CA_ADDR_LIST": " ".join(f"{host}:{p}" for p in ports),
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
    }


def _libca_live() -> bool:
    return epics.ca.libca is not None and epics.ca.libca is not epics.ca._LIBCA_FINALIZED


def configure_ca_client(ports: Iterable[int], host: str = LOOPBACK, *,
                        reset: bool = False) -> None:
    """Point this process's pyepics client at the CA servers on ``ports`` (and only them).

    Parameters
    ----------
    ports : iterable of int
        CA server ports (each server's UDP search port).
    host : str
        Host of the servers; loopback by default.
    reset : bool
        If pyepics already has a context whose address list lacks one of the ports, replace
        the context (the pyepics way of starting a fresh CA session: every PV, Motor or
        Device made before is dead afterwards, and a ``PV`` made with ``epics.PV`` rather
        than ``epics.get_pv`` must be unreachable or disconnected by then). Without
        ``reset`` that case is an error.

    Notes
    -----
    Not thread safe: call it from the main thread while no other thread uses pyepics.
    A context this module created whose list already holds all the ports is kept.
    """
    global _client_addresses
    env = ca_client_env(ports, host)
    wanted = tuple(env["EPICS_CA_ADDR_LIST"].split())
    if _libca_live():
        if _client_addresses is not None and set(wanted) <= set(_client_addresses):
            return
        if not reset:
            raise RuntimeError(
                "pyepics already created its CA context (address list "
                f"{_client_addresses or os.environ.get('EPICS_CA_ADDR_LIST', '<unknown>')!r}); "
                f"configure_ca_client({list(wanted)}) must run before the first pyepics call, "
                "or pass reset=True to start a fresh CA context")
    os.environ.update(env)
    if _libca_live():
        # PV objects that are garbage but not yet collected would clear their subscriptions
        # on channels of the old context after it is gone (a crash in libca): collect now.
        gc.collect()
        # As pyepics' own CAProcess does: forget the initial context so the new one (which
        # reads the environment afresh) becomes the context every thread attaches to.
        epics.ca.initial_context = None
        epics.ca.clear_cache()
    else:
        epics.ca.initialize_libca()
    _client_addresses = wanted


def loopback_server_env() -> dict[str, str]:
    """caproto server variables that keep searches and beacons on the loopback interface."""
    return {
        "EPICS_CAS_INTF_ADDR_LIST": LOOPBACK,
        "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
        "EPICS_CAS_BEACON_ADDR_LIST": LOOPBACK,
    }


class _RefusedBeaconFilter(logging.Filter):
    """Drops caproto's traceback for a beacon nobody listens to.

    Beacons go to the CA repeater port on 127.0.0.1; with no repeater running (no libca
    client has started one) every send is refused, which caproto logs with a traceback at
    each beacon period. Beacons only speed up reconnection; searches work without them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to send beacon")


def _quiet_refused_beacons() -> None:
    ctx_log = logging.getLogger("caproto.ctx")
    if not any(isinstance(f, _RefusedBeaconFilter) for f in ctx_log.filters):
        ctx_log.addFilter(_RefusedBeaconFilter())


class CaServerThread:
    """A caproto asyncio CA server on ``host:port`` in a background thread.

    Parameters
    ----------
    pvdb : dict of str to ChannelData
        The PV database (``PVGroup.pvdb``, or several merged).
    port : int
        CA server port: UDP searches are answered there and the TCP server tries it first
        (caproto falls back to another TCP port if it is taken; clients learn the TCP port
        from the search reply, so the UDP port is what they must list).
    host : str
        Interface to bind. On loopback (the default) the beacon variables of
        :func:`loopback_server_env` are set in ``os.environ`` at :meth:`start`, because
        caproto reads them from there, so no beacon leaves the host.
    name : str
        Thread name, for logs.
    """

    def __init__(self, pvdb: Mapping[str, Any], port: int, host: str = LOOPBACK,
                 name: str = "caproto-server") -> None:
        if not pvdb:
            raise ValueError("empty PV database")
        self.pvdb = dict(pvdb)
        self.port = _check_port(port)
        self.host = host
        self.name = name
        self.tcp_port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._pending: dict[str, Any] = {}
        self._flush_scheduled = False

    # -- life cycle ------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> None:
        """Start serving; returns once the server answers searches (or raises)."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name} already started")
        if self.host == LOOPBACK:
            os.environ.update(loopback_server_env())
            _quiet_refused_beacons()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise TimeoutError(f"{self.name} did not start within {timeout} s")
        if self._error is not None:
            raise RuntimeError(f"{self.name} failed to start: {self._error!r}") from self._error

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and join the thread (idempotent)."""
        thread = self._thread
        if thread is None:
            return
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:  # the loop closed meanwhile
                pass
        thread.join(timeout)
        if thread.is_alive():
            log.warning("%s did not stop within %s s", self.name, timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._ready.is_set()

    def __enter__(self) -> CaServerThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            # asyncio.run also cancels the circuits' leftover tasks before closing the loop
            asyncio.run(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported to start() and the log
            self._error = exc
            log.exception("%s stopped with an error", self.name)
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        ctx = Context(self.pvdb, interfaces=[self.host])
        # caproto reads the port from EPICS_CA_SERVER_PORT at Context creation; set it per
        # server instead of through the process-wide environment.
        ctx.ca_server_port = self.port

        async def started(async_lib: object) -> None:
            self.tcp_port = ctx.port
            self._ready.set()
            self._schedule_flush()

        await ctx.run(startup_hook=started)

    # -- handing values in from other threads ----------------------------------------------
    def submit(self, coro: Awaitable[Any]) -> concurrent.futures.Future:
        """Run a coroutine on the server's loop from another thread."""
        if self._loop is None or not self.running:
            raise RuntimeError(f"{self.name} is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def post(self, values: Mapping[str, Any]) -> None:
        """Write PV values from any thread, keep-latest: never blocks, never queues up.

        Parameters
        ----------
        values : mapping of str to value
            Full PV name → new value. Writes bypass the PVs' putters (they are the server's
            own state, not client requests). Values posted before :meth:`start`, or faster
            than the loop writes them, are coalesced: only the newest value of each PV is
            written.
        """
        unknown = [name for name in values if name not in self.pvdb]
        if unknown:
            raise KeyError(f"{self.name} serves no PV named {unknown}")
        with self._lock:
            self._pending.update(values)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        loop = self._loop
        with self._lock:
            idle = not self._pending or loop is None or not self._ready.is_set()
            if self._flush_scheduled or idle:
                return
            self._flush_scheduled = True
        try:
            loop.call_soon_threadsafe(lambda: loop.create_task(self._flush()))
        except RuntimeError:  # loop closed: the server is gone, nothing to write to
            with self._lock:
                self._flush_scheduled = False

    async def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            self._flush_scheduled = False
        for name, value in pending.items():
            try:
                await self.pvdb[name].write(value, verify_value=False)
            except Exception:  # noqa: BLE001 - one bad value must not stop the others
                log.exception("%s: writing %r to %s failed", self.name, value, name)
