"""Runs the JS unit tests (node's test runner: codec and colormap) as part of plain `pytest`."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

JS = Path(__file__).resolve().parents[2] / "js"


@pytest.mark.skipif(shutil.which("node") is None and not os.environ.get("CI"),
                    reason="node is not installed (in CI its absence fails this test)")
def test_js_unit_tests_pass():
    out = subprocess.run(["node", "--test", "test/"], cwd=JS, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "# fail 0" in out.stdout
