"""`txmlive metrics`: one JSON object per image with the documented keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stream.metrics import METRIC_KEYS
from tests.synthetic import gaussian_blur, poisson_image, siemens_star

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KEYS = {"file", "frame", "cutoff_per_um", "resolution_nm", "resolution_err_nm", "cutoff_x_per_um",
        "cutoff_y_per_um", "band_power", "normalized_variance", "brenner", "tenengrad",
        "vollath_f4", "centroid_x_px", "centroid_y_px", "mean_counts", "uniformity_cv",
        "na_fill"}


def _metrics(*args: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "txmlive.cli", "metrics", "--json", *args],
                         capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def test_stack_gives_one_object_per_frame_and_blur_lowers_resolution(tmp_path):
    star = siemens_star((256, 256), pixel_nm=10.0, smallest_nm=30.0)
    stack = np.stack([poisson_image(gaussian_blur(star, sigma_nm, 10.0), 1000.0, seed)
                      for seed, sigma_nm in enumerate((10.0, 20.0, 40.0))])
    path = tmp_path / "stack.npy"
    np.save(path, stack)
    rows = _metrics(str(path), "--pixel-nm", "10", "--dr-nm", "25", "--roi", "0,0,256,256")
    assert [r["frame"] for r in rows] == [0, 1, 2]
    assert KEYS <= set(rows[0]) and set(METRIC_KEYS) <= set(rows[0])
    res = [r["resolution_nm"] for r in rows]
    assert res[0] < res[1] < res[2]
    assert rows[0]["na_fill"] is not None and rows[0]["pixel_nm"] == 10.0


def test_real_files():
    xrm = DATA / "xradia-txm" / "test_chip00.xrm"
    star = DATA / "neutron-siemens-star" / "siemens_star.tif"
    if not xrm.exists() or not star.exists():
        pytest.skip(f"real data not found under {DATA}")
    rows = _metrics(str(xrm), str(star))
    assert [(Path(r["file"]).name, r["kind"]) for r in rows] == [
        ("test_chip00.xrm", "flat"), ("test_chip00.xrm", "data"), ("siemens_star.tif", "data")]
    chip = rows[1]
    assert chip["psd_verdict"] == "resolved" and chip["resolution_nm"] > 2 * chip["pixel_nm"]
    assert all(KEYS <= set(r) for r in rows)


def test_bad_input_is_a_clear_error(tmp_path):
    bad = tmp_path / "nothing.npy"
    bad.write_bytes(b"not numpy")
    proc = subprocess.run([sys.executable, "-m", "txmlive.cli", "metrics", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "cannot read" in proc.stderr and str(bad) in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "txmlive.cli", "metrics", str(bad), "--roi",
                           "1,2"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--roi" in proc.stderr
