"""Per-frame time of the hot-path kernels against plain numpy and the memory-bandwidth floor.

Run ``txmlive bench kernels`` or ``python -m bench.kernels [--size 2048] [--roi 512]
[--repeats 21] [--json FILE]``. Every case times, in
the same run, interleaved in a new random order each round (so load from other processes and
cache state hit all alike): the shipped path (``kernel``), other candidates (``alternative``),
the obvious numpy code (``numpy``) and the floor (``floor``): ``np.copyto`` of a buffer whose
copy reads and writes as many bytes as the kernel must move per frame. Times are per input
frame, median of the repeats after warm-up, with p10 and p90. Add a kernel by appending a case
builder to :data:`CASES`.

Cases: dark/flat correction alone and fused with block averaging (N=4) on ``size``² uint16;
the radial PSD of a ``roi``² ROI against ``np.fft.fft2`` with Python-level radial binning
(:func:`bench.baseline.numpy_psd`, the baseline's own code); registration (phase correlation)
of the central crop the pipeline measures shifts on; the intensity-weighted centroid and the
8×8 binning (with totals) of a raw ``size``² uint16 frame (the beam metrics' input); and all
metrics of one frame as the pipeline's metrics stage computes them. FFT cases are
compute-bound: their floor (one read of the input and one write of its half spectrum) only sets
the scale.

Targets (from the issues, not tests): correction at least 4x faster than numpy and within 1.5x
of the floor; the PSD and all metrics of one frame at least 5x faster than plain numpy, all
metrics of a 2048² frame in under 5 ms on one core. Cases without a target report ratios only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numba
import numpy as np
import scipy.ndimage

from bench.baseline import numpy_psd, radial_bins
from stream import correct
from stream.beam import beam_stats, bin_image_and_totals
from stream.correct import Corrector, References
from stream.frame import Frame
from stream.metrics import MetricsConfig, MetricsEngine
from stream.psd import RadialPsd
from stream.synth import synthetic_frames
from stream.vibration import PhaseCorrelator, phase_correlation_shift

DEFAULT_JSON = Path(__file__).resolve().parent / "out" / "kernels.json"
CORRECTION_TARGETS = {"speedup_over_numpy": 4.0, "ratio_to_floor": 1.5}
METRICS_TARGETS = {"speedup_over_numpy": 5.0}
ALL_METRICS_TARGETS = {"speedup_over_numpy": 5.0, "max_ms": 5.0}


@dataclass(frozen=True)
class Variant:
    """One way of doing a case's work.

    Attributes
    ----------
    name : str
    role : str
        ``kernel`` (the shipped path, checked against the targets), ``alternative``, ``numpy``
        or ``floor``.
    run : callable
        Does the work for ``frames`` input frames.
    frames : int
        Input frames one call of ``run`` handles (times are divided by it).
    """

    name: str
    role: str
    run: Callable[[], object]
    frames: int = 1


@dataclass(frozen=True)
class Case:
    """A kernel benchmark: what it does, the bytes it must move per frame, its variants.

    ``targets`` may hold ``speedup_over_numpy`` (minimum numpy / kernel), ``ratio_to_floor``
    (maximum kernel / floor) and ``max_ms`` (maximum kernel time per frame).
    """

    name: str
    description: str
    bytes_per_frame: int
    variants: list[Variant]
    targets: dict[str, float] = field(default_factory=dict)


def _floor(bytes_per_frame: int) -> Variant:
    """A copy that reads and writes ``bytes_per_frame`` in total (half read, half written)."""
    src = np.ones(bytes_per_frame // 2, np.uint8)
    dst = np.empty_like(src)
    return Variant("np.copyto (same bytes)", "floor", lambda: np.copyto(dst, src))


def _references(size: int, rng: np.random.Generator) -> tuple[References, correct.ReferencePair,
                                                                   np.ndarray, np.ndarray]:
    """Live references at 2048² (or ``size``²) uint16 and the pair built from them."""
    refs = References(n_frames=1, min_denominator=1.0)
    dark = rng.integers(90, 110, (size, size)).astype(np.uint16)
    flat = rng.integers(1500, 2500, (size, size)).astype(np.uint16)
    refs.add(Frame(seq=0, t_ns=0, kind="dark", image=dark, exposure_s=0.01, energy_ev=8000.0))
    refs.add(Frame(seq=0, t_ns=0, kind="flat", image=flat, exposure_s=0.01, energy_ev=8000.0))
    probe = Frame(seq=0, t_ns=0, kind="data", image=dark, exposure_s=0.01, energy_ev=8000.0)
    pair, reason = refs.lookup(probe)
    assert pair is not None, reason
    return refs, pair, pair.dark, pair.flat


def _data_frames(size: int, count: int, rng: np.random.Generator) -> list[Frame]:
    """Distinct read-only uint16 data frames, like zero-copy frames from the wire."""
    frames = []
    for seq in range(count):
        image = rng.integers(100, 2400, (size, size)).astype(np.uint16)
        image.setflags(write=False)
        frames.append(Frame(seq=seq, t_ns=0, kind="data", image=image, exposure_s=0.01,
                            energy_ev=8000.0))
    return frames


def _parallel_twin() -> Callable:
    """The shipped correction kernel compiled with ``parallel=True`` (its prange loops split)."""
    return numba.njit(nogil=True, parallel=True)(correct._correct_kernel.py_func)


def _kernel_block(kernel: Callable, raws: list[np.ndarray], pair: correct.ReferencePair,
                  out: np.ndarray) -> Callable[[], None]:
    """One block of ``len(raws)`` frames through ``kernel``: write, add..., add-and-scale."""
    n = len(raws)
    modes = [correct._WRITE] + [correct._ADD] * (n - 2) + [correct._ADD_SCALE] * (n > 1)
    scale = np.float32(1.0 / n)

    def run() -> None:
        for raw, mode in zip(raws, modes, strict=True):
            kernel(raw, pair.dark, pair.gain, out, mode, scale)
    return run


def _numpy_block(raws: list[np.ndarray], dark: np.ndarray,
                 flat: np.ndarray) -> Callable[[], np.ndarray]:
    """What one writes without thinking about bytes: correct each frame, sum, divide."""
    def run() -> np.ndarray:
        acc = (raws[0] - dark) / (flat - dark)
        for raw in raws[1:]:
            acc += (raw - dark) / (flat - dark)
        if len(raws) > 1:
            acc /= len(raws)
        return acc
    return run


def correction_case(size: int, n_avg: int) -> Case:
    """Dark/flat correction with block averaging of ``n_avg`` frames, 2-D uint16 frames."""
    rng = np.random.default_rng(0)
    refs, pair, dark, flat = _references(size, rng)
    frames = _data_frames(size, n_avg, rng)
    raws = [f.image for f in frames]
    pixels = size * size
    # per pixel: read raw (2 B), dark and gain (4 + 4 B), write out (4 B); frames after the
    # first of a block also read out (4 B)
    bytes_per_frame = pixels * (14 + 4 * (n_avg - 1) / n_avg)
    corrector = Corrector(refs, average_frames=n_avg)
    out = np.empty((size, size), np.float32)

    def push_block() -> None:
        for frame in frames:
            corrector.push(frame)

    label = "correction" if n_avg == 1 else f"correction + average N={n_avg}"
    return Case(
        name=f"correct N={n_avg}",
        description=f"{label}, {size}x{size} uint16 -> float32, time per input frame",
        bytes_per_frame=int(bytes_per_frame),
        variants=[
            Variant("Corrector.push (serial kernel)", "kernel", push_block, n_avg),
            Variant("serial kernel, direct call", "alternative",
                    _kernel_block(correct._correct_kernel, raws, pair, out), n_avg),
            Variant("parallel=True prange twin", "alternative",
                    _kernel_block(_parallel_twin(), raws, pair, out), n_avg),
            Variant("numpy (raw - dark) / (flat - dark)", "numpy",
                    _numpy_block(raws, dark, flat), n_avg),
            _floor(int(bytes_per_frame)),
        ],
        targets=CORRECTION_TARGETS,
    )


def _test_image(side: int, dtype: type = np.float32) -> np.ndarray:
    """A synthesized TXM data frame (structure and photon noise), ``side``², as ``dtype``."""
    frame = next(iter(synthetic_frames((side, side), 1, n_dark=0, n_flat=0, unique=1)))
    return frame.image.astype(dtype)


def _raw_frame(size: int) -> np.ndarray:
    """A read-only uint16 frame, as decoded zero-copy from the wire (beam metrics use it)."""
    frame = _test_image(size, np.uint16)
    frame.setflags(write=False)
    return frame


def _corrected_frame(size: int) -> np.ndarray:
    """A corrected-looking float32 frame (transmission ~0.2-1), as the ROI metrics get it."""
    return _test_image(size) / np.float32(5100.0)


def psd_case(size: int, roi: int) -> Case:
    """Radial PSD of a ``roi``² float32 ROI against ``np.fft.fft2`` + Python-level binning."""
    image = _test_image(roi)
    psd = RadialPsd(image.shape, pixel_nm=10.0)
    bins = radial_bins(image.shape)
    bytes_per_frame = roi * roi * 8  # read the float32 ROI, write the complex64 half spectrum
    return Case(
        name=f"psd {roi}",
        description=f"radial PSD of a {roi}x{roi} float32 ROI, time per ROI",
        bytes_per_frame=bytes_per_frame,
        variants=[
            Variant("RadialPsd (numba, rfft2, cut-off)", "kernel", lambda: psd(image)),
            Variant("spectrum + radial profiles only", "alternative",
                    lambda: psd.profiles(psd.spectrum(image)[0])),
            Variant("np.fft.fft2 + Python radial bins", "numpy", lambda: numpy_psd(image, bins)),
            _floor(bytes_per_frame),
        ],
        targets=METRICS_TARGETS,
    )


def numpy_phase_correlation(ref: np.ndarray, img: np.ndarray) -> tuple[int, int]:
    """Textbook phase correlation: integer shift of ``img`` relative to ``ref``, px."""
    cross = np.fft.fft2(img) * np.conj(np.fft.fft2(ref))
    cross /= np.abs(cross) + 1e-12
    surface = np.fft.ifft2(cross).real
    iy, ix = np.unravel_index(np.argmax(surface), surface.shape)
    h, w = surface.shape
    return int(iy - h if iy > h // 2 else iy), int(ix - w if ix > w // 2 else ix)


def registration_case(size: int, roi: int) -> Case:
    """Phase correlation of the central crop the pipeline measures frame-to-frame shifts on."""
    side = min(roi, MetricsConfig().shift_px)
    ref = _test_image(side)
    img = np.roll(ref, (3, -5), axis=(0, 1))
    corr = PhaseCorrelator(ref.shape)
    ref_spec = corr.spectrum(ref)
    bytes_per_frame = side * side * 8
    return Case(
        name=f"register {side}",
        description=f"phase correlation of {side}x{side} float32 crops, time per frame",
        bytes_per_frame=bytes_per_frame,
        variants=[
            Variant("PhaseCorrelator (kept ref spectrum)", "kernel",
                    lambda: corr.shift_spectra(ref_spec, corr.spectrum(img))),
            Variant("phase_correlation_shift (2 spectra)", "alternative",
                    lambda: phase_correlation_shift(ref, img)),
            Variant("numpy fft2 x2, ifft2, argmax", "numpy",
                    lambda: numpy_phase_correlation(ref, img)),
            _floor(bytes_per_frame),
        ],
    )


def numpy_centroid(image: np.ndarray, background: float = 0.0) -> tuple[float, float, float]:
    """Intensity-weighted centroid ``(y, x)`` px and total of the finite pixels, plain numpy."""
    finite = np.where(np.isfinite(image), image, 0.0)
    weights = np.maximum(finite - background, 0.0)
    total_w = weights.sum()
    cy = weights.sum(axis=1) @ np.arange(image.shape[0]) / total_w
    cx = weights.sum(axis=0) @ np.arange(image.shape[1]) / total_w
    return float(cy), float(cx), float(finite.sum())


def numpy_bin(image: np.ndarray, factor: int) -> tuple[np.ndarray, float]:
    """NaN-aware ``factor``² block mean and the total of the finite pixels, plain numpy."""
    h, w = image.shape[0] // factor, image.shape[1] // factor
    blocks = image[:h * factor, :w * factor].reshape(h, factor, w, factor)
    return np.nanmean(blocks, axis=(1, 3)), float(np.nansum(image))


def centroid_case(size: int, roi: int) -> Case:
    """Intensity-weighted centroid of a whole raw ``size``² uint16 frame."""
    frame = _raw_frame(size)
    bytes_per_frame = size * size * 2
    return Case(
        name=f"centroid {size}",
        description=f"weighted centroid + totals of a raw {size}x{size} uint16 frame",
        bytes_per_frame=bytes_per_frame,
        variants=[
            Variant("beam_stats (numba)", "kernel", lambda: beam_stats(frame)),
            Variant("numpy where/maximum/sum", "numpy", lambda: numpy_centroid(frame)),
            _floor(bytes_per_frame),
        ],
    )


def binning_case(size: int, roi: int) -> Case:
    """8×8 NaN-aware binning with totals of a raw ``size``² uint16 frame (beam metrics)."""
    frame = _raw_frame(size)
    factor = min(8, size)
    out = np.empty((size // factor, size // factor), np.float32)
    engine = MetricsEngine(MetricsConfig(bin_factor=factor))
    bytes_per_frame = size * size * 2
    return Case(
        name=f"bin {factor} {size}",
        description=f"{factor}x{factor} binning + totals of a raw {size}x{size} uint16 frame",
        bytes_per_frame=bytes_per_frame,
        variants=[
            Variant("bin_image_and_totals (numba)", "kernel",
                    lambda: bin_image_and_totals(frame, factor, out)),
            Variant("MetricsEngine.cheap (bin+centroid+CV)", "alternative",
                    lambda: engine.cheap(frame)),
            Variant("numpy reshape nanmean + nansum", "numpy", lambda: numpy_bin(frame, factor)),
            _floor(bytes_per_frame),
        ],
    )


def numpy_all_metrics(raw: np.ndarray, corrected: np.ndarray, prev_roi: np.ndarray,
                      roi: tuple[slice, slice], bins: list[np.ndarray],
                      factor: int) -> dict[str, float]:
    """What the pipeline measures per frame, in plain numpy/scipy (cut-off search left out).

    Binning, centroid and illumination CV on the binned raw frame; PSD (:func:`numpy_psd`),
    two focus scores and the phase-correlation shift against the previous ROI on the corrected
    ROI.
    """
    binned, total = numpy_bin(raw, factor)
    cy, cx, _ = numpy_centroid(binned)
    smooth = scipy.ndimage.gaussian_filter(np.nan_to_num(binned), 2.0)
    fov = smooth >= 0.5 * smooth.max()
    cut = corrected[roi]
    psd = numpy_psd(cut, bins)
    mean = cut.mean()
    dy, dx = numpy_phase_correlation(prev_roi, cut)
    return {"cy": cy, "cx": cx, "total": total, "cv": smooth[fov].std() / smooth[fov].mean(),
            "psd_low": float(psd[:8].mean()), "normalized_variance": cut.var() / mean,
            "brenner": float(np.sum((cut[:, 2:] - cut[:, :-2]) ** 2)), "dy": dy, "dx": dx}


def all_metrics_case(size: int, roi: int) -> Case:
    """All metrics of one ``size``² frame as the pipeline's metrics stage computes them: beam
    metrics on the raw uint16 frame, ROI metrics on a copy of the corrected ``roi``² ROI."""
    raw = _raw_frame(size)
    corrected = _corrected_frame(size)
    side = min(roi, size)
    y0 = x0 = (size - side) // 2
    config = MetricsConfig(roi=(y0, x0, side, side))
    engine = MetricsEngine(config)
    engine.warm_up((size, size), dtypes=(np.uint16, np.float32))
    roi_slices = (slice(y0, y0 + side), slice(x0, x0 + side))
    prev_roi = np.roll(corrected[roi_slices], 1, axis=0)
    bins = radial_bins((side, side))
    factor = min(config.bin_factor, size)
    bytes_per_frame = size * size * 2 + side * side * 8  # raw frame; ROI copy written and read

    def shipped() -> None:
        engine.cheap(raw)
        engine.expensive_roi(np.array(engine.roi_view(corrected)))

    return Case(
        name=f"all metrics {size}",
        description=f"all metrics of a {size}x{size} frame (beam on raw uint16, ROI "
                    f"{side}x{side} of the float32 corrected frame)",
        bytes_per_frame=bytes_per_frame,
        variants=[
            Variant("MetricsEngine cheap + expensive_roi", "kernel", shipped),
            Variant("numpy/scipy equivalent", "numpy",
                    lambda: numpy_all_metrics(raw, corrected, prev_roi, roi_slices, bins,
                                              factor)),
            _floor(bytes_per_frame),
        ],
        targets=ALL_METRICS_TARGETS,
    )


CASES: list[Callable[[int, int], Case]] = [
    lambda size, roi: correction_case(size, 1),
    lambda size, roi: correction_case(size, 4),
    psd_case,
    registration_case,
    centroid_case,
    binning_case,
    all_metrics_case,
]
"""Case builders, each taking the frame side and the metrics ROI side in pixels."""


def _time_case(case: Case, repeats: int, warmup_calls: int = 2) -> dict[str, list[float]]:
    """ms per input frame of each variant, ``repeats`` samples, variants interleaved."""
    for variant in case.variants:
        for _ in range(warmup_calls):
            variant.run()
    samples: dict[str, list[float]] = {v.name: [] for v in case.variants}
    rng = np.random.default_rng(0)
    for _ in range(repeats):
        # a new order each round, so no variant always runs in the cache state another leaves
        for k in rng.permutation(len(case.variants)):
            variant = case.variants[k]
            t0 = time.perf_counter_ns()
            variant.run()
            samples[variant.name].append((time.perf_counter_ns() - t0) / 1e6 / variant.frames)
    return samples


def _summarize(case: Case, samples: dict[str, list[float]]) -> dict:
    medians = {name: float(np.median(s)) for name, s in samples.items()}
    numpy_ms = next(medians[v.name] for v in case.variants if v.role == "numpy")
    floor_ms = next(medians[v.name] for v in case.variants if v.role == "floor")
    rows = []
    for variant in case.variants:
        s = np.asarray(samples[variant.name])
        median = medians[variant.name]
        rows.append({
            "name": variant.name, "role": variant.role, "median_ms": median,
            "p10_ms": float(np.percentile(s, 10)), "p90_ms": float(np.percentile(s, 90)),
            "numpy_over_this": numpy_ms / median, "this_over_floor": median / floor_ms,
            "gb_per_s": case.bytes_per_frame / (median * 1e-3) / 1e9,
            "samples_ms": [float(x) for x in s],
        })
    return {"name": case.name, "description": case.description,
            "bytes_per_frame": case.bytes_per_frame, "targets": dict(case.targets),
            "variants": rows}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _l3_cache() -> str | None:
    path = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    return path.read_text().strip() if path.exists() else None


def code_version() -> str | None:
    """``git describe --always --dirty`` of the checkout the benchmarks run from, or None."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def machine_facts() -> dict:
    """What the numbers depend on: CPU, cores, library versions, code version, load at start."""
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return {
        "code": code_version(),
        "cpu": _cpu_model(), "l3_cache": _l3_cache(), "cpu_count": os.cpu_count(),
        "usable_cores": len(affinity) if affinity is not None else None,
        "platform": platform.platform(), "python": sys.version.split()[0],
        "numpy": np.__version__, "numba": numba.__version__,
        "numba_threads": numba.config.NUMBA_NUM_THREADS,
        "load_average_start": os.getloadavg(),
    }


