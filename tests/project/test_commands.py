"""The README's two commands, CI and Binder stay consistent with each other and with the tutorials."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TUTORIALS = [
    "01_quickstart_images.ipynb",
    "02_text.ipynb",
    "03_tabular_groups.ipynb",
    "04_methods_compared.ipynb",
]


def _make_var(name: str) -> str:
    m = re.search(rf"^{name}\s*[:?]?=\s*(.*)$", (ROOT / "Makefile").read_text(), re.M)
    assert m, f"Makefile defines no {name}"
    return m.group(1).strip()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert re.search(r"^make test\b", (ROOT / ".ci/run").read_text(), re.M)


def test_demo_opens_the_quickstart_in_jupyterlab():
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "jupyter lab" in recipe and "$(QUICKSTART)" in recipe
    assert _make_var("QUICKSTART") == f"notebooks/{TUTORIALS[0]}"


def test_make_test_executes_the_tutorials():
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert "--nbval" in recipe and "notebooks" in recipe


def test_binder_installs_what_the_makefile_installs():
    post = (ROOT / "binder/postBuild").read_text()
    assert 'pip install --no-cache-dir -e ".[demo]"' in post
    assert "npm run build" in post
    for pkg in shlex.split(_make_var("NODEPS_ASSETS")):
        assert pkg in post, f"binder/postBuild does not install {pkg} (the Makefile does)"
    reqs = (ROOT / "binder/requirements.txt").read_text()
    assert "torch==" in reqs and "whl/cpu" in reqs  # never the multi-GB CUDA wheel


@pytest.mark.parametrize("name", TUTORIALS)
def test_tutorial_states_what_it_teaches_and_keeps_its_outputs(name):
    path = ROOT / "notebooks" / name
    assert path.is_file(), f"tutorial {name} is missing"
    nb = json.loads(path.read_text())
    first = nb["cells"][0]
    assert first["cell_type"] == "markdown" and len("".join(first["source"])) > 80
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(c.get("execution_count") for c in code), f"{name} is not saved executed"
    assert any(c.get("outputs") for c in code)
    src = "\n".join("".join(c["source"]) for c in code)
    assert not re.search(r"https?://", src), f"{name} reaches for the network"
    assert path.stat().st_size < 3_000_000, f"{name} is over 3 MB; keep figures small"


@pytest.mark.slow
def test_make_demo_serves_the_quickstart(tmp_path):
    """The README's first command, as written, on a free port without a browser: JupyterLab starts
    and serves the quickstart notebook."""
    import os
    import signal
    import socket
    import subprocess
    import time
    import urllib.request

    if not (ROOT / ".venv/bin/jupyter").exists():
        pytest.skip("make demo needs the .venv that make test creates")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = f"--no-browser --port {port} --ServerApp.token=nbattr-test --ServerApp.ip=127.0.0.1"
    log = open(tmp_path / "demo.log", "w")
    proc = subprocess.Popen(["make", "-s", "demo", f"JUPYTER_ARGS={args}"], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api/contents/{TUTORIALS[0]}?token=nbattr-test&content=0"
    try:
        end = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    info = json.load(r)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > end:
                    pytest.fail("make demo did not serve the quickstart:\n"
                                + (tmp_path / "demo.log").read_text()[-3000:])
                time.sleep(1)
        assert info["type"] == "notebook" and info["name"] == TUTORIALS[0]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()
