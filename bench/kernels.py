"""Per-frame time of the hot-path kernels against plain numpy and the memory-bandwidth floor.

Run ``python -m bench.kernels [--size 2048] [--repeats 21] [--json FILE]``. Every case times, in
the same run, interleaved in a new random order each round (so load from other processes and
cache state hit all alike): the shipped path (``kernel``), other candidates (``alternative``),
the obvious numpy code (``numpy``) and the floor (``floor``): ``np.copyto`` of a buffer whose
copy reads and writes as many bytes as the kernel must move per frame. Times are per input
frame, median of the repeats after warm-up, with p10 and p90. Add a kernel by appending a case
builder to :data:`CASES`.

Targets (from the issue, not tests): shipped kernel at least 4x faster than numpy and within
1.5x of the floor.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np

from stream import correct
from stream.correct import Corrector, References
from stream.frame import Frame

DEFAULT_JSON = Path(__file__).resolve().parent / "out" / "kernels.json"
TARGET_SPEEDUP_OVER_NUMPY = 4.0
TARGET_RATIO_TO_FLOOR = 1.5


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
    """A kernel benchmark: what it does, the bytes it must move per frame, its variants."""

    name: str
    description: str
    bytes_per_frame: int
    variants: list[Variant]


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
    )


CASES: list[Callable[[int], Case]] = [
    lambda size: correction_case(size, 1),
    lambda size: correction_case(size, 4),
]
"""Case builders, each taking the image side in pixels."""


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
            "bytes_per_frame": case.bytes_per_frame, "variants": rows}


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


def machine_facts() -> dict:
    """What the numbers depend on: CPU, cores, library versions, load at the start."""
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu": _cpu_model(), "l3_cache": _l3_cache(), "cpu_count": os.cpu_count(),
        "usable_cores": len(affinity) if affinity is not None else None,
        "platform": platform.platform(), "python": sys.version.split()[0],
        "numpy": np.__version__, "numba": numba.__version__,
        "numba_threads": numba.config.NUMBA_NUM_THREADS,
        "load_average_start": os.getloadavg(),
    }


def _table(results: list[dict]) -> str:
    header = (f"{'case':<14} {'variant':<36} {'median ms':>9} {'p10':>7} {'p90':>7} "
              f"{'numpy/x':>8} {'x/floor':>8} {'GB/s':>6}")
    lines = [header, "-" * len(header)]
    for case in results:
        for row in case["variants"]:
            lines.append(
                f"{case['name']:<14} {row['name']:<36} {row['median_ms']:9.3f} "
                f"{row['p10_ms']:7.3f} {row['p90_ms']:7.3f} {row['numpy_over_this']:8.2f} "
                f"{row['this_over_floor']:8.2f} {row['gb_per_s']:6.1f}")
        lines.append("")
    return "\n".join(lines)


def _verdicts(results: list[dict]) -> list[str]:
    lines = []
    for case in results:
        for row in case["variants"]:
            if row["role"] != "kernel":
                continue
            fast = row["numpy_over_this"] >= TARGET_SPEEDUP_OVER_NUMPY
            near = row["this_over_floor"] <= TARGET_RATIO_TO_FLOOR
            lines.append(
                f"{case['name']}: {row['numpy_over_this']:.1f}x faster than numpy "
                f"(target >= {TARGET_SPEEDUP_OVER_NUMPY:g}: {'met' if fast else 'MISSED'}), "
                f"{row['this_over_floor']:.2f}x the copy floor "
                f"(target <= {TARGET_RATIO_TO_FLOOR:g}: {'met' if near else 'MISSED'})")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--size", type=int, default=2048, help="image side, pixels")
    parser.add_argument("--repeats", type=int, default=21, help="timed calls per variant")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write JSON")
    args = parser.parse_args(argv)
    if args.size < 2 or args.repeats < 1:
        parser.error("--size must be >= 2 and --repeats >= 1")
    machine = machine_facts()
    correct.warmup()
    results = []
    for build in CASES:
        case = build(args.size)
        results.append(_summarize(case, _time_case(case, args.repeats)))
    machine["numba_threading_layer"] = numba.threading_layer()
    machine["load_average_end"] = os.getloadavg()
    print(f"{machine['cpu']}, {machine['usable_cores']} usable cores, numpy {np.__version__}, "
          f"numba {numba.__version__}; load average at start {machine['load_average_start']}")
    print(_table(results))
    print("\n".join(_verdicts(results)))
    report = {"machine": machine, "settings": {"size": args.size, "repeats": args.repeats},
              "floor": "np.copyto of a buffer whose copy reads + writes the kernel's bytes",
              "cases": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
