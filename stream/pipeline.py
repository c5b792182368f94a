"""The pipeline runtime: receive → bounded queue → correct/average → metrics → publish.

Threads and their hand-offs (see DESIGN.md, "Runtime"):

- receiver: ``source.recv`` → stamp ``recv`` → sequence-gap bookkeeping → ingest queue
  (:class:`~stream.queues.BoundedQueue`, policy from config: ``block`` or ``drop-oldest``);
- processing (the hot path): references update on dark/flat frames; data frames go through the
  fused correction + averaging kernel (:class:`~stream.correct.Corrector`); each result goes on
  to the metrics stage, a preview (at most ``[preview] max_rate_hz``) to the publisher's
  keep-latest slot, and the processed frame to the recorder (never-drop queue);
- metrics stage (:class:`_MetricsStage`): beam metrics of the raw frame and ROI metrics of the
  corrected ROI, in frame order, on the newest frame when it cannot keep up (results say which
  frame their metrics describe);
- publisher (:class:`~stream.publish.Publisher`): sends results and previews, and hands results
  to in-process listeners (PV server, feedback);
- the caller's thread: status lines and the stop signal.

Every counter (received, processed, dropped, rejected by reason, sequence gaps, uncorrected,
metrics skipped) travels in each result and in the run summary, so nothing is lost silently.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from stream.beam import bin_image
from stream.correct import Corrector, Processed, References
from stream.frame import Frame
from stream.metrics import METRIC_KEYS, roi_slices
from stream.publish import MESSAGE_VERSION, Publisher
from stream.queues import BoundedQueue, Closed
from stream.recorder import Recorder, RecorderError
from stream.source import Source

if TYPE_CHECKING:
    from stream.metrics import MetricsEngine

log = logging.getLogger(__name__)

STATUS_WINDOW_S = 5.0
"""Live fps and latency percentiles describe the last few seconds, not the whole run."""


def percentiles_ms(values: list[float] | np.ndarray) -> dict[str, float | None]:
    """p50/p90/p99/max of latencies in ms (None when there are none)."""
    if len(values) == 0:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    arr = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(arr.max())}


class _SeqTracker:
    """Counts missing sequence numbers per series; a seq going backwards starts a new run."""

    def __init__(self) -> None:
        self.last: dict[str | None, int] = {}
        self.gaps = 0
        self.resets = 0

    def see(self, frame: Frame) -> None:
        last = self.last.get(frame.series)
        if last is not None:
            if frame.seq > last + 1:
                self.gaps += frame.seq - last - 1
            elif frame.seq <= last:
                self.resets += 1
        self.last[frame.series] = frame.seq


class _PreviewBuffers:
    """A few preallocated preview images per shape, handed to the publisher and given back."""

    def __init__(self, count: int = 2):
        self._count = count
        self._free: dict[tuple[int, int], list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, int]) -> np.ndarray | None:
        with self._lock:
            free = self._free.setdefault(
                shape, [np.empty(shape, np.float32) for _ in range(self._count)])
            return free.pop() if free else None

    def give(self, image: np.ndarray) -> None:
        with self._lock:
            self._free[image.shape].append(image)


class _NewestFrame:
    """The newest data frame's raw image and a copy of its ROI, for the metrics stage.

    The processing thread offers every frame; the stage takes it only if it is still the
    newest when that frame's result comes up. The raw image is the received buffer itself (a
    reference keeps it alive, no copy); the ROI of the corrected image is copied into one of a
    few reused buffers because the corrected image's buffer is reused for the next frame.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._newest: tuple[int, np.ndarray, np.ndarray, float | None] | None = None
        self._free: list[np.ndarray] = []

    def offer(self, seq: int, raw: np.ndarray, roi: np.ndarray, pixel_nm: float | None) -> None:
        with self._lock:
            buf = self._free.pop() if self._free else None
        if buf is None or buf.shape != roi.shape or buf.dtype != roi.dtype:
            buf = np.empty(roi.shape, roi.dtype)
        np.copyto(buf, roi)
        with self._lock:
            if self._newest is not None:
                self._free.append(self._newest[2])
            self._newest = (seq, raw, buf, pixel_nm)

    def take(self, seq: int) -> tuple[np.ndarray, np.ndarray, float | None] | None:
        """(raw, ROI copy, pixel size) of frame ``seq`` if it is the newest offered."""
        with self._lock:
            if self._newest is None or self._newest[0] != seq:
                return None
            _, raw, buf, pixel_nm = self._newest
            self._newest = None
            return raw, buf, pixel_nm

    def give_back(self, buf: np.ndarray) -> None:
        with self._lock:
            self._free.append(buf)


