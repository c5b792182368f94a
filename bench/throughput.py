"""Highest sustained frame rate per frame size, product and baseline, and the cost per pixel.

``txmlive bench throughput [--sizes 512,1024,2048,4096] [--json FILE] [--plot FILE]`` keeps
one ``txmlive run`` process (ingest queue policy ``drop-oldest``, set through a temporary
config, so an overload shows as drops instead of backpressure) and one sender process per frame
size, and replays trials of synthesized ``N × N`` uint16 frames at a rate chosen by a search:
the rate doubles after each sustained trial until one fails, then bisects (geometric mean)
between the highest sustained and the lowest failed rate until they are within
``--tolerance``. Then the same for the baseline (:mod:`bench.baseline`), whose search starts
from its own per-frame cost measured in this process.

A trial of ``max(--min-frames, fps × --trial-s)`` data frames is **sustained** when

- every data frame has a result (nothing dropped, lost or left unpublished),
- the pipeline counted no drop and no sequence gap during the trial,
- the sender kept the rate (achieved ≥ 97 % of it: a consumer that backs the sender up is not
  keeping up), and
- end-to-end p99 ≤ max(``--latency-periods`` frame periods, ``--latency-floor-ms``), so a
  queue that grows without overflowing counts as not sustained. The floor (default 20 ms, the
  latency target's maximum) keeps a fixed latency, such as the in-order ROI metrics stage,
  from failing high rates that lose nothing: above it a growing backlog overflows the
  16-frame ingest queue within a few periods and shows as drops.

The cost per pixel is ``1 / (max_fps · pixels)`` in ns: flat when the cost grows with the
pixels and nothing else. Per-stage medians at the highest sustained rate say where it goes.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.latency import (
    OUT_DIR,
    SUBSCRIBE_WAIT_S,
    TARGETS,
    WARMUP_QUIET_S,
    FrameSource,
    PipelineProcess,
    ResultCollector,
    Sender,
    analyze,
    counters_of,
    free_urls,
    have_matplotlib,
    send_and_collect,
    write_json,
)

MIN_SENDER_SHARE = 0.97
"""A trial fails when the sender achieved less than this share of the asked rate."""

FPS_LIMITS = (0.5, 20000.0)
"""The search never asks for rates outside these, frames/s."""


def drop_oldest_config(base: str | Path | None, directory: str | Path) -> Path:
    """``base`` (or the defaults) with ``[ingest] queue_policy = "drop-oldest"``, as a file."""
    from txmlive.config import load_config, render_config

    config = load_config(base)
    config.ingest.queue_policy = "drop-oldest"
    path = Path(directory) / "throughput.toml"
    path.write_text(render_config(config))
    return path


def baseline_start_fps(size: int, roi_px: int | None = None, repeats: int = 3) -> float:
    """A first rate for the baseline's search: 80 % of 1 / its per-frame cost here."""
    from bench.baseline import ROI_PX, BaselineProcessor

    rng = np.random.default_rng(0)
    proc = BaselineProcessor(roi_px or ROI_PX)
    proc.add_reference("dark", rng.integers(90, 110, (size, size), dtype=np.uint16))
    proc.add_reference("flat", rng.integers(1500, 2500, (size, size), dtype=np.uint16))
    raw = rng.integers(100, 2400, (size, size), dtype=np.uint16)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc.psd(proc.correct(raw)[0])
        times.append(time.perf_counter() - t0)
    return 0.8 / float(np.median(times))


def product_start_fps(size: int) -> float:
    """A first rate for the product's search: 100 fps at 2048², scaled by the pixels, at most
    1000 fps (per-frame overheads dominate small frames)."""
    return min(100.0 * (2048 / size) ** 2, 1000.0)


def _counter_delta(before: dict[str, Any], after: dict[str, Any], key: str) -> int | None:
    if after.get(key) is None:
        return None
    return int(after[key]) - int(before.get(key) or 0)


