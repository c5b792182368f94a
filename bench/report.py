"""``bench/RESULTS.md`` from the benchmark JSON files.

``txmlive bench report [--out-dir bench/out] [--results bench/RESULTS.md] [--plots-dir DIR]``
reads every ``*.json`` the other commands wrote (``kind`` says which: ``kernels``, ``latency``,
``throughput``) and writes one Markdown file: the machine (CPU, cores, memory bandwidth
measured by the copy floor, load while measuring), the targets with their verdicts, and the
tables with product and baseline side by side as ratios. Repeated runs (``--repeats`` or
several files of one kind) are combined by their median, and every table says how many runs
it is the median of. Plots (PNG) are drawn when matplotlib is installed; without it the file
says so, and everything else is still written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench.latency import OUT_DIR, STAGE_NAMES, have_matplotlib
from bench.latency import summarize_runs as summarize_latency
from bench.throughput import summarize_runs as summarize_throughput

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"

LATENCY_TARGET = {"size": 2048, "fps": 100.0, "min_frames": 3000, "p99_ms": 10.0,
                  "max_ms": 20.0}
THROUGHPUT_TARGET = {"size": 2048, "min_fps": 250.0, "min_ratio": 5.0, "cost_spread": 1.5,
                     "cost_sizes": (512, 4096)}


def load_reports(out_dir: Path) -> dict[str, list[tuple[Path, dict[str, Any]]]]:
    """Every benchmark JSON under ``out_dir`` by kind, oldest first; other files are skipped."""
    found: dict[str, list[tuple[Path, dict[str, Any]]]] = {
        "kernels": [], "latency": [], "throughput": []}
    for path in sorted(out_dir.glob("*.json"), key=lambda p: p.stat().st_mtime):
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"report: skipping {path}: {exc}", file=sys.stderr)
            continue
        if not isinstance(report, dict):
            continue
        kind = report.get("kind") or ("kernels" if "cases" in report else None)
        if kind in found:
            found[kind].append((path, report))
    return found


def _f(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**MISSED**")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


# -- machine --------------------------------------------------------------------------------

def machine_section(reports: dict[str, list[tuple[Path, dict[str, Any]]]]) -> list[str]:
    """Machine facts, memory bandwidth from the copy floor, and load per measurement."""
    everything = [(kind, path, r) for kind, items in reports.items() for path, r in items]
    if not everything:
        return ["## Machine", "", "No benchmark JSON found.", ""]
    machine = everything[-1][2]["machine"]
    copy = [r["machine"]["copy_gb_per_s"] for _, _, r in everything
            if r["machine"].get("copy_gb_per_s")]
    floors = [row["gb_per_s"] for _, r in reports["kernels"] for case in r["cases"]
              for row in case["variants"] if row["role"] == "floor"
              and case["bytes_per_frame"] >= 2**24]
    lines = ["## Machine", "",
             f"- CPU: {machine.get('cpu')} (L3 {machine.get('l3_cache')}), "
             f"{machine.get('usable_cores')} usable cores of {machine.get('cpu_count')}",
             f"- {machine.get('platform')}; Python {machine.get('python')}, numpy "
             f"{machine.get('numpy')}, numba {machine.get('numba')} "
             f"({machine.get('numba_threads')} threads)"]
    if copy or floors:
        lines.append(
            f"- Memory bandwidth (np.copyto, bytes read + written): "
            f"{_f(float(np.median(copy)) if copy else None, '.1f')} GB/s on a 128 MiB buffer "
            f"(median of {len(copy)} measurement(s)); the kernels' copy floors on ≥ 16 MiB: "
            f"{_f(float(np.median(floors)) if floors else None, '.1f')} GB/s median")
    lines += ["", "When and under what load (1-min load average at start → end; on a 2-core "
              "machine a load above ~1 means other work competed for the cores):", ""]
    busy = False
    for kind, path, r in everything:
        m = r["machine"]
        start = m.get("load_average_start", [None])[0]
        end = (m.get("load_average_end") or [None])[0]
        busy = busy or (start is not None and start >= 0.5 * (m.get("usable_cores") or 1))
        lines.append(f"- `{path.name}` ({kind}): {r.get('started', 'time not recorded')}, "
                     f"code {m.get('code') or 'unknown'}, load {_f(start)} → {_f(end)}")
    if busy:
        lines += ["", "**Other work was running** when at least one of these started (load "
                  "≥ half the cores before the benchmark's own processes): its numbers are "
                  "pessimistic and noisy; re-run on a quiet machine for reference numbers."]
    return lines + [""]


# -- kernels --------------------------------------------------------------------------------

def merge_kernels(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cases of several kernel runs, each variant's median the median over runs."""
    merged: dict[str, dict[str, Any]] = {}
    for report in reports:
        for case in report["cases"]:
            entry = merged.setdefault(case["name"], {
                "name": case["name"], "description": case["description"],
                "bytes_per_frame": case["bytes_per_frame"],
                "targets": case.get("targets", {}), "rows": {}})
            for row in case["variants"]:
                entry["rows"].setdefault(row["name"], {"role": row["role"], "medians": []})
                entry["rows"][row["name"]]["medians"].append(row["median_ms"])
    out = []
    for entry in merged.values():
        medians = {name: float(np.median(r["medians"])) for name, r in entry["rows"].items()}
        numpy_ms = next((medians[n] for n, r in entry["rows"].items() if r["role"] == "numpy"),
                        None)
        floor_ms = next((medians[n] for n, r in entry["rows"].items() if r["role"] == "floor"),
                        None)
        variants = [{
            "name": name, "role": r["role"], "median_ms": medians[name], "runs": len(r["medians"]),
            "numpy_over_this": numpy_ms / medians[name] if numpy_ms else None,
            "this_over_floor": medians[name] / floor_ms if floor_ms else None,
            "gb_per_s": entry["bytes_per_frame"] / (medians[name] * 1e-3) / 1e9,
        } for name, r in entry["rows"].items()]
        out.append({"name": entry["name"], "description": entry["description"],
                    "bytes_per_frame": entry["bytes_per_frame"], "targets": entry["targets"],
                    "variants": variants})
    return out