def copy_bandwidth_gb_s(nbytes: int = 128 * 2**20, repeats: int = 7) -> float:
    """Memory bandwidth of ``np.copyto``, GB/s of bytes read + written, median of ``repeats``.

    The same floor the cases compare against, on a buffer far larger than the caches.
    """
    src = np.ones(nbytes // 2, np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        np.copyto(dst, src)
        times.append(time.perf_counter_ns() - t0)
    return nbytes / float(np.median(times))


def _table(results: list[dict]) -> str:
    header = (f"{'case':<16} {'variant':<38} {'median ms':>9} {'p10':>7} {'p90':>7} "
              f"{'numpy/x':>8} {'x/floor':>8} {'GB/s':>6}")
    lines = [header, "-" * len(header)]
    for case in results:
        for row in case["variants"]:
            lines.append(
                f"{case['name']:<16} {row['name']:<38} {row['median_ms']:9.3f} "
                f"{row['p10_ms']:7.3f} {row['p90_ms']:7.3f} {row['numpy_over_this']:8.2f} "
                f"{row['this_over_floor']:8.2f} {row['gb_per_s']:6.1f}")
        lines.append("")
    return "\n".join(lines)


def verdicts(results: list[dict]) -> list[str]:
    """One line per shipped kernel with targets: its ratios and whether each target is met."""
    lines = []
    for case in results:
        targets = case.get("targets", {})
        if not targets:
            continue
        for row in case["variants"]:
            if row["role"] != "kernel":
                continue
            parts = []
            if "speedup_over_numpy" in targets:
                goal = targets["speedup_over_numpy"]
                parts.append(f"{row['numpy_over_this']:.1f}x faster than numpy (target >= "
                             f"{goal:g}: {_met(row['numpy_over_this'] >= goal)})")
            if "ratio_to_floor" in targets:
                goal = targets["ratio_to_floor"]
                parts.append(f"{row['this_over_floor']:.2f}x the copy floor (target <= "
                             f"{goal:g}: {_met(row['this_over_floor'] <= goal)})")
            if "max_ms" in targets:
                goal = targets["max_ms"]
                parts.append(f"{row['median_ms']:.2f} ms (target <= {goal:g} ms: "
                             f"{_met(row['median_ms'] <= goal)})")
            lines.append(f"{case['name']}: " + ", ".join(parts))
    return lines


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="txmlive bench kernels", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--size", type=int, default=2048, help="image side, pixels")
    parser.add_argument("--roi", type=int, default=512, help="metrics ROI side, pixels")
    parser.add_argument("--repeats", type=int, default=21, help="timed calls per variant")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write JSON")
    args = parser.parse_args(argv)
    if args.size < 32 or not 32 <= args.roi <= args.size or args.repeats < 1:
        parser.error("need --size >= 32, 32 <= --roi <= --size and --repeats >= 1")
    machine = machine_facts()
    machine["copy_gb_per_s"] = copy_bandwidth_gb_s()
    correct.warmup()
    results = []
    for build in CASES:
        case = build(args.size, args.roi)
        results.append(_summarize(case, _time_case(case, args.repeats)))
    machine["numba_threading_layer"] = numba.threading_layer()
    machine["load_average_end"] = os.getloadavg()
    print(f"{machine['cpu']}, {machine['usable_cores']} usable cores, numpy {np.__version__}, "
          f"numba {numba.__version__}; load average at start {machine['load_average_start']}; "
          f"median of {args.repeats} repeats per variant")
    print(_table(results))
    print("\n".join(verdicts(results)))
    report = {"kind": "kernels", "machine": machine,
              "settings": {"size": args.size, "roi": args.roi, "repeats": args.repeats},
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "floor": "np.copyto of a buffer whose copy reads + writes the kernel's bytes",
              "cases": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
