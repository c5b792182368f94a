"""`txmlive demo --headless`: the whole loop on the simulated beamline, scored against the
simulator's truth, leaving no process or port behind."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


def _bound_ports() -> set[int]:
    """Local ports with a listening TCP socket or a bound UDP socket (TIME_WAIT is no owner)."""
    ports = set()
    for table, listening in (("/proc/net/tcp", "0A"), ("/proc/net/udp", None)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if listening is None or fields[3] == listening:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.timeout(400)
def test_headless_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "txmlive.cli", "demo", "--headless", "--duration", "40",
         "--size", "256", "--out", str(out), "--json"],
        capture_output=True, text=True, timeout=380)
    if proc.returncode != 0:  # show the failing step's own log, named in the message
        logs = re.findall(r"its log: (\S+)", proc.stderr)
        detail = "".join(Path(p).read_text()[-4000:] for p in logs if Path(p).exists())
        pytest.fail(f"demo exited {proc.returncode}:\n{proc.stderr[-3000:]}\n{detail}")
    summary = json.loads(proc.stdout)
    af = summary["autofocus"]
    shaker = summary["shaker"]
    assert shaker["verdict"] == "resolved" and shaker["start_truth_cv"] > 0.15
    assert shaker["uniformity_cv"] <= 0.02 and shaker["truth_cv"] <= 0.02
    assert af["verdict"] == "resolved"
    assert abs(af["best_z_um"] - af["truth_z_um"]) <= af["dof_um"] / 10
    beam = summary["beam"]
    assert beam["samples"] >= 5 and beam["rms_error_px"] <= 1.0
    assert summary["snapshots"] and all(Path(p).stat().st_size > 10_000
                                        for p in summary["snapshots"])
    assert set(summary["exit_codes"].values()) == {0}
    assert _processes_mentioning(str(out)) == []
    config = tomllib.loads((out / "demo.toml").read_text())
    ports = {int(url.rsplit(":", 1)[1]) for url in config["endpoints"].values()}
    ports |= {config["epics"]["beamline_ca_port"], config["epics"]["pv_ca_port"]}
    assert not ports & _bound_ports()
