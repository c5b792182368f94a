"""``txmlive bench ...`` and ``python -m bench ...``: the benchmark commands.

- ``latency``: per-stage and end-to-end latency of a real ``txmlive run`` process and of the
  baseline on a replayed stream (:mod:`bench.latency`);
- ``throughput``: highest sustained fps per frame size and the cost per pixel, product and
  baseline (:mod:`bench.throughput`);
- ``kernels``: per-kernel times against plain numpy and the memory-copy floor
  (:mod:`bench.kernels`);
- ``feedback``: the feedback procedures against today's practice on the simulator, scored by
  its ground truth (accuracy, not speed; :mod:`bench.feedback`);
- ``report``: ``bench/RESULTS.md`` from the JSON files in ``bench/out/`` (:mod:`bench.report`).

Each writes JSON to ``bench/out/`` by default; ``txmlive bench COMMAND -h`` lists its options.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

COMMANDS = ("latency", "throughput", "kernels", "feedback", "report")


def _command(name: str) -> Callable[[list[str] | None], int]:
    # imported on demand, so only the chosen command's modules load
    if name == "latency":
        from bench.latency import main
    elif name == "throughput":
        from bench.throughput import main
    elif name == "kernels":
        from bench.kernels import main
    elif name == "feedback":
        from bench.feedback import main
    else:
        from bench.report import main
    return main


def main(argv: list[str] | None = None) -> int:
    """Run one benchmark command; ``argv`` is ``[COMMAND, *its options]``."""
    parser = argparse.ArgumentParser(prog="txmlive bench", description=__doc__.split("\n\n")[0],
                                     epilog="commands: " + ", ".join(COMMANDS))
    parser.add_argument("command", choices=COMMANDS, help="benchmark to run")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its options (COMMAND -h)")
    args = parser.parse_args(argv)
    return _command(args.command)(args.args)