KERNEL_TARGET_SETTINGS = (2048, 512)
"""(frame side, ROI side) the kernel targets are stated for."""


def kernels_section(items: list[tuple[Path, dict[str, Any]]]) -> tuple[list[str], list[list]]:
    """One per-kernel table per (frame, ROI) size, and the kernel target rows."""
    from bench.kernels import verdicts

    if not items:
        return ["## Kernels", "", "No kernel run yet (`txmlive bench kernels`).", ""], []
    lines = ["## Kernels", "",
             "Time per frame of each hot-path kernel (`kernel`, the shipped path), other "
             "candidates, the plain-numpy code (`numpy`; the PSD uses the baseline's own "
             "`np.fft.fft2` + Python-level radial binning) and the memory-copy floor (`floor`: "
             "`np.copyto` moving the bytes the kernel must read and write), all in the same "
             "run, interleaved in random order. `numpy / this` > 1 means faster than numpy.", ""]
    groups: dict[tuple[int, int | None], list[dict[str, Any]]] = {}
    for _, report in items:
        s = report["settings"]
        groups.setdefault((s["size"], s.get("roi")), []).append(report)
    target_rows = []
    for (size, roi), reports in sorted(groups.items(), key=lambda kv: kv[0][0], reverse=True):
        cases = merge_kernels(reports)
        repeats = "/".join(str(r) for r in sorted({r["settings"]["repeats"] for r in reports}))
        lines += [f"### {size}² frames, {roi}² ROI (each time the median of {repeats} timed "
                  f"calls after warm-up, then the median over {len(reports)} run(s))", ""]
        rows = [[case["name"], v["name"], v["role"], _f(v["median_ms"], ".3f"),
                 _f(v["numpy_over_this"], ".2f"), _f(v["this_over_floor"], ".2f"),
                 _f(v["gb_per_s"], ".1f")] for case in cases for v in case["variants"]]
        lines += _table(["case", "variant", "role", "median ms", "numpy / this",
                         "this / floor", "GB/s"], rows)
        lines += ["", "Cases: " + "; ".join(
            f"**{c['name']}**: {c['description']}" for c in cases) + ".", ""]
        if (size, roi) == KERNEL_TARGET_SETTINGS:
            for line in verdicts(cases):
                name, detail = line.split(":", 1)
                target_rows.append([f"kernel {name} ({size}², ROI {roi}²)", detail.strip(),
                                    "**MISSED**" if "MISSED" in detail else "**met**"])
    return lines, target_rows


