"""Synthesized TXM-like frame series, for the demo, tests and benchmarks without a beamline.

The frames look like a TXM field: a Gaussian condenser spot (flat), a detector offset with
read noise (dark), and an absorbing test pattern (transmission exp(-μt)) under the spot
(data), with Poisson statistics. Generating Poisson noise for 2048² frames is slow, so a
series cycles through a few pre-generated noisy frames (``unique`` of each kind) — fine for
throughput and latency, which do not depend on the pixel values.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from stream.frame import Frame


def _pattern(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Thickness-like map in [0, 1]: bars and discs at several scales."""
    rows, cols = shape
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    period = max(rows // 16, 4)
    bars = (np.sin(2 * np.pi * x / period) > 0).astype(np.float32) * (y < rows / 2)
    discs = np.zeros(shape, np.float32)
    for _ in range(12):
        cy, cx = rng.uniform(0, rows), rng.uniform(0, cols)
        r = rng.uniform(0.02, 0.1) * min(rows, cols)
        discs[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = 1.0
    return np.clip(bars + discs, 0, 1)


def synthetic_frames(shape: tuple[int, int] = (512, 512), n_data: int = 100, *,
                     n_dark: int = 5, n_flat: int = 5, unique: int = 4,
                     flux_counts: float = 5000.0, dark_counts: float = 100.0,
                     read_noise_counts: float = 2.0, energy_ev: float = 8000.0,
                     exposure_s: float = 0.01, pixel_nm: float = 10.0, seed: int = 0,
                     series: str | None = "synthetic") -> Iterator[Frame]:
    """Yield ``n_dark`` darks, ``n_flat`` flats, then ``n_data`` data frames (uint16).

    Parameters
    ----------
    shape : (rows, cols)
        Frame shape, px.
    flux_counts : float
        Peak counts per pixel of the condenser spot above the dark offset.
    seed : int
        Seed of the random generator (frames are reproducible).

    Notes
    -----
    ``t_ns`` is stamped when each frame is yielded, so a sender measures latency from there.
    """
    rng = np.random.default_rng(seed)
    rows, cols = shape
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    spot = np.exp(-(((y - rows / 2) / (0.6 * rows)) ** 2 + ((x - cols / 2) / (0.6 * cols)) ** 2))
    flat_mean = dark_counts + flux_counts * spot
    data_mean = dark_counts + flux_counts * spot * np.exp(-1.5 * _pattern(shape, rng))

    def noisy(mean: np.ndarray, photons: bool) -> np.ndarray:
        signal = rng.poisson(mean - dark_counts) + dark_counts if photons else mean
        signal = signal + rng.normal(0.0, read_noise_counts, shape)
        return np.clip(np.rint(signal), 0, 65535).astype(np.uint16)

    darks = [noisy(np.full(shape, dark_counts, np.float32), False) for _ in range(unique)]
    flats = [noisy(flat_mean, True) for _ in range(unique)]
    datas = [noisy(data_mean, True) for _ in range(unique)]
    seq = 0
    for kind, count, images in (("dark", n_dark, darks), ("flat", n_flat, flats),
                                 ("data", n_data, datas)):
        for i in range(count):
            yield Frame(seq=seq, t_ns=time.time_ns(), kind=kind, image=images[i % unique],
                        exposure_s=exposure_s, energy_ev=energy_ev, series=series,
                        attrs={"pixel_nm": pixel_nm})
            seq += 1
