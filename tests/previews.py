"""A recorded-like preview sequence for the viewer tests: star + noise images and known metrics.

Each message is built as the pipeline builds it (``stream.pipeline._maybe_preview``) plus the
PSD curve keys the viewer draws, then sent through the real msgpack codec, so the tests see
exactly what a subscriber decodes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from stream.publish import MESSAGE_VERSION, decode_message, encode_message

PSD_FLOOR = 1e-3
"""Noise floor of the synthetic PSD, PSD units."""


def star_image(shape: tuple[int, int] = (128, 128), *, n_spokes: int = 24,
               centre_px: tuple[float, float] | None = None, noise: float = 0.05,
               seed: int = 0) -> np.ndarray:
    """Siemens-star-like transmission (0.3/1.0 sectors) with Gaussian noise, float32."""
    rows, cols = shape
    cy, cx = centre_px if centre_px is not None else ((rows - 1) / 2, (cols - 1) / 2)
    y, x = np.mgrid[:rows, :cols]
    sector = np.floor(np.arctan2(y - cy, x - cx) * n_spokes / np.pi).astype(int)
    r = np.hypot(y - cy, x - cx)
    image = np.where((sector % 2 == 0) & (r < 0.45 * min(shape)), 0.3, 1.0)
    rng = np.random.default_rng(seed)
    return (image + rng.normal(0.0, noise, shape)).astype(np.float32)


def psd_curve(cutoff_per_um: float, n: int = 150,
              nyquist_per_um: float = 50.0) -> tuple[list[float], list[float]]:
    """Gaussian signal spectrum plus a flat floor; signal = floor at ``cutoff_per_um``."""
    f = np.linspace(nyquist_per_um / n, nyquist_per_um, n)
    # A·exp(-(f/f0)²) = PSD_FLOOR at f = cutoff with A = 1e3·floor → f0 = cutoff/√ln(1e3).
    f0 = cutoff_per_um / math.sqrt(math.log(1e3))
    psd = 1e3 * PSD_FLOOR * np.exp(-((f / f0) ** 2)) + PSD_FLOOR
    return f.tolist(), psd.tolist()


def preview_message(seq: int, *, shape: tuple[int, int] = (128, 128), bin_factor: int = 4,
                    pixel_nm: float = 10.0, t_ns: int | None = None,
                    image: np.ndarray | None = None, counters: dict[str, Any] | None = None,
                    status: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
                    with_psd: bool = True, seed: int = 0) -> dict[str, Any]:
    """One decoded preview message (encoded and decoded through :mod:`stream.publish`).

    ``pixel_nm`` is the full-frame pixel; the message carries ``pixel_nm × bin_factor`` as the
    pipeline does. ``metrics``/``counters``/``status`` entries override the defaults.
    """
    img = star_image(shape, seed=seed) if image is None else np.ascontiguousarray(image)
    full_rows, full_cols = shape[0] * bin_factor, shape[1] * bin_factor
    cutoff = 20.0 + 0.1 * (seq % 100)  # stays well inside the 50 µm⁻¹ Nyquist
    base_metrics: dict[str, Any] = {
        "normalized_variance": 0.05 + 0.001 * seq, "brenner": 1.0, "tenengrad": 2.0,
        "vollath_f4": 0.5,
        "centroid_x_px": 0.5 * (full_cols - 1) + 10.0, "centroid_y_px": 0.5 * (full_rows - 1) - 6.0,
        "centroid_x_um": 0.1, "centroid_y_um": -0.06,
        "total_counts": 1e6, "mean_counts": 1e3, "uniformity_cv": 0.1,
        "shift_x_px": 0.1, "shift_y_px": -0.1, "vibration_nm": 12.0 + 0.1 * seq,
        "cutoff_per_um": cutoff, "resolution_nm": 1e3 / (2 * cutoff), "resolution_err_nm": 0.8,
        "cutoff_x_per_um": cutoff, "cutoff_y_per_um": cutoff, "band_power": 3.0,
        "na_fill": 0.9, "psd_verdict": "resolved",
        "metrics_roi": [full_rows // 4, full_cols // 4, full_rows // 2, full_cols // 2],
    }
    if with_psd:
        freqs, psd = psd_curve(cutoff)
        base_metrics.update(psd_freqs_per_um=freqs, psd=psd, psd_floor=PSD_FLOOR)
    base_metrics.update(metrics or {})
    base_counters: dict[str, Any] = {
        "processed": seq + 1, "received": seq + 1, "dropped": 0, "rejected": {},
        "rejected_total": 0, "gaps": 0, "queue_depth": 0,
    }
    base_counters.update(counters or {})
    base_status: dict[str, Any] = {
        "fps": 50.0, "latency_ms": {"p50": 3.0, "p90": 5.0, "p99": 9.0, "max": 12.0},
    }
    base_status.update(status or {})
    message = {
        "v": MESSAGE_VERSION, "type": "preview", "seq": seq,
        "t_ns": 1_700_000_000_000_000_000 + seq * 100_000_000 if t_ns is None else t_ns,
        "shape": list(img.shape), "dtype": img.dtype.str, "bin": bin_factor,
        "pixel_nm": pixel_nm * bin_factor, "image": img.tobytes(), "metrics": base_metrics,
        "counters": base_counters, "status": base_status,
    }
    return decode_message(encode_message(message), "preview")


def preview_sequence(n: int = 20, **kwargs: Any) -> list[dict[str, Any]]:
    """``n`` previews with seq 0..n-1, 0.1 s apart, metrics drifting slowly with seq."""
    return [preview_message(seq, seed=seq, **kwargs) for seq in range(n)]