# -- latency --------------------------------------------------------------------------------

def _latency_groups(items: list[tuple[Path, dict[str, Any]]]) -> dict[tuple, dict[str, Any]]:
    groups: dict[tuple, dict[str, Any]] = {}
    for path, report in items:
        s = report["settings"]
        key = (s["source"], float(s["fps"]), int(s["frames"]))
        group = groups.setdefault(key, {"settings": s, "runs": [], "files": []})
        group["runs"].extend(report["runs"])
        group["files"].append(path.name)
    return groups


def latency_section(items: list[tuple[Path, dict[str, Any]]]) -> tuple[list[str], list[list]]:
    """One per-stage table per (source, fps, frames), and the latency target rows."""
    if not items:
        return ["## Latency", "", "No latency run yet (`txmlive bench latency`).", ""], []
    lines = ["## Latency", "",
             "From each frame's `t_ns` (stamped by the sender process as the frame goes on the "
             "wire) to its Result leaving the results socket, measured on a real `txmlive run` "
             "process (default config, lossless `block` queue, unless a config is named) and "
             "on the baseline, each fed "
             "over TCP loopback by a separate sender process at a fixed rate. Stages: receive "
             "(`t_ns` → receiver thread has the decoded frame: ZMQ/TCP transfer and any "
             "backlog in the socket buffers), queue (→ the processing thread takes it), "
             "correct, average, metrics (→ the pipeline's in-order metrics stage is done with "
             "it: beam metrics and the ROI's focus, shift and PSD, measured on the newest "
             "frame when behind), publish. The baseline has receive, correct, metrics (its PSD) "
             "and publish only. Percentiles are over the measured "
             "frames of a run, then the median over runs; warm-up frames (first-call costs) "
             "are reported apart.", ""]
    target_rows = []
    for (source, fps, frames), group in _latency_groups(items).items():
        summary = summarize_latency(group["runs"])
        product, baseline = summary.get("product", {}), summary.get("baseline", {})
        config = group["settings"].get("config")
        lines += [f"### {source} at {fps:g} fps, {frames} frames (median of "
                  f"{summary['runs']} run(s); {', '.join(group['files'])}"
                  f"{f'; config {config}' if config else ''})", ""]
        rows = []
        for name in (*STAGE_NAMES, "end_to_end"):
            if name == "end_to_end":
                p, b = product.get("end_to_end_ms", {}), baseline.get("end_to_end_ms", {})
            else:
                p = product.get("stages_ms", {}).get(name, {})
                b = baseline.get("stages_ms", {}).get(name, {})
            if not p and not b:
                continue
            ratio = (b["p99"] / p["p99"]) if b.get("p99") and p.get("p99") else None
            label = f"**{name}**" if name == "end_to_end" else name
            rows.append([label, *(_f(p.get(k), ".2f") for k in ("p50", "p90", "p99", "max")),
                         *(_f(b.get(k), ".2f") for k in ("p50", "p99", "max")), _f(ratio, ".1f")])
        lines += _table(["stage (ms)", "product p50", "p90", "p99", "max", "baseline p50", "p99",
                         "max", "baseline / product p99"], rows)
        lines.append("")
        for target, s in (("product", product), ("baseline", baseline)):
            if not s:
                continue
            lines.append(
                f"- {target}: {s['frames']} frames measured; dropped {s['dropped']}, rejected "
                f"{s['rejected_total']}, sequence gaps {s['gaps']}, results missing "
                f"{s['missing_results']}, results dropped by the publisher "
                f"{_f(s['results_dropped'], 'd')}; sender achieved {s['sender_fps']:.1f} fps "
                f"(asked {fps:g}), largest send delay behind schedule "
                f"{s['sender_max_lag_s'] * 1e3:.1f} ms")
        lines += _dominant(product) + _warmup_lines(group["runs"]) + [""]
        target_rows += _latency_targets(group["settings"], product)
    return lines, target_rows