def evaluate(fps: float, n_data: int, sent: dict[str, Any], stats: dict[str, Any],
             before: dict[str, Any], *, latency_periods: float,
             latency_floor_ms: float) -> dict[str, Any]:
    """One trial's verdict and the numbers behind it.

    Parameters
    ----------
    fps, n_data : float, int
        Asked rate and data frames sent.
    sent : dict
        Replay summary.
    stats : dict
        :func:`bench.latency.analyze` of the trial's results.
    before : dict
        Counters of the last result of the previous trial (drops and gaps are differences).

    Returns
    -------
    dict
        ``fps``, ``frames``, ``sender_fps``, ``sender_max_lag_s``, ``missing_results``,
        ``dropped``, ``gaps``, ``end_to_end_ms``, ``stages_p50_ms``, ``own_metrics_fraction``,
        ``latency_limit_ms``, ``sustained`` and ``reasons`` (why not, empty when sustained).
    """
    after = stats["counters_last"] or before
    dropped = _counter_delta(before, after, "dropped")
    gaps = _counter_delta(before, after, "gaps")
    limit_ms = max(latency_periods * 1e3 / fps, latency_floor_ms)
    p99 = stats["end_to_end_ms"]["p99"]
    reasons = []
    if stats["missing_results"]:
        reasons.append(f"{stats['missing_results']} frames without a result")
    if dropped:
        reasons.append(f"{dropped} dropped")
    if gaps:
        reasons.append(f"{gaps} sequence gaps")
    if sent["fps"] < MIN_SENDER_SHARE * fps:
        reasons.append(f"sender reached only {sent['fps']:.1f} fps")
    if p99 is None or p99 > limit_ms:
        reasons.append(f"p99 {p99 if p99 is None else round(p99, 2)} ms > {limit_ms:.2f} ms")
    return {
        "fps": fps, "frames": n_data, "sender_fps": sent["fps"],
        "sender_max_lag_s": sent["max_lag_s"], "missing_results": stats["missing_results"],
        "dropped": dropped, "gaps": gaps, "end_to_end_ms": stats["end_to_end_ms"],
        "stages_p50_ms": {k: v["p50"] for k, v in stats["stages_ms"].items()},
        "own_metrics_fraction": stats["own_metrics_fraction"], "latency_limit_ms": limit_ms,
        "sustained": not reasons, "reasons": reasons,
    }


def next_rate(fps: float, lo: float | None, hi: float | None) -> float:
    """Double until a failure, halve until a success, then bisect geometrically."""
    if hi is None:
        return 2.0 * (lo if lo is not None else fps)
    if lo is None:
        return hi / 2.0
    return math.sqrt(lo * hi)


