"""The benchmark scripts run and print every row they promise (what they measure is not tested:
speed is read from their output, never asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("captum")


def test_bench_captum_quick_prints_every_method_and_the_floor():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_captum.py"), "--quick", "--repeats", "1",
         "--steps", "4"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, check=True).stdout
    for label in ("IG gauss_legendre", "IG riemann_right", "DeepLIFT rescale", "SmoothGrad", "Occlusion",
                  "IG gauss_legendre, top-5", "Occlusion, top-5"):
        row = next(line for line in out.splitlines() if label in line)
        ours, theirs, ratio = (float(v) for v in re.findall(r"\d+\.\d+", row)[:3])
        assert ours > 0 and theirs > 0 and ratio > 0, row
        if label.startswith(("IG", "DeepLIFT")):  # also against Captum computing its delta
            cols = row.split()
            with_delta, ratio_delta = float(cols[-5]), float(cols[-4])
            assert with_delta > 0 and ratio_delta > 0, row
    floor = next(line for line in out.splitlines() if "IG time / (4 x one forward+backward" in line)
    assert float(floor.rsplit("=", 1)[1]) > 0