def _dominant(stats: dict[str, Any]) -> list[str]:
    stages = stats.get("stages_ms", {})
    if not stages:
        return []
    p50 = max(stages, key=lambda n: stages[n]["p50"] or 0.0)
    p99 = max(stages, key=lambda n: stages[n]["p99"] or 0.0)
    return [f"- product: the largest stage is {p50} at the median "
            f"({stages[p50]['p50']:.2f} ms) and {p99} at p99 ({stages[p99]['p99']:.2f} ms)"]


def _warmup_lines(runs: list[dict[str, Any]]) -> list[str]:
    out = []
    for target in ("product", "baseline"):
        warm = [r[target]["warmup"] for r in runs if target in r]
        if warm and warm[0]["frames"]:
            out.append(f"- {target} warm-up ({warm[0]['frames']} frames before the measured "
                       f"ones, first run): end-to-end p50 "
                       f"{_f(warm[0]['end_to_end_ms']['p50'])} ms, max "
                       f"{_f(warm[0]['end_to_end_ms']['max'])} ms")
    return out


def _latency_targets(settings: dict[str, Any], product: dict[str, Any]) -> list[list[str]]:
    t = LATENCY_TARGET
    if settings.get("size") != t["size"] or float(settings["fps"]) != t["fps"] or not product:
        return []
    e2e = product["end_to_end_ms"]
    enough = settings["frames"] >= t["min_frames"]
    where = f"{t['size']}² at {t['fps']:g} fps, {settings['frames']} frames"
    lossless = (product["dropped"] == 0 and product["gaps"] == 0
                and product["missing_results"] == 0 and product["rejected_total"] == 0)
    note = "" if enough else f" (fewer than the {t['min_frames']} frames the target asks)"
    return [
        [f"end-to-end p99 ≤ {t['p99_ms']:g} ms ({where})", f"{_f(e2e['p99'])} ms{note}",
         _verdict(e2e["p99"] is not None and e2e["p99"] <= t["p99_ms"])],
        [f"end-to-end max ≤ {t['max_ms']:g} ms ({where})", f"{_f(e2e['max'])} ms{note}",
         _verdict(e2e["max"] is not None and e2e["max"] <= t["max_ms"])],
        [f"zero dropped or lost frames ({where})",
         f"dropped {product['dropped']}, gaps {product['gaps']}, missing "
         f"{product['missing_results']}; sender {product['sender_fps']:.1f} fps", _verdict(
             lossless and product["sender_fps"] >= 0.97 * t["fps"])],
    ]


# -- throughput -----------------------------------------------------------------------------