class _MetricsStage:
    """All metrics, between processing and publishing, in frame order, off the hot path.

    Results pass through this thread in order. A data result whose frame is still the newest
    gets its own metrics (``metrics_seq == seq``): frame-wide beam metrics on the raw frame
    (:meth:`MetricsEngine.cheap`) and ROI metrics on the corrected ROI
    (:meth:`MetricsEngine.expensive_roi`). When the stage is behind, the older results pass at
    once with the last measured values and say which frame those describe (``metrics_seq``,
    ``metrics_t_ns``), so the stage catches up on the newest frame and the processing thread
    never waits for it. Dark/flat results get the raw frame-wide metrics of their own frame
    (each flat counts for shaker tuning) unless the stage is behind.
    """

    BEHIND = 2
    """Queued results beyond which a reference frame's metrics are skipped."""

    def __init__(self, engine: MetricsEngine, publisher: Publisher):
        self._engine = engine
        self._publisher = publisher
        self.newest = _NewestFrame()
        self.results: BoundedQueue[tuple[dict[str, Any], Frame | None]] = BoundedQueue(
            100_000, "block")
        self._lock = threading.Lock()
        # Until the first measurement every metric reads None ("not available").
        self._latest: tuple[int | None, int | None, dict[str, Any], dict[str, Any] | None] = (
            None, None, dict.fromkeys(METRIC_KEYS), None)
        self._thread = threading.Thread(target=self._run, name="txmlive-metrics", daemon=True)
        self.computed = 0
        self.skipped = 0
        self.errors = 0

    def start(self) -> None:
        self._thread.start()

    def latest(self) -> tuple[int | None, dict[str, Any], dict[str, Any] | None]:
        """(seq described, metrics, radial PSD curve) of the newest measurement."""
        with self._lock:
            seq, _, values, curve = self._latest
            return seq, values, curve

    def _measure(self, result: dict[str, Any]) -> None:
        item = self.newest.take(result["seq"])
        if item is None:
            self.skipped += 1
            return
        raw, roi, pixel_nm = item
        try:
            values = self._engine.cheap(raw, pixel_nm)
            values.update(self._engine.expensive_roi(roi, pixel_nm, with_curve=True))
        except Exception:  # a metric failure must never stop the pipeline
            log.exception("metrics failed on frame %d", result["seq"])
            self.errors += 1
            return
        finally:
            self.newest.give_back(roi)
        curve = values.pop("psd_curve")
        with self._lock:
            self._latest = (result["seq"], result["t_ns"], values, curve)
        self.computed += 1

    def _measure_reference(self, result: dict[str, Any], frame: Frame) -> None:
        if len(self.results) > self.BEHIND:
            result["flags"].append("metrics skipped: the metrics stage is behind")
            self.skipped += 1
            return
        try:
            result["metrics"] = self._engine.cheap(frame.image, result["pixel_nm"])
        except Exception:
            log.exception("metrics failed on %s frame %d", frame.kind, frame.seq)
            self.errors += 1
            return
        result["metrics_seq"], result["metrics_t_ns"] = result["seq"], result["t_ns"]

    def _run(self) -> None:
        while True:
            try:
                item = self.results.get(timeout=0.1)
            except Closed:
                break
            if item is None:
                continue
            result, frame = item
            if frame is not None:
                self._measure_reference(result, frame)
            else:
                self._measure(result)
                with self._lock:
                    seq, t_ns, values, _ = self._latest
                result["metrics"].update(values)
                result["metrics_seq"], result["metrics_t_ns"] = seq, t_ns
            result["stamps"]["metrics"] = time.monotonic_ns()
            self._publisher.results.put(result)

    def close(self, timeout: float = 10.0) -> None:
        """Pass every queued result on, then stop."""
        self.results.close()
        self._thread.join(timeout)