def search_size(target: str, size: int, *, trial_s: float, min_frames: int, tolerance: float,
                max_trials: int, latency_periods: float, latency_floor_ms: float,
                config: str | Path | None = None, roi_px: int | None = None,
                start_fps: float | None = None) -> dict[str, Any]:
    """Search the highest sustained rate of ``target`` at ``size``² (see the module notes).

    Returns
    -------
    dict
        ``size``, ``pixels``, ``max_fps`` (highest sustained rate, 0 if none was),
        ``ns_per_px``, ``bracket`` (highest sustained, lowest failed), ``at_max`` (the
        sustained trial at ``max_fps``), ``trials`` (every trial, in order), ``warmup``
        (the first, unjudged trial), ``counters`` and ``process`` (from the process summary).
    """
    if start_fps is None:
        start_fps = (product_start_fps(size) if target == "product"
                     else baseline_start_fps(size, roi_px))
    fps = float(np.clip(start_fps, *FPS_LIMITS))
    urls = free_urls()
    trials: list[dict[str, Any]] = []
    lo = hi = None
    with (Sender(FrameSource(size=size), urls["frames"]) as sender,
          ResultCollector(urls["results"]) as results):
        proc = PipelineProcess(target, urls, config=config, roi_px=roi_px).start()
        try:
            time.sleep(SUBSCRIBE_WAIT_S)
            warm_fps = max(fps / 4.0, FPS_LIMITS[0])
            n_warm = max(min_frames, round(warm_fps * trial_s))
            sent, warm, seqs = send_and_collect(sender, results, fps=warm_fps, n_data=n_warm,
                                                series="warmup", with_refs=True, send_end=False,
                                                quiet_s=WARMUP_QUIET_S)
            stats = analyze(warm, seqs, per_frame=False)
            warmup = evaluate(warm_fps, n_warm, sent, stats, {}, latency_periods=latency_periods,
                              latency_floor_ms=latency_floor_ms)
            before = stats["counters_last"]
            for k in range(max_trials):
                n_data = max(min_frames, round(fps * trial_s))
                sent, got, seqs = send_and_collect(sender, results, fps=fps, n_data=n_data,
                                                   series=f"trial{k}", with_refs=False,
                                                   send_end=False)
                stats = analyze(got, seqs, per_frame=False)
                trial = evaluate(fps, n_data, sent, stats, before,
                                 latency_periods=latency_periods,
                                 latency_floor_ms=latency_floor_ms)
                before = stats["counters_last"] or before
                trials.append(trial)
                print(f"  {target} {size}x{size} @ {fps:8.1f} fps: "
                      f"{'sustained' if trial['sustained'] else 'NOT sustained'} "
                      f"{'; '.join(trial['reasons'])}", file=sys.stderr, flush=True)
                if trial["sustained"]:
                    lo = fps if lo is None else max(lo, fps)
                else:
                    hi = fps if hi is None else min(hi, fps)
                if lo is not None and hi is not None and hi <= lo * (1.0 + tolerance):
                    break
                fps = next_rate(fps, lo, hi)
                if not FPS_LIMITS[0] <= fps <= FPS_LIMITS[1]:
                    break
        finally:
            summary = proc.stop()
    pixels = size * size
    best = max((t for t in trials if t["sustained"]), key=lambda t: t["fps"], default=None)
    max_fps = best["fps"] if best else 0.0
    return {
        "size": size, "pixels": pixels, "max_fps": max_fps,
        "ns_per_px": 1e9 / (max_fps * pixels) if max_fps else None,
        "bracket": [lo, hi], "at_max": best, "trials": trials, "warmup": warmup,
        "counters": counters_of(summary),
        "process": {"errors": summary.get("errors", []), "returncode": summary["returncode"]},
    }


