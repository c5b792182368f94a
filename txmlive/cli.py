"""The ``txmlive`` command line: the composition root that wires config, sources, pipeline,
publishers, recorder and replays together.

Every command takes ``--config FILE``; commands that produce a result take ``--json`` and then
print exactly one JSON object on stdout (status lines go to stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from txmlive.config import Config, ConfigError, load_config, render_config

if TYPE_CHECKING:
    from stream.metrics import MetricsEngine

log = logging.getLogger("txmlive")


class UsageError(Exception):
    """A command-line problem reported as one clear line (exit code 2)."""


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, _frame: Any) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return stop


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, default=_json_default), flush=True)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def status_line(status: dict[str, Any]) -> str:
    """One human line from a pipeline status dict."""
    c = status["counters"]
    lat = status["latency_ms"]
    return (
        f"fps {status.get('fps_now', status['fps']):7.1f} | latency p50 {_fmt(lat['p50'])} "
        f"p99 {_fmt(lat['p99'])} max {_fmt(lat['max'])} ms | recv {c['received']} "
        f"proc {c['processed']} drop {c['dropped']} rej {c['rejected_total']} "
        f"gaps {c['gaps']} uncorr {c['uncorrected']} | queue {c['queue_depth']}"
    )


# -- commands --------------------------------------------------------------------------------

def cmd_config(args: argparse.Namespace, config: Config) -> int:
    print(render_config(None if args.default else config))
    return 0


def _metrics_engine(config: Config) -> MetricsEngine:
    """The metrics engine configured from ``[metrics]`` (``[]``/0 mean "not set")."""
    from stream.metrics import MetricsConfig, MetricsEngine

    m = config.metrics
    try:
        return MetricsEngine(MetricsConfig(
            roi=tuple(m.roi) if m.roi else None, pixel_nm=m.pixel_nm,
            dr_nm=m.dr_nm or None, band_per_um=tuple(m.band_per_um), threshold=m.threshold,
            bin_factor=m.bin_factor, centroid_fraction=m.centroid_fraction))
    except ValueError as exc:
        raise ConfigError(f"[metrics] {exc}") from exc


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    from stream.correct import warmup
    from stream.pipeline import Pipeline
    from stream.publish import Publisher
    from stream.recorder import Recorder
    from stream.source import ZmqSource

    warmup()
    source = ZmqSource(args.connect or config.endpoints.frames,
                       socket_type=config.ingest.socket, rcvhwm=config.ingest.rcvhwm,
                       max_payload_bytes=int(config.ingest.max_payload_mb * 2**20))
    publisher = Publisher(args.results or config.endpoints.results,
                          args.preview or config.endpoints.preview)
    recorder = None
    if args.record:
        recorder = Recorder(args.record, flush_interval_s=config.recorder.flush_interval_s,
                            warn_backlog_frames=config.recorder.warn_backlog_frames,
                            attrs={"mode": "processed", "config": render_config(config)})
        recorder.start()
    pv_server = feedback = None
    if config.epics.pv_server and not args.no_pv:
        from hw.pvserver import PvServer

        pv_server = PvServer(args.pv_prefix or config.epics.pv_prefix,
                             args.ca_port or config.epics.pv_ca_port,
                             max_rate_hz=config.epics.pv_max_rate_hz)
        pv_server.start()
        publisher.add_listener(pv_server.update)
        from txmlive.feedback_cli import start_runtime

        loop_status: dict[str, Any] = {}

        class _States:
            """Loop states to the PV server and, for the viewer, into the previews."""

            @staticmethod
            def set_state(**values: Any) -> None:
                pv_server.set_state(**values)
                loop_status.update(values)

        feedback = start_runtime(config, pv_server, publisher, state=_States())

    def on_status(status: dict[str, Any]) -> None:
        print(status_line(status), file=sys.stderr, flush=True)
        if pv_server is not None:
            pv_server.update_status(status)

    engine = _metrics_engine(config)
    engine.warm_up((512, 512))  # compile (or load) every metric kernel before the first frame
    pipeline = Pipeline(source, publisher, config, metrics=engine,
                        recorder=recorder, max_frames=args.frames, on_status=on_status)
    if feedback is not None:
        pipeline.loop_status = loop_status
    stop = _stop_on_signals()
    print(f"txmlive run: ready; frames <- {source.url}, results -> "
          f"{args.results or config.endpoints.results}, preview -> "
          f"{args.preview or config.endpoints.preview}", file=sys.stderr, flush=True)
    try:
        summary = pipeline.run(stop)
    finally:
        source.close()
        if feedback is not None:
            feedback.stop()
        if pv_server is not None:
            pv_server.stop()
    if args.json:
        _print_json(summary)
    else:
        lat = summary["latency_ms"]
        print(f"processed {summary['frames']} frames at {summary['fps']:.1f} fps, latency p50 "
              f"{_fmt(lat['p50'])} p99 {_fmt(lat['p99'])} max {_fmt(lat['max'])} ms; counters "
              f"{json.dumps(summary['counters'])}", file=sys.stderr)
    return 1 if summary["errors"] else 0


def cmd_record(args: argparse.Namespace, config: Config) -> int:
    from stream.recorder import Recorder
    from stream.source import ZmqSource

    source = ZmqSource(args.connect or config.endpoints.frames,
                       socket_type=config.ingest.socket, rcvhwm=config.ingest.rcvhwm,
                       max_payload_bytes=int(config.ingest.max_payload_mb * 2**20))
    recorder = Recorder(args.out, flush_interval_s=config.recorder.flush_interval_s,
                        warn_backlog_frames=config.recorder.warn_backlog_frames,
                        attrs={"mode": "raw", "source": args.connect or config.endpoints.frames})
    recorder.start()
    stop = _stop_on_signals()
    counts = {"data": 0, "dark": 0, "flat": 0}
    next_status = time.monotonic() + config.status.interval_s
    try:
        while not stop.is_set():
            frame = source.recv(0.1)
            if frame is not None:
                if frame.kind == "end":
                    break
                meta = {"seq": frame.seq, "t_ns": frame.t_ns, "energy_ev": frame.energy_ev,
                        "exposure_s": frame.exposure_s, "positions": frame.positions,
                        "moving": frame.moving}
                # The received buffer is the ZMQ message: the recorder copies it into its pool.
                recorder.submit(frame.kind, frame.image, meta)
                counts[frame.kind] += 1
                if args.frames is not None and counts["data"] >= args.frames:
                    break
            if time.monotonic() >= next_status:
                next_status += config.status.interval_s
                print(f"recorded {counts} backlog {recorder.counters['backlog']} rejected "
                      f"{source.counters['rejected']}", file=sys.stderr, flush=True)
    finally:
        summary = recorder.close()
        source.close()
    out = {"frames": counts, "rejected": source.counters["rejected"], "recorder": summary}
    if args.json:
        _print_json(out)
    else:
        print(f"recorded {counts} into {summary.get('files')}", file=sys.stderr)
    return 0


def cmd_replay(args: argparse.Namespace, config: Config) -> int:
    from stream.readers import open_series
    from stream.replay import replay

    if args.fps is not None and args.realtime:
        raise UsageError("--fps and --realtime exclude each other")
    if (args.path is None) == (args.synthetic is None):
        raise UsageError("give either PATH or --synthetic SIZE")
    bind = args.bind or config.endpoints.frames
    if args.synthetic is not None:
        from stream.synth import synthetic_frames

        if args.loop or args.realtime:
            raise UsageError("--synthetic streams --frames frames once at --fps; no --loop or "
                             "--realtime")
        series = synthetic_frames((args.synthetic, args.synthetic), args.frames, seed=args.seed)
        print(f"sending {args.frames} synthesized {args.synthetic}x{args.synthetic} uint16 "
              f"frames → {bind}", file=sys.stderr)
    else:
        try:
            series = open_series(args.path)
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read {args.path}: {exc}") from exc
        print(f"replaying {args.path}: {len(series)} frames {series.counts} shape "
              f"{series.shape} {series.dtype} → {bind}", file=sys.stderr)
    summary = replay(series, bind, fps=args.fps, realtime=args.realtime, loop=args.loop,
                     stop=_stop_on_signals())
    if args.json:
        _print_json(summary)
    else:
        print(f"sent {summary}", file=sys.stderr)
    return 0


def cmd_sim(args: argparse.Namespace, config: Config) -> int:
    """The simulated beamline: a caproto IOC with motor records and a camera publishing frames."""
    from hw.sim.beamline import SimBeamline

    sim = config.sim
    settings = dict(
        prefix=args.prefix or config.epics.beamline_prefix,
        ca_port=args.ca_port or config.epics.beamline_ca_port,
        bind=args.bind or config.endpoints.frames,
        size=args.size or sim.size, fps=args.fps or sim.fps,
        energy_ev=args.energy_ev or sim.energy_ev,
        focus_offset_um=(sim.focus_offset_um if args.focus_offset_um is None
                         else args.focus_offset_um),
        beam_drift_px_per_s=(sim.beam_drift_px_per_s if args.beam_drift_px_per_s is None
                             else args.beam_drift_px_per_s),
        beam_jump_px=sim.beam_jump_px,
        beam_jump_interval_s=sim.beam_jump_interval_s or math.inf,
        vibration_nm=sim.vibration_nm if args.vibration_nm is None else args.vibration_nm,
        seed=sim.seed if args.seed is None else args.seed,
        sample=args.sample or sim.sample)
    try:
        beamline = SimBeamline(**settings)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    print(f"txmlive sim: IOC {settings['prefix']} on CA port {settings['ca_port']}, "
          f"{settings['size']}x{settings['size']} frames at {settings['fps']} fps -> "
          f"{settings['bind']}", file=sys.stderr, flush=True)
    summary = beamline.serve(_stop_on_signals())
    if args.json:
        _print_json(summary)
    return 0


def cmd_demo(args: argparse.Namespace, config: Config) -> int:
    """The whole loop on the simulated beamline (see :mod:`txmlive.demo`)."""
    from txmlive.demo import run_demo

    return run_demo(config, headless=args.headless, duration_s=args.duration, out=args.out,
                    size=args.size, fps=args.fps, as_json=args.json)


def _parse_roi(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        roi = [int(v) for v in text.split(",")]
    except ValueError as exc:
        raise UsageError(f"--roi must be ROW,COL,H,W integers, got {text!r}") from exc
    if len(roi) != 4:
        raise UsageError(f"--roi must be ROW,COL,H,W, got {text!r}")
    return roi


def cmd_metrics(args: argparse.Namespace, config: Config) -> int:
    """Offline metrics: one JSON object per image (per frame for stacks and series)."""
    import numpy as np

    from stream.correct import normalize
    from stream.readers import open_series

    roi = _parse_roi(args.roi)
    if roi is not None:
        config.metrics.roi = roi
    if args.dr_nm is not None:
        config.metrics.dr_nm = args.dr_nm
    status = 0
    for path in args.paths:
        try:
            series = open_series(path)
            frames = list(series)
        except (OSError, ValueError) as exc:
            print(f"txmlive metrics: cannot read {path}: {exc}", file=sys.stderr)
            status = 1
            continue
        darks = [f.image for f in frames if f.kind == "dark"]
        flats = [f.image for f in frames if f.kind == "flat"]
        if args.correct and not flats:
            print(f"txmlive metrics: {path} has no flat to --correct with", file=sys.stderr)
            status = 1
            continue
        engine = _metrics_engine(config)  # per file: the frame-to-frame shift restarts
        index = 0
        for frame in frames:
            if args.correct and frame.kind != "data":
                continue
            image = frame.image
            if args.correct:
                dark = np.stack(darks) if darks else np.zeros((1, *image.shape), np.float32)
                image = normalize(image, dark, np.stack(flats))
            pixel_nm = args.pixel_nm or frame.attrs.get("pixel_nm") or config.metrics.pixel_nm
            try:
                values = engine.compute_all(image, float(pixel_nm))
            except ValueError as exc:
                raise UsageError(f"{path} frame {index}: {exc}") from exc
            row = {"file": str(path), "frame": index, "kind": frame.kind,
                   "pixel_nm": float(pixel_nm), **values}
            index += 1
            if args.json:
                _print_json(row)
            else:
                print(f"{path} [{row['frame']}] {frame.kind}: resolution "
                      f"{_fmt(row['resolution_nm'])} ± {_fmt(row['resolution_err_nm'])} nm "
                      f"({row['psd_verdict']}), cut-off {_fmt(row['cutoff_per_um'], '.2f')} "
                      f"1/um, band {_fmt(row['band_power'], '.3g')}, centroid "
                      f"({_fmt(row['centroid_x_px'])}, {_fmt(row['centroid_y_px'])}) px, "
                      f"CV {_fmt(row['uniformity_cv'], '.3f')}")
    return status


def cmd_view(args: argparse.Namespace, config: Config) -> int:
    from viewers.live import run_viewer

    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError as exc:
        raise UsageError(f"--size must be WIDTHxHEIGHT, got {args.size!r}") from exc
    try:
        return run_viewer(args.connect or config.endpoints.preview, snapshot=args.snapshot,
                          frames=args.frames, size=(width, height))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


# -- parser ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="txmlive", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("bench", help="benchmarks: latency, throughput, kernels, report "
                                 "(txmlive bench --help)", add_help=False)

    def command(name: str, func: Callable[..., int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", metavar="FILE", help="TOML configuration file")
        p.set_defaults(func=func)
        return p

    p = command("config", cmd_config, "print the configuration (with comments)")
    p.add_argument("--default", action="store_true", help="the built-in defaults")

    p = command("run", cmd_run, "run the live pipeline on a frame stream")
    p.add_argument("--connect", metavar="URL", help="frames endpoint (PULL connects)")
    p.add_argument("--results", metavar="URL", help="results PUB endpoint to bind")
    p.add_argument("--preview", metavar="URL", help="preview PUB endpoint to bind")
    p.add_argument("--record", metavar="FILE", help="record processed frames to HDF5")
    p.add_argument("--frames", type=int, metavar="N", help="exit after N data frames")
    p.add_argument("--pv-prefix", metavar="PREFIX", help="PV server prefix (TXM:LIVE:)")
    p.add_argument("--ca-port", type=int, metavar="N", help="PV server CA port (5066)")
    p.add_argument("--no-pv", action="store_true", help="no PV server")
    p.add_argument("--json", action="store_true", help="print a JSON summary at exit")

    p = command("record", cmd_record, "record raw frames from a stream to HDF5")
    p.add_argument("--connect", metavar="URL", help="frames endpoint (PULL connects)")
    p.add_argument("--out", metavar="FILE", required=True, help="HDF5 file to write")
    p.add_argument("--frames", type=int, metavar="N", help="stop after N data frames")
    p.add_argument("--json", action="store_true", help="print a JSON summary at exit")

    p = command("replay", cmd_replay, "stream a recorded series as frames")
    p.add_argument("path", nargs="?",
                   help="Data Exchange/NeXus HDF5, TIFF folder or file, .xrm/.txrm, .npy")
    p.add_argument("--synthetic", type=int, metavar="SIZE",
                   help="instead of a file: synthesized SIZE x SIZE frames (5 darks, 5 flats)")
    p.add_argument("--frames", type=int, default=1000, metavar="N",
                   help="data frames to synthesize (with --synthetic)")
    p.add_argument("--seed", type=int, default=0, help="random seed (with --synthetic)")
    p.add_argument("--bind", metavar="URL", help="PUSH endpoint to bind")
    p.add_argument("--fps", type=float, help="send at this rate")
    p.add_argument("--realtime", action="store_true", help="send at the recorded rate")
    p.add_argument("--loop", action="store_true", help="repeat the data frames forever")
    p.add_argument("--json", action="store_true", help="print a JSON summary at exit")

    p = command("sim", cmd_sim, "simulated TXM beamline: EPICS IOC (caproto) + camera frames")
    p.add_argument("--prefix", help="IOC PV prefix (TXMSIM:)")
    p.add_argument("--ca-port", type=int, help="CA server port (5064)")
    p.add_argument("--bind", metavar="URL", help="frames PUSH endpoint to bind")
    p.add_argument("--size", type=int, help="detector size N (frames N x N)")
    p.add_argument("--fps", type=float, help="frame rate")
    p.add_argument("--energy-ev", type=float, help="start energy, eV")
    p.add_argument("--focus-offset-um", type=float, help="hidden focus offset, um")
    p.add_argument("--beam-drift-px-per-s", type=float, help="beam drift, px/s")
    p.add_argument("--vibration-nm", type=float, help="image vibration, nm RMS")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--sample", choices=("siemens", "battery", "blank", "weak_phase"))
    p.add_argument("--json", action="store_true", help="print a JSON summary at exit")

    p = command("metrics", cmd_metrics, "focus, resolution and beam metrics of image files")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="HDF5 (Data Exchange, NeXus), TIFF file or folder, .npy, .xrm/.txrm")
    p.add_argument("--pixel-nm", type=float, help="pixel size at the sample, nm")
    p.add_argument("--roi", metavar="ROW,COL,H,W", help="metrics ROI in full-frame px")
    p.add_argument("--dr-nm", type=float, help="ZP outermost zone width, nm (for na_fill)")
    p.add_argument("--correct", action="store_true",
                   help="flat-correct data frames with the file's darks/flats first")
    p.add_argument("--json", action="store_true", help="one JSON object per image")

    p = command("view", cmd_view, "live viewer of the preview stream (vispy)")
    p.add_argument("--connect", metavar="URL", help="preview endpoint (SUB connects)")
    p.add_argument("--snapshot", metavar="FILE", help="render offscreen and write a PNG")
    p.add_argument("--frames", type=int, metavar="N",
                   help="previews to wait for before the snapshot (or before closing)")
    p.add_argument("--size", default="1280x800", metavar="WxH", help="canvas size, px")

    p = command("demo", cmd_demo, "the whole loop on the simulated beamline: sim, pipeline, "
                                  "viewer; references, shaker, autofocus, beam feedback")
    p.add_argument("--headless", action="store_true", help="PNG snapshots instead of a window")
    p.add_argument("--duration", type=float, default=60.0, help="seconds, at least")
    p.add_argument("--out", metavar="DIR", help="snapshots, logs and config (default: a temp dir)")
    p.add_argument("--size", type=int, default=512, help="frame size, px")
    p.add_argument("--fps", type=float, default=20.0, help="frame rate")
    p.add_argument("--json", action="store_true", help="print a JSON summary at exit")

    from txmlive.feedback_cli import add_commands

    add_commands(sub, command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the benchmarks have their own parser (bench/cli.py)
        from bench.cli import main as bench_main

        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        config = load_config(args.config)
        return args.func(args, config)
    except (ConfigError, UsageError) as exc:
        print(f"txmlive {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