def throughput_section(items: list[tuple[Path, dict[str, Any]]]) -> tuple[list[str], list[list]]:
    """Sustained fps and cost per pixel per size, per-stage cost at the top rate, targets."""
    if not items:
        return ["## Throughput", "", "No throughput run yet (`txmlive bench throughput`).",
                ""], []
    runs = [run for _, r in items for run in r["runs"]]
    sizes = sorted({int(s) for run in runs for t in run.values() for s in t})
    summary = summarize_throughput(runs, sizes)
    s0 = items[-1][1]["settings"]
    lines = ["## Throughput", "",
             f"Highest sustained rate per frame size, synthesized uint16 frames over TCP "
             f"loopback from a separate sender process; the product with `[ingest] "
             f"queue_policy = \"drop-oldest\"` so an overload shows as drops. A trial of "
             f"max({s0['min_frames']}, fps × {s0['trial_s']:g} s) frames is sustained when "
             f"every frame has a result, nothing was dropped or skipped in sequence, the "
             f"sender kept ≥ {s0['min_sender_share']:.0%} of the rate and end-to-end p99 ≤ "
             f"max({s0['latency_periods']:g} frame periods, {s0['latency_floor_ms']:g} ms). "
             f"The rate doubles until a trial fails, then bisects to within "
             f"{s0['tolerance']:.0%}. Cost per pixel = 1 / (fps × pixels). Median of "
             f"{summary['runs']} run(s) ({', '.join(p.name for p, _ in items)}).", ""]
    rows = []
    for row in summary["sizes"]:
        p, b = row.get("product", {}), row.get("baseline", {})
        rows.append([f"{row['size']}²", _f(p.get("max_fps"), ".1f"), _f(p.get("ns_per_px")),
                     _f(p.get("ns_per_px_vs_smallest")), _f(b.get("max_fps"), ".1f"),
                     _f(b.get("ns_per_px")), _f(row.get("product_over_baseline"), ".1f")])
    lines += _table(["frame", "product fps", "ns/px", "ns/px vs smallest", "baseline fps",
                     "ns/px", "product / baseline"], rows)
    lines += ["", "Per-stage medians (ms) at the highest sustained rate (first run); `own "
              "metrics` is the share of results whose metrics were measured on that very frame "
              "(the pipeline's metrics stage measures the newest frame when behind; the "
              "baseline measures every frame):", ""]
    best = [(target, size, found["at_max"]) for target in ("product", "baseline")
            for size in sizes if (found := runs[0].get(target, {}).get(str(size)))
            and found.get("at_max")]
    names = [n for n in STAGE_NAMES if any(n in at["stages_p50_ms"] for _, _, at in best)]
    stage_rows = [[f"{target} {size}²", _f(at["fps"], ".1f"),
                   *(_f(at["stages_p50_ms"].get(n)) for n in names),
                   _f(at["end_to_end_ms"]["p99"]), _f(at.get("own_metrics_fraction"), ".0%")]
                  for target, size, at in best]
    lines += _table(["run", "fps", *names, "e2e p99", "own metrics"], stage_rows)
    lines += ["", "Each search, trial by trial (fps asked → verdict; first run):", ""]
    for target in ("product", "baseline"):
        for size in sizes:
            found = runs[0].get(target, {}).get(str(size))
            if found:
                steps = ", ".join(f"{t['fps']:.0f}{'✓' if t['sustained'] else '✗'}"
                                  for t in found["trials"])
                lines.append(f"- {target} {size}²: {steps}")
    return lines + [""], _throughput_targets(summary)


def _throughput_targets(summary: dict[str, Any]) -> list[list[str]]:
    t = THROUGHPUT_TARGET
    by_size = {r["size"]: r for r in summary["sizes"]}
    rows = []
    at = by_size.get(t["size"], {})
    fps = at.get("product", {}).get("max_fps")
    if fps is not None:
        rows.append([f"sustained rate at {t['size']}² ≥ {t['min_fps']:g} fps", f"{fps:.1f} fps",
                     _verdict(fps >= t["min_fps"])])
    ratio = at.get("product_over_baseline")
    if ratio is not None:
        rows.append([f"product ≥ {t['min_ratio']:g}× the baseline's sustained fps at "
                     f"{t['size']}²", f"{ratio:.1f}×", _verdict(ratio >= t["min_ratio"])])
    lo, hi = t["cost_sizes"]
    costs = [r["product"]["ns_per_px"] for s, r in by_size.items()
             if lo <= s <= hi and r.get("product", {}).get("ns_per_px")]
    if lo in by_size and hi in by_size and len(costs) > 1:
        spread = max(costs) / min(costs)
        rows.append([f"cost per pixel within {t['cost_spread']:g}× from {lo}² to {hi}²",
                     f"{spread:.2f}× (max / min ns/px)", _verdict(spread <= t["cost_spread"])])
    return rows


