"""txmlive commands as real child processes, for the end-to-end tests."""

from __future__ import annotations

import subprocess
import sys
import threading
import time


def spawn_cli(args: list[str], ready: str, log: list[str] | None = None,
              timeout_s: float = 120.0) -> subprocess.Popen:
    """Start ``txmlive ARGS`` and return once a stderr line contains ``ready``.

    stderr keeps being drained (into ``log`` when given) so the child never blocks on it;
    stdout stays a pipe for the caller (``communicate`` reads a ``--json`` summary).
    """
    proc = subprocess.Popen([sys.executable, "-m", "txmlive.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if ready in line or not line:
            break
    assert proc.poll() is None, proc.stderr.read()
    sink = log if log is not None else []
    threading.Thread(target=lambda: sink.extend(proc.stderr), daemon=True).start()
    return proc
