"""Latency of a real ``txmlive run`` process, per stage, with the baseline in the same run.

``txmlive bench latency [--input FILE] [--size N] [--fps F] [--frames N] [--json FILE]
[--plot FILE]`` starts the pipeline as its own process on free loopback ports, replays a
recorded series (``--input``, its data frames cycled as often as needed) or synthesized
``N × N`` uint16 frames from a separate sender process at a fixed rate, and subscribes to the
results. Then it does the same with the baseline (:mod:`bench.baseline`).

Per frame it measures, from the frame's ``t_ns`` (stamped by the sender when the frame goes on the
wire) to its Result, each stage the pipeline stamps: ``receive`` (``t_ns`` → ``recv``), ``queue``
(→ ``dequeue``), ``correct``, ``average``, ``metrics`` (→ the in-order metrics stage is done with
it), ``publish``, and ``end_to_end``; each as p50/p90/p99/max over the measured frames (the
``--warmup-frames`` go first, as their own series, and are reported apart: they pay first-call
costs). ``t_ns`` is wall-clock and the stamps are monotonic; the offset between the two clocks is
the median over the results of ``t_ns + latency_ms·1e6 − stamps.publish`` (``latency_ms`` is wall-
clock ``t_ns`` → publish, taken next to the ``publish`` stamp). Frames dropped, rejected, sequence
gaps and results that never arrived come from the run's summary and the results themselves.

This module also holds the harness :mod:`bench.throughput` builds on: :class:`Sender` (frames
prepared once in a spawned process, so pacing never shares the harness's GIL),
:class:`PipelineProcess` (``txmlive run`` or the baseline as a subprocess) and
:class:`ResultCollector` (a SUB socket on its own thread that only stores raw messages; the
main thread decodes them in batches, keeping the harness light on a 2-core machine).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from stream.frame import Frame
from stream.pipeline import percentiles_ms
from stream.publish import decode_message

OUT_DIR = Path(__file__).resolve().parent / "out"

TARGETS = ("product", "baseline")
"""What a harness run measures: ``txmlive run``, or :mod:`bench.baseline`."""

STAGES = (("recv", "receive"), ("dequeue", "queue"), ("correct", "correct"),
          ("average", "average"), ("metrics", "metrics"),
          ("publish", "publish"))
"""(stamp, stage name) in pipeline order; a stage lasts from the previous stamp present (or
``t_ns`` for the first) to its own."""

STAGE_NAMES = tuple(name for _, name in STAGES)

SUBSCRIBE_WAIT_S = 0.5
"""Time for the results subscription to reach the publisher before any frame is sent."""

READY_TIMEOUT_S = 180.0
"""How long a pipeline process may take to bind its sockets (imports, numba cache loads)."""

WARMUP_QUIET_S = 15.0
"""How long the first (warm-up) series may go without a result before its results are given
up on: first-call costs (numba cache loads, FFT plans, the baseline's references)."""

MAX_UNIQUE_FRAMES = 64
"""At most this many data frames of a recorded series are held in memory and cycled."""


# -- frames: prepared once, sent from a separate process ------------------------------------

@dataclasses.dataclass(frozen=True)
class FrameSource:
    """Where the sender's frames come from.

    Attributes
    ----------
    input : str or None
        A recorded series (any format :func:`stream.readers.open_series` reads); None for
        synthesized frames.
    size : int
        Side of synthesized frames, px (ignored with ``input``).
    seed : int
        Seed of the synthesized frames.
    unique : int
        Distinct synthesized frames of each kind (cycled).
    """

    input: str | None = None
    size: int = 2048
    seed: int = 0
    unique: int = 4

    def describe(self) -> str:
        return self.input if self.input else f"synthetic {self.size}x{self.size} uint16"


def load_frames(source: FrameSource) -> tuple[list[Frame], list[Frame]]:
    """References (darks, flats) and distinct data frames of ``source``, in memory.

    Returns
    -------
    refs, data : list of Frame
        Replay order; at most :data:`MAX_UNIQUE_FRAMES` data frames of a recorded series.
    """
    if source.input is None:
        from stream.synth import synthetic_frames

        if source.size < 8:
            raise ValueError(f"size must be >= 8 px, got {source.size}")
        frames = list(synthetic_frames((source.size, source.size), source.unique,
                                       unique=source.unique, seed=source.seed))
    else:
        from stream.readers import open_series

        frames = []
        n_data = 0
        for frame in open_series(source.input):  # darks, flats, then data
            if frame.kind == "data":
                if n_data == MAX_UNIQUE_FRAMES:
                    break
                n_data += 1
            frames.append(frame)
    refs = [f for f in frames if f.kind in ("dark", "flat")]
    data = [f for f in frames if f.kind == "data"]
    if not data:
        raise ValueError(f"{source.describe()} holds no data frames")
    return refs, data


def trial_frames(refs: list[Frame], data: list[Frame], n_data: int, series: str,
                 with_refs: bool) -> Iterator[Frame]:
    """The references (if ``with_refs``), then ``n_data`` data frames cycling ``data``.

    ``seq`` counts from 0 within ``series``; stamps are cleared.
    """
    seq = 0
    if with_refs:
        for frame in refs:
            yield dataclasses.replace(frame, seq=seq, series=series, stamps={})
            seq += 1
    for k in range(n_data):
        yield dataclasses.replace(data[k % len(data)], seq=seq, series=series, stamps={})
        seq += 1


def _sender_main(conn: Any, source: FrameSource, bind: str) -> None:
    """Child process: prepare frames, then replay a trial per command until ``quit``."""
    from stream.replay import replay

    try:
        refs, data = load_frames(source)
        image = data[0].image
        conn.send(("ready", {"shape": list(image.shape), "dtype": image.dtype.str,
                             "refs": len(refs), "unique_data": len(data)}))
        while True:
            command = conn.recv()
            if command[0] == "quit":
                return
            _, fps, n_data, series, with_refs, send_end = command
            frames = trial_frames(refs, data, n_data, series, with_refs)
            conn.send(("done", replay(frames, bind, fps=fps, send_end=send_end)))
    except Exception:  # report to the harness rather than die silently
        conn.send(("error", traceback.format_exc()))


class Sender:
    """A spawned process that replays frames at a rate on command (a PUSH bind per trial).

    Parameters
    ----------
    source : FrameSource
    bind : str
        Frames endpoint the sender binds for each trial.
    ready_timeout_s : float
        How long preparing the frames may take.
    """

    def __init__(self, source: FrameSource, bind: str, ready_timeout_s: float = 600.0):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_sender_main, args=(child, source, bind),
                                 name="bench-sender", daemon=True)
        self._proc.start()
        self.info = self._reply("ready", ready_timeout_s)

    def _reply(self, expect: str, timeout_s: float) -> dict[str, Any]:
        if not self._conn.poll(timeout_s):
            self.close()
            raise RuntimeError(f"the sender did not answer within {timeout_s:.0f} s")
        kind, payload = self._conn.recv()
        if kind == "error":
            self.close()
            raise RuntimeError(f"the sender failed:\n{payload}")
        if kind != expect:
            raise RuntimeError(f"the sender answered {kind!r}, expected {expect!r}")
        return payload

    def send(self, fps: float, n_data: int, *, series: str, with_refs: bool, send_end: bool,
             timeout_s: float) -> dict[str, Any]:
        """Replay one trial; returns the replay summary (:func:`stream.replay.replay`)."""
        self._conn.send(("send", fps, n_data, series, with_refs, send_end))
        return self._reply("done", timeout_s)

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(("quit",))
            except (OSError, BrokenPipeError):
                pass
            self._proc.join(10.0)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5.0)

    def __enter__(self) -> Sender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the measured process -------------------------------------------------------------------