# -- the file -------------------------------------------------------------------------------

def plots_section(reports: dict[str, list[tuple[Path, dict[str, Any]]]], plots_dir: Path,
                  results_path: Path) -> list[str]:
    """Draw the plots (when matplotlib is there) and link them from the results file."""
    lines = ["## Plots", ""]
    if not have_matplotlib():
        return lines + ["Not drawn: matplotlib is not installed here (it is optional; "
                        "`pip install matplotlib`, then `txmlive bench report` again). The "
                        "per-frame latencies behind them are in the latency JSON "
                        "(`per_frame`).", ""]
    from bench.latency import plot_latency
    from bench.throughput import plot_throughput

    drawn = []
    for path, report in reports["latency"]:
        s = report["settings"]
        png = plot_latency(report, plots_dir / f"{path.stem}.png")
        drawn.append((f"latency, {s['source']} at {s['fps']:g} fps: per-stage distribution and "
                      f"end-to-end over time", png))
    if reports["throughput"]:
        runs = [run for _, r in reports["throughput"] for run in r["runs"]]
        sizes = sorted({int(s) for run in runs for t in run.values() for s in t})
        merged = {"summary": summarize_throughput(runs, sizes)}
        drawn.append(("throughput and cost per pixel against frame size",
                      plot_throughput(merged, plots_dir / "throughput.png")))
    for title, path in drawn:
        lines += [f"![{title}]({os.path.relpath(path, results_path.parent)})", ""]
    return lines


def feedback_section(out_dir: Path) -> list[str]:
    """The newest ``txmlive bench feedback`` comparison, if there is one."""
    from bench.feedback import summary_lines

    newest = None
    for path in sorted(out_dir.glob("*.json"), key=lambda p: p.stat().st_mtime):
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(report, dict) and report.get("kind") == "feedback":
            newest = (path, report)
    if newest is None:
        return []
    path, report = newest
    return ["## Feedback against today's practice", "",
            f"Accuracy on the simulator, scored by its ground truth (`{path.name}`, "
            f"{report.get('started', 'time not recorded')}, code "
            f"{report.get('code') or 'unknown'}; `txmlive bench feedback`, see "
            "`bench/feedback.py` for the baselines).", "",
            *summary_lines(report), ""]


def render(out_dir: Path, results_path: Path, plots_dir: Path) -> str:
    """The whole Markdown text."""
    reports = load_reports(out_dir)
    kernel_lines, kernel_targets = kernels_section(reports["kernels"])
    latency_lines, latency_targets = latency_section(reports["latency"])
    throughput_lines, throughput_targets = throughput_section(reports["throughput"])
    targets = latency_targets + throughput_targets + kernel_targets
    lines = ["# txmlive benchmark results", "",
             "Generated by `txmlive bench report` from the JSON files in `bench/out/`; do not "
             "edit by hand. Reproduce with `txmlive bench kernels`, `txmlive bench latency`, "
             "`txmlive bench throughput`, `txmlive bench feedback`, then `txmlive bench "
             "report`.", ""]
    lines += machine_section(reports)
    lines += ["## Targets", ""]
    if targets:
        lines += _table(["target", "measured", "verdict"], targets)
    else:
        lines.append("No measurement matches a target's settings yet.")
    lines += [""] + latency_lines + throughput_lines + kernel_lines + feedback_section(out_dir)
    lines += plots_section(reports, plots_dir, results_path)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="txmlive bench report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR,
                        help="where the benchmark JSON files are")
    parser.add_argument("--results", type=Path, default=RESULTS_MD, help="Markdown to write")
    parser.add_argument("--plots-dir", type=Path, help="PNG plots (default: plots/ beside "
                        "the Markdown file)")
    args = parser.parse_args(argv)
    if not args.out_dir.is_dir():
        parser.error(f"--out-dir {args.out_dir} is not a directory")
    plots_dir = args.plots_dir or args.results.parent / "plots"
    text = render(args.out_dir, args.results, plots_dir)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text)
    print(f"wrote {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