class Pipeline:
    """Configure once, then :meth:`run` until the stream ends, ``max_frames`` or ``stop``.

    Parameters
    ----------
    source : Source
        Where frames come from (:class:`~stream.source.ZmqSource`, ...).
    publisher : Publisher
        Owns the results/preview sockets.
    config : txmlive.config.Config-like
        Needs the ``ingest``, ``correction``, ``averaging``, ``preview`` and ``status``
        sections (duck-typed so ``stream`` does not import the composition root).
    metrics : MetricsEngine or None
        Metrics computed per frame (cheap) and on the newest frame (expensive).
    recorder : Recorder or None
        Receives every processed frame and the references it used.
    max_frames : int or None
        Stop after this many data frames were processed.
    on_status : callable or None
        Called with a status dict about once per ``[status] interval_s``.
    """

    def __init__(self, source: Source, publisher: Publisher, config: Any, *,
                 metrics: MetricsEngine | None = None, recorder: Recorder | None = None,
                 max_frames: int | None = None,
                 on_status: Callable[[dict[str, Any]], None] | None = None,
                 on_result: Callable[[dict[str, Any], Processed], None] | None = None):
        self.source = source
        self.publisher = publisher
        self.config = config
        self.metrics = metrics
        self.recorder = recorder
        self.max_frames = max_frames
        self.on_status = on_status
        self.on_result = on_result
        self.references = References(config.correction.reference_frames,
                                     config.correction.min_denominator)
        self.corrector = Corrector(self.references, average_frames=config.averaging.frames,
                                   enabled=config.correction.enabled)
        self.queue: BoundedQueue[Frame] = BoundedQueue(config.ingest.queue_frames,
                                                       config.ingest.queue_policy)
        self._stage = _MetricsStage(metrics, publisher) if metrics is not None else None
        self._seq = _SeqTracker()
        self._previews = _PreviewBuffers()
        self._next_preview = 0.0
        self._recorded_refs: set[int] = set()
        self._stop = threading.Event()
        self._ended = threading.Event()
        self.counters: dict[str, Any] = {
            "processed": 0, "results": 0, "darks": 0, "flats": 0, "ends": 0,
            "previews": 0, "unprocessed_at_exit": 0, "metrics_errors": 0,
        }
        self.loop_status: dict[str, Any] = {}
        """Feedback loop states (``af_state``, ``beamfb_state`` ...) shown in previews; other
        threads replace values, the processing thread copies it per preview."""
        self._t_first: float | None = None
        self._result_times: deque[float] = deque(maxlen=4096)
        self._t_last: float | None = None
        self._errors: list[str] = []

    # -- counters ---------------------------------------------------------------------------
    def snapshot_counters(self) -> dict[str, Any]:
        """All counters of every stage, as one JSON-able dict."""
        src = self.source.counters
        out = dict(self.counters)
        out.update({
            "received": src["received"],
            "rejected": dict(src["rejected"]),
            "rejected_total": sum(src["rejected"].values()),
            "dropped": self.queue.dropped,
            "queue_depth": len(self.queue),
            "queue_max_depth": self.queue.max_depth,
            "gaps": self._seq.gaps,
            "seq_resets": self._seq.resets,
            "uncorrected": self.corrector.counters["uncorrected"],
            "results_dropped": self.publisher.results.dropped,
        })
        if self._stage is not None:
            out["metrics_skipped"] = self._stage.skipped
            out["metrics_errors"] += self._stage.errors
        if self.recorder is not None:
            rc = self.recorder.counters
            out["recorder_backlog"] = rc["backlog"]
            out["recorder_written"] = rc["written"]
        return out

    # -- threads ----------------------------------------------------------------------------
    def _receive(self) -> None:
        try:
            while not self._stop.is_set():
                frame = self.source.recv(0.1)
                if frame is None:
                    continue
                frame.stamp("recv")
                if frame.kind != "end":
                    self._seq.see(frame)
                self.queue.put(frame, self._stop)
                if frame.kind == "end":
                    break
        except Exception as exc:  # report, then let processing drain what was accepted
            log.exception("receiver failed")
            self._errors.append(f"receiver: {exc}")
        finally:
            self.queue.close()

    def _process_loop(self) -> None:
        try:
            while True:
                try:
                    frame = self.queue.get(timeout=0.1)
                except Closed:
                    break
                if frame is None:
                    continue
                if self._reached_max():
                    self.counters["unprocessed_at_exit"] += 1
                    continue
                self._process(frame)
            if not self._reached_max():
                for block in self.corrector.flush():
                    self._emit(block)
        except Exception as exc:
            log.exception("processing failed")
            self._errors.append(f"processing: {exc}")
            self._stop.set()
        finally:
            self._ended.set()

    def _reached_max(self) -> bool:
        return self.max_frames is not None and self.counters["processed"] >= self.max_frames

    # -- processing -------------------------------------------------------------------------
    def _process(self, frame: Frame) -> None:
        frame.stamp("dequeue")
        if self._t_first is None:
            self._t_first = time.monotonic()
        if frame.kind == "data":
            self.counters["processed"] += 1
            for block in self.corrector.push(frame):
                self._emit(block)
            if self._reached_max():
                for block in self.corrector.flush():
                    self._emit(block)
                self._stop.set()
        elif frame.kind in ("dark", "flat"):
            self.references.add(frame)
            self.counters["darks" if frame.kind == "dark" else "flats"] += 1
            self._emit_reference(frame)
        else:  # end of series: emit the partial block, then stop
            self.counters["ends"] += 1
            for block in self.corrector.flush():
                self._emit(block)
            self._stop.set()

    def _pixel_nm(self, frame: Frame) -> float | None:
        pixel_nm = frame.attrs.get("pixel_nm")
        if isinstance(pixel_nm, int | float) and pixel_nm > 0:
            return float(pixel_nm)
        if self.metrics is not None:
            return self.metrics.config.pixel_nm
        return None

    def _result(self, frame: Frame, pixel_nm: float | None, metrics: dict[str, Any],
                flags: list[str], **block: Any) -> dict[str, Any]:
        return {
            "v": MESSAGE_VERSION, "type": "result", "kind": frame.kind,
            "seq": block.get("seq_last", frame.seq), "seq_first": block.get("seq_first", frame.seq),
            "seq_last": block.get("seq_last", frame.seq), "n_frames": block.get("n_frames", 1),
            "series": frame.series, "t_ns": frame.t_ns, "energy_ev": frame.energy_ev,
            "exposure_s": frame.exposure_s, "positions": dict(frame.positions),
            "moving": frame.moving, "pixel_nm": pixel_nm,
            "corrected": block.get("corrected", False),
            "reference_id": block.get("reference_id"), "flags": flags, "metrics": metrics,
            "metrics_seq": None, "metrics_t_ns": None, "counters": self.snapshot_counters(),
            "stamps": dict(frame.stamps),
        }

    def _emit_reference(self, frame: Frame) -> None:
        """A result for a dark or flat frame: the metrics stage adds its raw frame-wide
        metrics (flat uniformity for shaker tuning, counts for beam checks)."""
        result = self._result(frame, self._pixel_nm(frame), {}, [])
        if self._stage is not None:  # through the stage, so results stay in frame order
            self._stage.results.put((result, frame))
        else:
            self.publisher.results.put(result)

    def _emit(self, block: Processed) -> None:
        frame = block.frame
        pixel_nm = self._pixel_nm(frame)
        flags = list(block.flags)
        if self._stage is not None:
            try:
                roi = self.metrics.roi_view(block.image)
            except ValueError as exc:  # e.g. a frame smaller than the configured ROI
                flags.append(f"no metrics: {exc}")
                self.counters["metrics_errors"] += 1
            else:
                # Beam metrics use the RAW frame: flat correction would divide out the
                # illumination the beam and shaker loops act on (for a block: its last frame).
                self._stage.newest.offer(block.seq_last, frame.image, roi, pixel_nm)
        result = self._result(frame, pixel_nm, {}, flags, seq_first=block.seq_first,
                              seq_last=block.seq_last, n_frames=block.n_frames,
                              corrected=block.corrected, reference_id=block.reference_id)
        self.counters["results"] += 1
        self._t_last = time.monotonic()
        self._result_times.append(self._t_last)
        # The preview is built now, from the newest metrics; the result goes on to the metrics
        # stage, which adds to it, so it is not touched here afterwards.
        self._maybe_preview(block, result, pixel_nm)
        if self._stage is not None:
            self._stage.results.put((result, None))
        else:
            self.publisher.results.put(result)
        if self.recorder is not None:
            self._record(block)
        if self.on_result is not None:
            try:
                self.on_result(result, block)
            except Exception:  # a consumer's bug must not stop processing
                log.exception("on_result callback failed")

    def _record(self, block: Processed) -> None:
        frame = block.frame
        meta = {
            "seq": block.seq_last, "t_ns": frame.t_ns, "energy_ev": frame.energy_ev,
            "exposure_s": frame.exposure_s, "positions": frame.positions, "moving": frame.moving,
            "seq_first": block.seq_first, "seq_last": block.seq_last, "n_frames": block.n_frames,
            "reference_id": -1 if block.reference_id is None else block.reference_id,
            "flags": block.flags,
        }
        if block.reference_id is not None and block.reference_id not in self._recorded_refs:
            pair = self.references.by_id(block.reference_id)
            ref_meta = dict(meta, seq=block.seq_first, reference_id=block.reference_id, flags=[])
            self.recorder.submit("dark", pair.dark, ref_meta)
            self.recorder.submit("flat", pair.flat, ref_meta)
            self._recorded_refs.add(block.reference_id)
        self.recorder.submit("data", block.image, meta)

    def _maybe_preview(self, block: Processed, result: dict[str, Any],
                       pixel_nm: float | None) -> None:
        now = time.monotonic()
        rate = self.config.preview.max_rate_hz
        if rate <= 0 or now < self._next_preview:
            return
        factor = self.config.preview.bin
        rows, cols = block.image.shape
        shape = (max(rows // factor, 1), max(cols // factor, 1))
        buf = self._previews.take(shape)
        if buf is None:  # both buffers still with the publisher: skip, the next one comes soon
            return
        bin_image(block.image, factor, out=buf)
        self._next_preview = now + 1.0 / rate
        metrics: dict[str, Any] = {}
        curve = None
        if self._stage is not None:
            metrics_seq, values, curve = self._stage.latest()
            metrics.update(values, metrics_seq=metrics_seq)
        if curve is not None:
            metrics.update(psd_freqs_per_um=curve["freqs_per_um"], psd=curve["psd"],
                           psd_floor=curve["floor"])
        if self.metrics is not None and metrics:
            rows_sl, cols_sl = roi_slices(self.metrics.config.roi, block.image.shape)
            metrics["metrics_roi"] = [rows_sl.start, cols_sl.start, rows_sl.stop - rows_sl.start,
                                      cols_sl.stop - cols_sl.start]
        message = {
            "v": MESSAGE_VERSION, "type": "preview", "seq": result["seq"], "t_ns": result["t_ns"],
            "shape": list(shape), "dtype": buf.dtype.str, "bin": factor,
            "pixel_nm": None if pixel_nm is None else pixel_nm * factor,
            "metrics": metrics, "counters": result["counters"],
            "status": {**self.status(), **dict(self.loop_status)},
        }
        self.publisher.submit_preview(message, buf, self._previews.give)
        self.counters["previews"] += 1

    # -- status and run ---------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Live status: fps and latency percentiles over the last :data:`STATUS_WINDOW_S`."""
        now = time.monotonic()
        times = [t for t in self._result_times if now - t <= STATUS_WINDOW_S]
        fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
        # Latencies of about as many results as the window held (the publisher lags a little).
        lat = self.publisher.latencies_ms[-max(len(times), 1):]
        return {"fps": fps, "latency_ms": percentiles_ms(lat)}

    def run(self, stop: threading.Event | None = None) -> dict[str, Any]:
        """Run until the stream ends, ``max_frames`` is reached or ``stop`` is set."""
        stop = stop or threading.Event()
        self.publisher.start()
        if self._stage is not None:
            self._stage.start()
        receiver = threading.Thread(target=self._receive, name="txmlive-recv", daemon=True)
        processor = threading.Thread(target=self._process_loop, name="txmlive-process",
                                     daemon=True)
        receiver.start()
        processor.start()
        interval = self.config.status.interval_s
        last_status = time.monotonic()
        last_processed = 0
        while not self._ended.wait(0.05):
            if stop.is_set():
                self._stop.set()
            now = time.monotonic()
            if self.on_status is not None and now - last_status >= interval:
                processed = self.counters["processed"]
                status = self.status()
                status["fps_now"] = (processed - last_processed) / (now - last_status)
                status["counters"] = self.snapshot_counters()
                self.on_status(status)
                last_status, last_processed = now, processed
        self._stop.set()
        receiver.join(5.0)
        processor.join(5.0)
        if self._stage is not None:
            self._stage.close()
        self.publisher.close()
        summary = self.summary()
        if self.recorder is not None:
            try:
                summary["recorder"] = self.recorder.close()
            except RecorderError as exc:  # report it with what was written, don't lose it
                summary["recorder"] = exc.summary
                summary["errors"].append(f"recorder: {exc}")
        return summary

    def summary(self) -> dict[str, Any]:
        elapsed = (self._t_last or 0) - (self._t_first or 0)
        processed = self.counters["processed"]
        return {
            "frames": processed,
            "results": self.counters["results"],
            "duration_s": elapsed,
            "fps": processed / elapsed if elapsed > 0 else 0.0,
            "latency_ms": percentiles_ms(self.publisher.latencies_ms),
            "counters": self.snapshot_counters(),
            "errors": list(self._errors),
        }
