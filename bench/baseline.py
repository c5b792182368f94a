"""The baseline: the live loop a beamline scientist writes without txmlive.

One thread, one loop, the obvious numpy: receive a frame from a pyzmq PULL socket (msgpack
header, ``np.frombuffer`` on a copied payload, as pyzmq gives it by default), keep the mean of
the darks and flats received so far as references, correct data frames with
``(raw - dark) / (flat - dark)`` in float64, take the radial PSD of the central ROI with
``np.fft.fft2`` and a Python loop over the radial bins, and publish one msgpack result per
frame on a PUB socket, in the same message shape as ``txmlive run`` (``seq``, ``t_ns``,
``stamps``, ``latency_ms``, ``counters``) so the same harness measures both.

It is a generous baseline: the bin index arrays are computed once per ROI shape (a loop over
boolean masks ``power[r == i]`` per frame is ~5x slower at 512²), and it computes less than
the product (no focus scores, shift, beam metrics, cut-off search, previews).

Run ``python -m bench.baseline --connect URL --results URL [--roi 512] [--json]``; it prints
``ready`` on stderr once bound and stops at an ``end`` frame or on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from typing import Any

import msgpack
import numpy as np
import zmq

ROI_PX = 512
"""Side of the central ROI whose PSD the baseline computes (the product's default ROI)."""

RCVHWM = 64
"""Receive high-water mark, messages (the product's default ``[ingest] rcvhwm``)."""


def central_roi(image: np.ndarray, side_px: int = ROI_PX) -> np.ndarray:
    """The central ``side_px × side_px`` view of ``image`` (clipped to the image).

    Parameters
    ----------
    image : ndarray, shape (rows, cols)
    side_px : int
        Wanted side of the ROI, px (>= 1).

    Returns
    -------
    ndarray, shape (min(rows, side_px), min(cols, side_px))
        A view, no copy.
    """
    if image.ndim != 2:
        raise ValueError(f"image must be 2-D (rows, cols), got shape {image.shape}")
    if side_px < 1:
        raise ValueError(f"side_px must be >= 1, got {side_px}")
    rows, cols = image.shape
    h, w = min(rows, side_px), min(cols, side_px)
    y0, x0 = (rows - h) // 2, (cols - w) // 2
    return image[y0:y0 + h, x0:x0 + w]


def radial_bins(shape: tuple[int, int]) -> list[np.ndarray]:
    """Flat indices of each radial bin of an ``fftshift``-ed spectrum of ``shape``.

    Returns
    -------
    list of ndarray of int
        Entry ``i`` holds the pixels at radius ``round(r) == i + 1`` px from the centre, for
        ``i + 1 = 1 … min(shape) // 2`` (DC excluded).
    """
    h, w = shape
    if min(h, w) < 2:
        raise ValueError(f"shape must be at least 2 x 2, got {shape}")
    y, x = np.indices(shape)
    radius = np.rint(np.hypot(y - h // 2, x - w // 2)).astype(int).ravel()
    return [np.flatnonzero(radius == i) for i in range(1, min(h, w) // 2 + 1)]


def numpy_psd(roi: np.ndarray, bins: list[np.ndarray]) -> np.ndarray:
    """Radial PSD the plain way: ``|fft2(roi − mean)|²`` averaged per radial bin in Python.

    Parameters
    ----------
    roi : ndarray, shape (rows, cols)
    bins : list of ndarray
        :func:`radial_bins` of ``roi.shape``.

    Returns
    -------
    ndarray of float64, shape (len(bins),)
        Mean power per bin, counts² per pixel.
    """
    img = roi - roi.mean()
    power = np.abs(np.fft.fftshift(np.fft.fft2(img))) ** 2 / img.size
    flat = power.ravel()
    return np.array([flat[idx].mean() for idx in bins])


def numpy_correct(raw: np.ndarray, dark: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """``(raw - dark) / (flat - dark)``, exactly as written (float64 result)."""
    return (raw - dark) / (flat - dark)


class BaselineProcessor:
    """References and per-frame work of the baseline, without the sockets.

    Parameters
    ----------
    roi_px : int
        Side of the central ROI for the PSD.
    """

    def __init__(self, roi_px: int = ROI_PX):
        self.roi_px = roi_px
        self.darks: list[np.ndarray] = []
        self.flats: list[np.ndarray] = []
        self.dark: np.ndarray | None = None
        self.flat: np.ndarray | None = None
        self._bins: dict[tuple[int, int], list[np.ndarray]] = {}

    def add_reference(self, kind: str, image: np.ndarray) -> None:
        """Add a dark or flat; the reference is the mean of all received so far."""
        if kind == "dark":
            self.darks.append(image.astype(np.float64))
            self.dark = np.mean(self.darks, axis=0)
        elif kind == "flat":
            self.flats.append(image.astype(np.float64))
            self.flat = np.mean(self.flats, axis=0)
        else:
            raise ValueError(f"kind must be 'dark' or 'flat', got {kind!r}")

    def correct(self, image: np.ndarray) -> tuple[np.ndarray, bool]:
        """Corrected frame and whether references were there to correct it."""
        if (self.dark is None or self.flat is None or self.dark.shape != image.shape
                or self.flat.shape != image.shape):
            return image.astype(np.float64), False
        with np.errstate(divide="ignore", invalid="ignore"):
            return numpy_correct(image, self.dark, self.flat), True

    def psd(self, image: np.ndarray) -> np.ndarray:
        """Radial PSD of the central ROI of ``image``."""
        roi = central_roi(image, self.roi_px)
        bins = self._bins.get(roi.shape)
        if bins is None:
            bins = self._bins[roi.shape] = radial_bins(roi.shape)
        return numpy_psd(roi, bins)


def _decode(parts: list[bytes]) -> tuple[dict[str, Any], np.ndarray]:
    header = msgpack.unpackb(parts[0], raw=False)
    if header["kind"] == "end":
        return header, np.empty((0, 0), np.uint16)
    image = np.frombuffer(parts[1], dtype=header["dtype"]).reshape(header["shape"])
    return header, image


def serve(connect: str, results: str, *, roi_px: int = ROI_PX, rcvhwm: int = RCVHWM,
          stop: threading.Event | None = None, ready: Any = None) -> dict[str, Any]:
    """Receive, correct, PSD and publish until an ``end`` frame or ``stop``.

    Parameters
    ----------
    connect : str
        Frames endpoint (PULL connects).
    results : str
        Results endpoint (PUB binds).
    roi_px : int
        Side of the central ROI for the PSD.
    rcvhwm : int
        Receive high-water mark, messages.
    stop : threading.Event, optional
        Set to stop; noticed within 0.1 s.
    ready : callable, optional
        Called once the sockets are up.

    Returns
    -------
    dict
        ``frames`` (processed), ``duration_s``, ``fps``, ``latency_ms`` (p50/p90/p99/max)
        and ``counters`` (``received``, ``processed``, ``rejected_total``, ``gaps``,
        ``dropped`` (always 0: nothing is dropped, a slow loop backs the sender up),
        ``uncorrected``).
    """
    stop = stop or threading.Event()
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, rcvhwm)
    pull.setsockopt(zmq.LINGER, 0)
    pull.connect(connect)
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 10000)
    pub.setsockopt(zmq.LINGER, 500)
    pub.bind(results)
    proc = BaselineProcessor(roi_px)
    counters = {"received": 0, "processed": 0, "rejected_total": 0, "gaps": 0, "dropped": 0,
                "uncorrected": 0}
    last_seq: dict[Any, int] = {}
    latencies_ms: list[float] = []
    t_first = t_last = 0.0
    if ready is not None:
        ready()
    try:
        while not stop.is_set():
            if not pull.poll(100):
                continue
            parts = pull.recv_multipart()
            t_recv = time.monotonic_ns()
            try:
                header, image = _decode(parts)
            except Exception:  # anything unreadable is counted and skipped
                counters["rejected_total"] += 1
                continue
            counters["received"] += 1
            kind = header["kind"]
            if kind == "end":
                break
            series, seq = header.get("series"), header["seq"]
            if series in last_seq and seq > last_seq[series] + 1:
                counters["gaps"] += seq - last_seq[series] - 1
            last_seq[series] = seq
            if kind in ("dark", "flat"):
                proc.add_reference(kind, image)
                continue
            if not t_first:
                t_first = time.monotonic()
            corrected, ok = proc.correct(image)
            t_correct = time.monotonic_ns()
            psd = proc.psd(corrected)
            t_metrics = time.monotonic_ns()
            counters["processed"] += 1
            counters["uncorrected"] += not ok
            result = {
                "v": 1, "type": "result", "seq": seq, "seq_first": seq, "seq_last": seq,
                "n_frames": 1, "series": series, "t_ns": header["t_ns"], "corrected": ok,
                "metrics": {"mean": float(np.nanmean(corrected)),
                            "psd_low": float(psd[: len(psd) // 4].mean())},
                "counters": dict(counters),
                "stamps": {"recv": t_recv, "correct": t_correct, "metrics": t_metrics},
            }
            result["stamps"]["publish"] = time.monotonic_ns()
            result["latency_ms"] = (time.time_ns() - header["t_ns"]) / 1e6
            pub.send(msgpack.packb(result, use_bin_type=True))
            latencies_ms.append(result["latency_ms"])
            t_last = time.monotonic()
    finally:
        pull.close()
        pub.close()
        ctx.term()
    duration_s = t_last - t_first
    lat = np.asarray(latencies_ms)
    return {
        "frames": counters["processed"], "duration_s": duration_s,
        "fps": counters["processed"] / duration_s if duration_s > 0 else 0.0,
        "latency_ms": _percentiles(lat), "counters": counters,
    }


def _percentiles(values: np.ndarray) -> dict[str, float | None]:
    if values.size == 0:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(values.max())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--connect", required=True, metavar="URL", help="frames (PULL connects)")
    parser.add_argument("--results", required=True, metavar="URL", help="results (PUB binds)")
    parser.add_argument("--roi", type=int, default=ROI_PX, metavar="PX",
                        help="side of the central PSD ROI, px")
    parser.add_argument("--json", action="store_true", help="print a JSON summary at exit")
    args = parser.parse_args(argv)
    if args.roi < 2:
        parser.error("--roi must be >= 2")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    summary = serve(args.connect, args.results, roi_px=args.roi, stop=stop,
                    ready=lambda: print(f"baseline: ready; frames <- {args.connect}, results -> "
                                        f"{args.results}", file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