class PipelineProcess:
    """``txmlive run`` (target ``product``) or :mod:`bench.baseline` as a subprocess.

    Parameters
    ----------
    target : {"product", "baseline"}
    urls : dict
        ``frames`` (the process connects PULL), ``results`` and ``preview`` (it binds PUB).
    config : str or Path, optional
        TOML configuration of ``txmlive run``.
    roi_px : int, optional
        PSD ROI side of the baseline (the product reads its ROI from the config).
    """

    def __init__(self, target: str, urls: dict[str, str], *, config: str | Path | None = None,
                 roi_px: int | None = None):
        if target == "product":
            cmd = [sys.executable, "-m", "txmlive.cli", "run", "--connect", urls["frames"],
                   "--results", urls["results"], "--preview", urls["preview"], "--json"]
            if config is not None:
                cmd += ["--config", str(config)]
        elif target == "baseline":
            cmd = [sys.executable, "-m", "bench.baseline", "--connect", urls["frames"],
                   "--results", urls["results"], "--json"]
            if roi_px is not None:
                cmd += ["--roi", str(roi_px)]
        else:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        self.target = target
        self.cmd = cmd
        self._proc: subprocess.Popen | None = None
        self._stdout: list[str] = []
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=40)
        self._readers: list[threading.Thread] = []

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> PipelineProcess:
        """Start the process and return once it says ``ready`` on stderr."""
        self._proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
        ready = threading.Event()

        def read_stderr() -> None:
            for line in self._proc.stderr:
                self.stderr_tail.append(line.rstrip())
                if "ready" in line:
                    ready.set()

        def read_stdout() -> None:
            self._stdout.extend(self._proc.stdout)

        self._readers = [threading.Thread(target=f, daemon=True) for f in (read_stderr,
                                                                           read_stdout)]
        for t in self._readers:
            t.start()
        deadline = time.monotonic() + timeout_s
        while not ready.wait(0.1):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop(5.0)
                raise RuntimeError(f"{self.target} did not get ready; stderr:\n"
                                   + "\n".join(self.stderr_tail))
        return self

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait(self, timeout_s: float) -> dict[str, Any]:
        """Wait for the process to exit by itself (SIGTERM after ``timeout_s``); its summary."""
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return self.stop()
        return self._summary()

    def stop(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """SIGTERM (the process prints its summary and exits), then its summary."""
        if self.running():
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        return self._summary()

    def _summary(self) -> dict[str, Any]:
        for t in self._readers:
            t.join(5.0)
        for line in reversed(self._stdout):
            try:
                summary = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(summary, dict):
                summary["returncode"] = self._proc.returncode
                return summary
        return {"returncode": self._proc.returncode, "errors": [
            f"no JSON summary; stderr tail: {' | '.join(list(self.stderr_tail)[-5:])}"]}


class ResultCollector:
    """Subscribes to a results PUB on its own thread and keeps the raw messages.

    Parameters
    ----------
    url : str
        Results endpoint (SUB connects).
    """

    def __init__(self, url: str):
        self.url = url
        self._messages: list[bytes] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.last_arrival = time.monotonic()
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-results", daemon=True)
        self._thread.start()
        self._connected.wait(10.0)

    def _run(self) -> None:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(self.url)
        self._connected.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(50):
                    continue
                batch = []
                while True:
                    try:
                        batch.append(sock.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                with self._lock:
                    self._messages.extend(batch)
                    self.last_arrival = time.monotonic()
        finally:
            sock.close(linger=0)

    def take(self) -> list[bytes]:
        """The messages received since the last call."""
        with self._lock:
            messages, self._messages = self._messages, []
            return messages

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def __enter__(self) -> ResultCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def free_urls() -> dict[str, str]:
    """Free loopback endpoints for frames, results and preview."""
    from txmlive.ports import free_tcp_url

    return {"frames": free_tcp_url(), "results": free_tcp_url(), "preview": free_tcp_url()}


# -- analysis -------------------------------------------------------------------------------

def decode_results(messages: list[bytes]) -> list[dict[str, Any]]:
    """Decoded result messages, in ``seq`` order per series."""
    results = [decode_message(m, "result") for m in messages]
    results.sort(key=lambda r: (str(r.get("series")), r["seq"]))
    return results


def clock_offset_ns(results: list[dict[str, Any]]) -> int:
    """Wall-clock minus monotonic ns of the measured process, median over ``results``.

    Each result gives ``t_ns + latency_ms·1e6 − stamps.publish``: the wall-clock publish
    time minus the monotonic one, both taken together in the publisher.
    """
    if not results:
        raise ValueError("no results to take the clock offset from")
    offsets = [r["t_ns"] - r["stamps"]["publish"] + round(r["latency_ms"] * 1e6)
               for r in results]
    return int(np.median(offsets))


def stage_times_ms(result: dict[str, Any], offset_ns: int) -> dict[str, float]:
    """Duration of every stage the result went through, ms (see :data:`STAGES`)."""
    stamps = result["stamps"]
    prev = result["t_ns"] - offset_ns
    out = {}
    for stamp, name in STAGES:
        if stamp in stamps:
            out[name] = (stamps[stamp] - prev) / 1e6
            prev = stamps[stamp]
    return out


def covered_seqs(results: list[dict[str, Any]]) -> set[int]:
    """Source frame ``seq`` numbers that some result accounts for (blocks span several)."""
    seqs: set[int] = set()
    for r in results:
        seqs.update(range(r["seq_first"], r["seq_last"] + 1))
    return seqs


COUNTER_KEYS = ("received", "processed", "dropped", "rejected_total", "gaps", "seq_resets",
                "uncorrected", "results_dropped", "metrics_skipped", "metrics_errors",
                "queue_max_depth")
"""Counters copied from the process's summary (absent ones are None: the baseline has fewer)."""


def analyze(results: list[dict[str, Any]], data_seqs: range, *,
            per_frame: bool = True) -> dict[str, Any]:
    """Per-stage and end-to-end statistics of the results of data frames ``data_seqs``.

    Parameters
    ----------
    results : list of dict
        Decoded results of one series.
    data_seqs : range
        ``seq`` of the data frames sent.
    per_frame : bool
        Include the per-frame lists (for plots).

    Returns
    -------
    dict
        ``results``, ``missing_results`` (data frames no result accounts for),
        ``end_to_end_ms`` and ``stages_ms`` (name → p50/p90/p99/max), ``own_metrics_fraction``
        (share of results whose metrics describe their own frame, ``metrics_seq == seq``: the
        pipeline's metrics stage measures the newest frame when behind; None for the
        baseline, which measures every frame),
        ``clock_offset_jitter_ms`` (p99 − p1 of the per-result clock offsets: how exactly the
        stages add up to end-to-end), ``counters_last`` (the counters the last result carried)
        and, with ``per_frame``, ``per_frame`` (``seq``, ``t_s`` of the publish from the
        first, ``end_to_end_ms`` and one list per stage, None where a frame skipped it).
    """
    measured = [r for r in results if r["seq_last"] in data_seqs]
    out: dict[str, Any] = {
        "results": len(measured),
        "missing_results": len(set(data_seqs) - covered_seqs(measured)),
    }
    if not measured:
        out.update(end_to_end_ms=percentiles_ms([]), stages_ms={}, own_metrics_fraction=None,
                   clock_offset_jitter_ms=None, counters_last={})
        if per_frame:
            out["per_frame"] = {}
        return out
    offset = clock_offset_ns(measured)
    offsets = np.array([r["t_ns"] - r["stamps"]["publish"] + round(r["latency_ms"] * 1e6)
                        for r in measured], dtype=np.float64)
    times = [stage_times_ms(r, offset) for r in measured]
    present = [name for name in STAGE_NAMES if any(name in t for t in times)]
    has_seq = [r for r in measured if "metrics_seq" in r]
    out.update(
        end_to_end_ms=percentiles_ms([r["latency_ms"] for r in measured]),
        stages_ms={name: percentiles_ms([t[name] for t in times if name in t])
                   for name in present},
        own_metrics_fraction=(sum(r["metrics_seq"] == r["seq"] for r in has_seq) / len(has_seq)
                              if has_seq else None),
        clock_offset_jitter_ms=float(np.subtract(*np.percentile(offsets, [99, 1])) / 1e6),
        counters_last=dict(measured[-1].get("counters", {})),
    )
    if per_frame:
        publish = np.array([r["stamps"]["publish"] for r in measured], dtype=np.float64)
        out["per_frame"] = {
            "seq": [r["seq_last"] for r in measured],
            "t_s": np.round((publish - publish[0]) / 1e9, 6).tolist(),
            "end_to_end_ms": [round(r["latency_ms"], 4) for r in measured],
            **{name: [None if name not in t else round(t[name], 4) for t in times]
               for name in present},
        }
    return out


def counters_of(summary: dict[str, Any]) -> dict[str, Any]:
    """The :data:`COUNTER_KEYS` of a process summary (None where the process has none)."""
    counters = summary.get("counters", {})
    return {key: counters.get(key) for key in COUNTER_KEYS}


# -- one measurement ------------------------------------------------------------------------

def send_and_collect(sender: Sender, results: ResultCollector, *, fps: float, n_data: int,
                     series: str, with_refs: bool, send_end: bool,
                     quiet_s: float = 2.0) -> tuple[dict[str, Any], list[dict[str, Any]], range]:
    """Replay one series and gather its results.

    Returns once the sender is done and either every data frame of ``series`` has a result or
    none of its results arrived for ``quiet_s`` (a consumer still working through a backlog
    keeps it waiting; results of other series are discarded). Give a first series a long
    ``quiet_s``: a fresh process may spend seconds on first-call costs before its first result.

    Returns
    -------
    sent : dict
        The replay summary.
    results : list of dict
        Decoded results of the data frames of ``series`` (results for references, which a
        pipeline may publish too, are left out).
    data_seqs : range
        ``seq`` of its data frames.
    """
    results.take()  # anything left from an earlier series
    timeout_s = 120.0 + 10.0 * n_data / fps
    sent = sender.send(fps, n_data, series=series, with_refs=with_refs, send_end=send_end,
                       timeout_s=timeout_s)
    first = sender.info["refs"] if with_refs else 0
    got: list[dict[str, Any]] = []
    quiet_s = max(quiet_s, 3.0 / fps)
    last_new = time.monotonic()
    deadline = last_new + timeout_s
    data_seqs = range(first, first + n_data)
    while len(got) < n_data and time.monotonic() < deadline:
        batch = [r for r in decode_results(results.take())
                 if r.get("series") == series and r["seq_last"] in data_seqs]
        if batch:
            got.extend(batch)
            last_new = time.monotonic()
        elif time.monotonic() - last_new >= quiet_s:
            break
        else:
            time.sleep(0.02)
    got.sort(key=lambda r: r["seq"])
    return sent, got, data_seqs


def measure_latency(target: str, source: FrameSource, *, fps: float, frames: int,
                    warmup: int, config: str | Path | None = None,
                    roi_px: int | None = None) -> dict[str, Any]:
    """Latency of ``frames`` data frames replayed at ``fps`` into a fresh ``target`` process.

    The references and ``warmup`` data frames go first as their own series (they pay
    first-call costs and are reported apart); the measured series starts once their results
    are in, so it never inherits a backlog from them.

    Returns
    -------
    dict
        :func:`analyze`'s keys plus ``target``, ``warmup`` (frames and their end-to-end
        p50/p90/p99/max), ``sender`` (replay summary: achieved ``fps``, ``max_lag_s``...),
        ``counters`` (:data:`COUNTER_KEYS` from the process summary), ``process`` (its own
        ``fps``, ``latency_ms``, ``errors``, ``returncode``) and ``load_average`` (1-min load
        average at start and end).
    """
    if frames < 1 or warmup < 0 or not fps > 0:
        raise ValueError(f"need frames >= 1, warmup >= 0 and fps > 0; got {frames}, {warmup}, "
                         f"{fps}")
    urls = free_urls()
    load_start = os.getloadavg()[0]
    with Sender(source, urls["frames"]) as sender, ResultCollector(urls["results"]) as results:
        proc = PipelineProcess(target, urls, config=config, roi_px=roi_px).start()
        try:
            time.sleep(SUBSCRIBE_WAIT_S)
            _, warm, warm_seqs = send_and_collect(sender, results, fps=fps, n_data=warmup,
                                                  series="warmup", with_refs=True,
                                                  send_end=False, quiet_s=WARMUP_QUIET_S)
            sent, measured, data_seqs = send_and_collect(
                sender, results, fps=fps, n_data=frames, series="latency", with_refs=False,
                send_end=True)
            summary = proc.wait(60.0)
        finally:
            proc.stop()
    out = analyze(measured, data_seqs)
    out.update(
        target=target,
        warmup={"frames": warmup, "end_to_end_ms": percentiles_ms(
            [r["latency_ms"] for r in warm if r["seq_last"] in warm_seqs])},
        sender={k: sent[k] for k in ("frames", "fps", "duration_s", "max_lag_s", "sent")},
        counters=counters_of(summary),
        process={"fps": summary.get("fps"), "latency_ms": summary.get("latency_ms"),
                 "errors": summary.get("errors", []), "returncode": summary["returncode"]},
        load_average={"start": load_start, "end": os.getloadavg()[0]},
    )
    return out


# -- the command ----------------------------------------------------------------------------

def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over runs of each target's statistics, and baseline / product ratios."""
    out: dict[str, Any] = {"runs": len(runs)}
    for target in TARGETS:
        measured = [run[target] for run in runs if target in run]
        if not measured:
            continue
        stats: dict[str, Any] = {"end_to_end_ms": _median_stats(
            [m["end_to_end_ms"] for m in measured])}
        stats["stages_ms"] = {
            name: _median_stats([m["stages_ms"][name] for m in measured
                                 if name in m["stages_ms"]])
            for name in STAGE_NAMES if any(name in m["stages_ms"] for m in measured)}
        for key in ("dropped", "rejected_total", "gaps", "results_dropped"):
            values = [m["counters"][key] for m in measured if m["counters"][key] is not None]
            stats[key] = max(values) if values else None
        stats["missing_results"] = max(m["missing_results"] for m in measured)
        stats["sender_fps"] = float(np.median([m["sender"]["fps"] for m in measured]))
        stats["sender_max_lag_s"] = max(m["sender"]["max_lag_s"] for m in measured)
        stats["frames"] = measured[0]["results"]
        out[target] = stats
    if "product" in out and "baseline" in out:
        out["baseline_over_product"] = {
            key: _ratio(out["baseline"]["end_to_end_ms"][key],
                        out["product"]["end_to_end_ms"][key])
            for key in ("p50", "p90", "p99", "max")}
    return out


def _median_stats(stats: list[dict[str, float | None]]) -> dict[str, float | None]:
    keys = ("p50", "p90", "p99", "max")
    return {k: (float(np.median(v)) if (v := [s[k] for s in stats if s[k] is not None])
                else None) for k in keys}


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def _fmt(value: float | None, spec: str = "8.2f") -> str:
    return format("-", ">" + spec.split(".")[0]) if value is None else format(value, spec)


def table(summary: dict[str, Any]) -> str:
    """Stage × (product, baseline) percentiles, ms, and the baseline / product ratio of p99."""
    product, baseline = summary.get("product", {}), summary.get("baseline", {})
    head = (f"{'stage':<12} {'product p50':>11} {'p90':>8} {'p99':>8} {'max':>8} | "
            f"{'baseline p50':>12} {'p99':>8} {'max':>8} | {'p99 base/prod':>13}")
    lines = [head, "-" * len(head)]
    for name in (*STAGE_NAMES, "end_to_end"):
        if name == "end_to_end":
            p, b = product.get("end_to_end_ms", {}), baseline.get("end_to_end_ms", {})
        else:
            p = product.get("stages_ms", {}).get(name, {})
            b = baseline.get("stages_ms", {}).get(name, {})
        if not p and not b:
            continue
        lines.append(
            f"{name:<12} {_fmt(p.get('p50'), '11.3f')} {_fmt(p.get('p90'), '8.3f')} "
            f"{_fmt(p.get('p99'), '8.3f')} {_fmt(p.get('max'), '8.3f')} | "
            f"{_fmt(b.get('p50'), '12.3f')} {_fmt(b.get('p99'), '8.3f')} "
            f"{_fmt(b.get('max'), '8.3f')} | {_fmt(_ratio(b.get('p99'), p.get('p99')), '13.1f')}")
    return "\n".join(lines)


def run_latency(source: FrameSource, *, fps: float, frames: int, warmup: int,
                baseline_frames: int, repeats: int = 1, config: str | Path | None = None,
                roi_px: int | None = None) -> dict[str, Any]:
    """The whole ``latency`` command's measurement: ``repeats`` runs of product and baseline.

    Returns
    -------
    dict
        ``kind`` ("latency"), ``machine`` (:func:`bench.kernels.machine_facts` and the copy
        bandwidth), ``settings``, ``runs`` (each ``{"product": ..., "baseline": ...}``, see
        :func:`measure_latency`) and ``summary`` (:func:`summarize_runs`).
    """
    from bench.kernels import copy_bandwidth_gb_s, machine_facts

    if repeats < 1 or baseline_frames < 0:
        raise ValueError(f"need repeats >= 1 and baseline_frames >= 0; got {repeats}, "
                         f"{baseline_frames}")
    report: dict[str, Any] = {
        "kind": "latency", "machine": machine_facts(),
        "settings": {"source": source.describe(), "input": source.input,
                     "size": None if source.input else source.size, "fps": fps,
                     "frames": frames, "warmup_frames": warmup,
                     "baseline_frames": baseline_frames, "repeats": repeats,
                     "config": None if config is None else str(config), "baseline_roi_px": roi_px},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": [],
    }
    report["machine"]["copy_gb_per_s"] = copy_bandwidth_gb_s()
    for _ in range(repeats):
        run = {"product": measure_latency("product", source, fps=fps, frames=frames,
                                          warmup=warmup, config=config)}
        if baseline_frames:
            run["baseline"] = measure_latency("baseline", source, fps=fps,
                                              frames=baseline_frames,
                                              warmup=min(warmup, baseline_frames),
                                              roi_px=roi_px)
        report["runs"].append(run)
    report["machine"]["load_average_end"] = os.getloadavg()
    report["summary"] = summarize_runs(report["runs"])
    return report


def plot_latency(report: dict[str, Any], path: str | Path) -> Path:
    """Per-stage latency distributions and latency over time of the first run, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = report["runs"][0]
    names = [*STAGE_NAMES, "end_to_end_ms"]
    fig, (ax_dist, ax_time) = plt.subplots(1, 2, figsize=(13, 4.8))
    for target, color, shift in (("product", "tab:blue", -0.2), ("baseline", "tab:orange", 0.2)):
        per_frame = run.get(target, {}).get("per_frame")
        if not per_frame:
            continue
        at = [i for i, name in enumerate(names) if name in per_frame]
        data = [[v for v in per_frame[names[i]] if v is not None] for i in at]
        parts = ax_dist.boxplot(data, positions=np.array(at) + shift, widths=0.35,
                                whis=(1, 99), showfliers=False, patch_artist=True)
        for box in parts["boxes"]:
            box.set_facecolor(color)
        ax_time.plot(per_frame["t_s"], per_frame["end_to_end_ms"], ".", ms=2, color=color,
                     label=target)
    ax_dist.set_xticks(np.arange(len(names)), [n.removesuffix("_ms") for n in names],
                       rotation=30)
    ax_dist.set_yscale("log")
    ax_dist.set_ylabel("latency, ms (box p25-p75, whiskers p1-p99)")
    ax_dist.set_title("per-stage latency (blue product, orange baseline)")
    ax_time.set_yscale("log")
    ax_time.set_xlabel("time since first result, s")
    ax_time.set_ylabel("end-to-end latency, ms")
    ax_time.legend()
    s = report["settings"]
    fig.suptitle(f"{s['source']} at {s['fps']:g} fps")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def have_matplotlib() -> bool:
    """Whether plots can be drawn (matplotlib is optional: ``pip install matplotlib``)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="txmlive bench latency",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", metavar="FILE",
                        help="recorded series to replay (default: synthesized frames)")
    parser.add_argument("--size", type=int, default=2048, help="synthesized frame side, px")
    parser.add_argument("--fps", type=float, default=100.0, help="send rate, frames/s")
    parser.add_argument("--frames", type=int, default=3000, help="measured data frames")
    parser.add_argument("--warmup-frames", type=int, default=50,
                        help="data frames sent first and reported apart")
    parser.add_argument("--baseline-frames", type=int, default=300,
                        help="measured frames of the baseline (0 = no baseline)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each; medians reported")
    parser.add_argument("--config", metavar="FILE", help="TOML config for txmlive run")
    parser.add_argument("--baseline-roi", type=int, help="baseline PSD ROI side, px")
    parser.add_argument("--json", type=Path, default=OUT_DIR / "latency.json",
                        help="where to write JSON")
    parser.add_argument("--plot", type=Path, metavar="FILE", help="write a PNG (matplotlib)")
    args = parser.parse_args(argv)
    if args.frames < 1 or args.warmup_frames < 0 or not args.fps > 0 or args.size < 8:
        parser.error("need --frames >= 1, --warmup-frames >= 0, --fps > 0, --size >= 8")
    if args.input is not None and not Path(args.input).exists():
        parser.error(f"--input {args.input} does not exist")
    if args.plot is not None and not have_matplotlib():
        parser.error("--plot needs matplotlib, which is not installed (pip install matplotlib)")
    source = FrameSource(input=args.input, size=args.size)
    print(f"latency: {source.describe()} at {args.fps:g} fps, {args.frames} frames "
          f"(+{args.warmup_frames} warm-up), baseline {args.baseline_frames} frames, "
          f"{args.repeats} run(s)", file=sys.stderr, flush=True)
    report = run_latency(source, fps=args.fps, frames=args.frames, warmup=args.warmup_frames,
                         baseline_frames=args.baseline_frames, repeats=args.repeats,
                         config=args.config, roi_px=args.baseline_roi)
    summary = report["summary"]
    print(table(summary))
    for target in TARGETS:
        if target in summary:
            s = summary[target]
            print(f"{target}: dropped {s['dropped']}, rejected {s['rejected_total']}, gaps "
                  f"{s['gaps']}, results missing {s['missing_results']}, sender "
                  f"{s['sender_fps']:.1f} fps (max lag {s['sender_max_lag_s'] * 1e3:.1f} ms)")
    write_json(report, args.json)
    print(f"wrote {args.json}", file=sys.stderr)
    if args.plot is not None:
        print(f"wrote {plot_latency(report, args.plot)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
