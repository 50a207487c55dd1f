"""tests/conftest.py: in CI a skip is a failure unless no install could remove its reason."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

SAMPLE = '''
import pytest

def test_missing_asset():
    pytest.skip("demo assets missing")

@pytest.mark.skipif(True, reason="needs a CUDA device")
def test_gpu():
    pass
'''


def _run(tmp_path: Path, ci: bool) -> subprocess.CompletedProcess:
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
                           str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_an_unexplained_skip_fails_in_ci_and_a_missing_gpu_does_not(tmp_path: Path) -> None:
    ci = _run(tmp_path, ci=True)
    assert ci.returncode == 1, ci.stdout
    assert "1 failed, 1 skipped" in ci.stdout and "skipped in CI" in ci.stdout
    local = _run(tmp_path, ci=False)
    assert local.returncode == 0 and "2 skipped" in local.stdout, local.stdout