def summarize_runs(runs: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    """Per size: medians over runs of each target's ``max_fps`` and ``ns_per_px``, the
    product / baseline ratio, and each target's cost per pixel relative to the smallest
    size."""
    rows = []
    for size in sizes:
        row: dict[str, Any] = {"size": size}
        for target in TARGETS:
            found = [run[target][str(size)] for run in runs if str(size) in run.get(target, {})]
            if not found:
                continue
            fps = float(np.median([f["max_fps"] for f in found]))
            row[target] = {"max_fps": fps, "runs": len(found),
                           "ns_per_px": 1e9 / (fps * size * size) if fps else None,
                           "all_max_fps": [f["max_fps"] for f in found]}
        if row.get("product", {}).get("max_fps") and row.get("baseline", {}).get("max_fps"):
            row["product_over_baseline"] = row["product"]["max_fps"] / row["baseline"]["max_fps"]
        rows.append(row)
    for target in TARGETS:
        ref = next((r[target]["ns_per_px"] for r in rows
                    if r.get(target, {}).get("ns_per_px")), None)
        for r in rows:
            if r.get(target, {}).get("ns_per_px") and ref:
                r[target]["ns_per_px_vs_smallest"] = r[target]["ns_per_px"] / ref
    costs = [r["product"]["ns_per_px"] for r in rows if r.get("product", {}).get("ns_per_px")]
    return {"runs": len(runs), "sizes": rows,
            "product_cost_spread": max(costs) / min(costs) if len(costs) > 1 else None}


def _fmt(value: float | None, spec: str) -> str:
    return format("-", ">" + spec.split(".")[0]) if value is None else format(value, spec)


def table(summary: dict[str, Any]) -> str:
    """Size × (product, baseline): highest sustained fps, ns/px, and their ratio."""
    head = (f"{'size':>6} | {'product fps':>11} {'ns/px':>7} {'vs min':>6} | "
            f"{'baseline fps':>12} {'ns/px':>7} | {'product/baseline':>16}")
    lines = [head, "-" * len(head)]
    for row in summary["sizes"]:
        p, b = row.get("product", {}), row.get("baseline", {})
        lines.append(
            f"{row['size']:>6} | {_fmt(p.get('max_fps'), '11.1f')} "
            f"{_fmt(p.get('ns_per_px'), '7.2f')} {_fmt(p.get('ns_per_px_vs_smallest'), '6.2f')} | "
            f"{_fmt(b.get('max_fps'), '12.1f')} {_fmt(b.get('ns_per_px'), '7.2f')} | "
            f"{_fmt(row.get('product_over_baseline'), '16.1f')}")
    return "\n".join(lines)


def run_throughput(sizes: list[int], *, trial_s: float = 3.0, min_frames: int = 30,
                   tolerance: float = 0.1, max_trials: int = 12, latency_periods: float = 3.0,
                   latency_floor_ms: float = 20.0, repeats: int = 1, baseline: bool = True,
                   config: str | Path | None = None, roi_px: int | None = None,
                   start_fps: float | None = None) -> dict[str, Any]:
    """The whole ``throughput`` command's measurement (``start_fps`` None: automatic).

    Returns
    -------
    dict
        ``kind`` ("throughput"), ``machine``, ``settings``, ``runs`` (each
        ``{"product": {size: search_size(...)}, "baseline": {...}}``, sizes as strings) and
        ``summary`` (:func:`summarize_runs`).
    """
    from bench.kernels import copy_bandwidth_gb_s, machine_facts

    if not sizes or min(sizes) < 8:
        raise ValueError(f"sizes must be >= 8 px, got {sizes}")
    if trial_s <= 0 or min_frames < 1 or tolerance <= 0 or max_trials < 1 or repeats < 1:
        raise ValueError("need trial_s > 0, min_frames >= 1, tolerance > 0, max_trials >= 1 "
                         "and repeats >= 1")
    report: dict[str, Any] = {
        "kind": "throughput", "machine": machine_facts(),
        "settings": {"sizes": sizes, "trial_s": trial_s, "min_frames": min_frames,
                     "tolerance": tolerance, "max_trials": max_trials,
                     "latency_periods": latency_periods, "latency_floor_ms": latency_floor_ms,
                     "min_sender_share": MIN_SENDER_SHARE, "repeats": repeats,
                     "queue_policy": "drop-oldest",
                     "config": None if config is None else str(config),
                     "baseline_roi_px": roi_px, "start_fps": start_fps},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": [],
    }
    report["machine"]["copy_gb_per_s"] = copy_bandwidth_gb_s()
    common = {"trial_s": trial_s, "min_frames": min_frames, "tolerance": tolerance,
              "max_trials": max_trials, "latency_periods": latency_periods,
              "latency_floor_ms": latency_floor_ms, "start_fps": start_fps}
    with tempfile.TemporaryDirectory(prefix="txmlive-bench-") as tmp:
        product_config = drop_oldest_config(config, tmp)
        for _ in range(repeats):
            run: dict[str, Any] = {"product": {}, "baseline": {}}
            for size in sizes:
                run["product"][str(size)] = search_size("product", size, config=product_config,
                                                        **common)
                if baseline:
                    run["baseline"][str(size)] = search_size("baseline", size, roi_px=roi_px,
                                                             **common)
            report["runs"].append(run)
    report["machine"]["load_average_end"] = os.getloadavg()
    report["summary"] = summarize_runs(report["runs"], sizes)
    return report


def plot_throughput(report: dict[str, Any], path: str | Path) -> Path:
    """Highest sustained fps and ns/px against frame size, product and baseline, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["summary"]["sizes"]
    fig, (ax_fps, ax_px) = plt.subplots(1, 2, figsize=(11, 4.2))
    for target, color in (("product", "tab:blue"), ("baseline", "tab:orange")):
        pts = [(r["size"], r[target]["max_fps"], r[target]["ns_per_px"]) for r in rows
               if r.get(target, {}).get("max_fps")]
        if not pts:
            continue
        size, fps, ns = zip(*pts, strict=True)
        ax_fps.plot(size, fps, "o-", color=color, label=target)
        ax_px.plot(size, ns, "o-", color=color, label=target)
    for ax in (ax_fps, ax_px):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("frame side, px")
        ax.legend()
    ax_fps.set_ylabel("highest sustained rate, fps")
    ax_px.set_ylabel("cost per pixel, ns (1 / (fps · pixels))")
    fig.suptitle(f"sustained throughput, median of {report['summary']['runs']} run(s)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_sizes(text: str) -> list[int]:
    """``"512,1024"`` → ``[512, 1024]``; a clear error for anything else."""
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ValueError(f"--sizes must be comma-separated integers, got {text!r}") from exc
    if not sizes or min(sizes) < 8:
        raise ValueError(f"--sizes must list sides >= 8 px, got {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="txmlive bench throughput",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="512,1024,2048,4096", help="frame sides, px")
    parser.add_argument("--trial-s", type=float, default=3.0, help="seconds per trial")
    parser.add_argument("--min-frames", type=int, default=30, help="data frames per trial, min")
    parser.add_argument("--tolerance", type=float, default=0.1,
                        help="stop when lowest failed / highest sustained <= 1 + this")
    parser.add_argument("--max-trials", type=int, default=12, help="trials per size, max")
    parser.add_argument("--latency-periods", type=float, default=3.0,
                        help="p99 limit in frame periods")
    parser.add_argument("--latency-floor-ms", type=float, default=20.0,
                        help="p99 limit never below this, ms")
    parser.add_argument("--repeats", type=int, default=1, help="searches per size; medians")
    parser.add_argument("--start-fps", type=float,
                        help="first rate of every search (default: from the frame size)")
    parser.add_argument("--no-baseline", action="store_true", help="measure the product only")
    parser.add_argument("--config", metavar="FILE", help="TOML config for txmlive run")
    parser.add_argument("--baseline-roi", type=int, help="baseline PSD ROI side, px")
    parser.add_argument("--json", type=Path, default=OUT_DIR / "throughput.json",
                        help="where to write JSON")
    parser.add_argument("--plot", type=Path, metavar="FILE", help="write a PNG (matplotlib)")
    args = parser.parse_args(argv)
    try:
        sizes = parse_sizes(args.sizes)
    except ValueError as exc:
        parser.error(str(exc))
    if (args.trial_s <= 0 or args.min_frames < 1 or args.tolerance <= 0 or args.max_trials < 1
            or args.repeats < 1 or (args.start_fps is not None and args.start_fps <= 0)):
        parser.error("need --trial-s > 0, --min-frames >= 1, --tolerance > 0, "
                     "--max-trials >= 1, --repeats >= 1, --start-fps > 0")
    if args.plot is not None and not have_matplotlib():
        parser.error("--plot needs matplotlib, which is not installed (pip install matplotlib)")
    report = run_throughput(sizes, trial_s=args.trial_s, min_frames=args.min_frames,
                            tolerance=args.tolerance, max_trials=args.max_trials,
                            latency_periods=args.latency_periods,
                            latency_floor_ms=args.latency_floor_ms, repeats=args.repeats,
                            baseline=not args.no_baseline, config=args.config,
                            roi_px=args.baseline_roi, start_fps=args.start_fps)
    print(table(report["summary"]))
    write_json(report, args.json)
    print(f"wrote {args.json}", file=sys.stderr)
    if args.plot is not None:
        print(f"wrote {plot_throughput(report, args.plot)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
