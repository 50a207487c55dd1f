import base64
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch
import traitlets

from nbattr.widget import Explain, codec
from nbattr.widget import explain as explain_mod

XSS = "<img src=x onerror=alert(1)>"


def maps(w):
    return codec.decode(w.map_data)


def test_image_widget_first_result_and_traits(cnn, image):
    w = Explain(cnn, image, labels=[f"c{i}" for i in range(10)])
    assert w.wait(30)
    assert w.kind == "image" and w.method == "integrated_gradients" and w.status == "idle"
    assert w.steps == "auto"  # the default: the engine's adaptive steps, |delta| within 1%
    assert w.map_data["dtype"] == "float32" and w.map_data["shape"] == [2, 16, 16]
    assert isinstance(w.map_data["view"], memoryview)
    assert w.image_data["shape"] == [16, 16, 4]
    r = w.receipt
    assert r["auto"] is True and r["params"]["rule"] == "clenshaw_curtis"
    s = r["steps"]
    assert s in (5, 9, 17, 33, 65, 129)  # the nested Clenshaw-Curtis grids up to AUTO_MAX_STEPS
    # α player: one uint8 buffer with per-frame scales, one frame per node; the curve as float32
    assert w.frames["dtype"] == "uint8" and w.frames["shape"] == [s, 16, 16]
    assert len(w.frames["scales"]) == s
    curve = codec.decode(w.curve)
    assert curve.shape == (3, s) and curve[0, 0] == 0 and curve[0, -1] == 1
    assert np.all(np.diff(curve[0]) > 0)
    assert r["method"] == "integrated_gradients" and r["label"] == f"c{w.target}"
    gap = abs(r["fx"] - r["fbase"])
    assert abs(r["delta"]) <= explain_mod.AUTO_TOL * gap + 1e-6
    # the curve's running (trapezoid) sum ends near F(x') + sum of attributions
    assert curve[2, -1] == pytest.approx(r["fbase"] + r["total"], abs=0.05 * gap + 1e-4)
    assert w.topk[0]["index"] == w.target and abs(sum(p["prob"] for p in w.topk)) <= 1.0 + 1e-6
    w.close()


def test_fixed_steps_give_evenly_spaced_trapezoid_frames(cnn, image):
    w = Explain(cnn, image, steps=32)
    assert w.wait(30)
    r = w.receipt
    assert w.steps == 32 and r["auto"] is False and r["steps"] == 32
    assert r["params"]["rule"] == "riemann_trapezoid"
    assert w.frames["shape"][0] == 32
    curve = codec.decode(w.curve)
    assert np.allclose(curve[0], np.linspace(0, 1, 32))
    # trapezoid IG: the cumulative sum ends exactly at F(x') + sum of attributions
    assert curve[2, -1] == pytest.approx(r["fbase"] + r["total"], abs=1e-4)
    # back to auto and to a fixed count again: each is its own view (and cache entry)
    w.steps = "auto"
    assert w.wait(30)
    assert w.receipt["auto"] is True and w.frames["shape"][0] == w.receipt["steps"]
    w.steps = 12
    assert w.wait(30)
    assert w.receipt["steps"] == 12 and w.frames["shape"][0] == 12
    # the cache holds the frames as the wire's uint8, not float32
    cached = w._controller.get_cached(w.key())
    assert cached["frames"]["dtype"] == "uint8" and cached["frames"] is w.frames
    for bad in ("Auto", 1, 2.5, True):
        with pytest.raises(ValueError, match="steps must be 'auto' or an int >= 2"):
            Explain(cnn, image, steps=bad)
    with pytest.raises(traitlets.TraitError):
        w.steps = "many"
    with pytest.raises(traitlets.TraitError):
        w.steps = 1
    w.close()


def test_auto_steps_on_a_path_method_without_an_adaptive_rule(cnn, image):
    w = Explain(cnn, image, method="interior_gradients")
    assert w.wait(30)
    assert w.steps == "auto" and w.receipt["auto"] is False
    assert w.receipt["steps"] == explain_mod.FIXED_STEPS == w.frames["shape"][0]
    w.method = "saliency"
    assert w.wait(30)
    assert w.receipt["steps"] is None and w.frames == {}
    w.close()


def test_auto_steps_stop_at_the_widget_cap_and_the_receipt_shows_it(cnn, image, monkeypatch):
    monkeypatch.setattr(explain_mod, "AUTO_TOL", 1e-12)  # unreachable in float32: the cap decides
    monkeypatch.setattr(explain_mod, "AUTO_MAX_STEPS", 9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w = Explain(cnn, image, prefetch=False)
        assert w.wait(30)
    assert w.receipt["steps"] == 9 == w.frames["shape"][0] and w.error == ""
    # the engine's warning is in the receipt (shown in the page), not on the kernel's stderr
    notes = w.receipt["notes"]
    assert len(notes) == 1 and "reached max_steps=9" in notes[0]
    assert not [c for c in caught if "max_steps" in str(c.message)]
    w.close()


def test_engine_warnings_reach_the_receipt_once(cnn, image):
    model = torch.nn.Sequential(cnn, torch.nn.Dropout(0.0)).train()  # p=0: deterministic, still warned
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w = Explain(model, image, method="saliency", prefetch=False)
        assert w.wait(30)
    notes = w.receipt["notes"]
    assert len(notes) == 1 and "training mode" in notes[0]
    assert not [c for c in caught if "training mode" in str(c.message)]
    model.eval()
    w.method = "gradient_x_input"
    assert w.wait(30) and w.receipt["notes"] == []
    w.close()


def test_trait_change_recomputes(cnn, image):
    w = Explain(cnn, image)
    w.wait(30)
    before = maps(w)
    seq = w.seq
    w.method = "saliency"
    assert w.wait(30)
    assert w.receipt["method"] == "saliency" and w.seq > seq
    assert not np.allclose(before, maps(w))
    assert w.frames == {} and w.curve == {}  # no α player for a non-path method
    w.target = w.topk[1]["index"]
    w.wait(30)
    assert w.receipt["target"] == w.topk[1]["index"]
    w.steps = 8
    w.method = "integrated_gradients"
    w.wait(30)
    assert w.frames["shape"][0] == 8
    w.baseline = "blur"
    w.wait(30)
    assert w.receipt["params"]["baseline"] == "blur"
    w.close()


def test_cache_hit_does_not_recompute(cnn, image):
    w = Explain(cnn, image)
    w.wait(30)
    first = maps(w)
    w.method = "saliency"
    w.wait(30)
    n = len(w._controller.computed)
    w.method = "integrated_gradients"  # cached: published at once, on this thread
    assert w.receipt["cached"] is True and w.receipt["method"] == "integrated_gradients"
    assert len(w._controller.computed) == n
    np.testing.assert_array_equal(maps(w), first)
    w.close()


def test_fifty_rapid_switches_end_on_the_last_choice(cnn, image):
    w = Explain(cnn, image, steps=8)
    w.wait(30)
    names = ["saliency", "gradient_x_input", "integrated_gradients", "smoothgrad"]
    targets = [p["index"] for p in w.topk[:3]]
    for i in range(50):
        w.method = names[i % len(names)]
        w.target = targets[i % len(targets)]
    assert w.wait(60)
    assert w.receipt["method"] == w.method == names[49 % 4]
    assert w.receipt["target"] == w.target == targets[49 % 3]
    expected = Explain(cnn, image, steps=8, method=w.method, target=w.target)
    expected.wait(30)
    np.testing.assert_allclose(maps(w), maps(expected), rtol=1e-5, atol=1e-7)
    w.close()
    expected.close()


def test_engine_error_is_shown_and_widget_stays_usable(cnn, image):
    w = Explain(cnn, image)
    w.wait(30)
    w.baseline = "no-such-baseline"
    w.wait(30)
    assert w.status == "error" and "no-such-baseline" in w.error
    w.method = "no-such-method"
    w.wait(30)
    assert "unknown method" in w.error
    w.method = "saliency"
    w.baseline = "zeros"
    w.wait(30)
    assert w.status == "idle" and w.error == "" and w.receipt["method"] == "saliency"
    w.close()


def test_text_view_keeps_html_tokens_literal(text_model):
    tokens = ["hello", XSS, "world", "&amp;"]
    ids = torch.tensor([3, 7, 11, 2])
    w = Explain(text_model, ids, tokens=tokens, layer=text_model.emb, methods=["integrated_gradients", "saliency"])
    assert w.wait(30) and w.error == ""
    assert w.kind == "text" and w.tokens == tokens  # sent as plain strings, escaped by nobody
    assert w.map_data["shape"] == [2, 4] and w.sign == "signed"
    assert "blur" not in w.baselines
    m = maps(w)
    assert m[1].sum() == pytest.approx(w.receipt["total"], abs=1e-5)
    png = w.png()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    w.close()


def test_text_view_with_a_padding_mask_in_forward_kwargs(text_model):
    """The mask reaches every model call; the padded tokens get nothing, the sum still adds up."""

    def masked(ids, mask):
        return text_model.head((torch.tanh(text_model.emb(ids)) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))

    ids, mask = torch.tensor([[3, 7, 11, 0, 0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]])
    w = Explain(masked, ids, tokens=["a", "b", "c", "[PAD]", "[PAD]"], layer=text_model.emb,
                forward_kwargs={"mask": mask}, methods=["integrated_gradients", "deeplift"])
    assert w.wait(30) and w.error == ""
    m = maps(w)
    assert np.abs(m[1][3:]).max() == 0 and np.abs(m[1][:3]).max() > 0
    assert m[1].sum() == pytest.approx(w.receipt["total"], abs=1e-5)
    assert abs(w.receipt["delta"]) < 1e-2 * abs(w.receipt["fx"] - w.receipt["fbase"])
    w.method = "deeplift"
    assert w.wait(30) and w.error == "" and abs(w.receipt["delta"]) < 1e-5
    w.close()


def test_receipt_notes_a_jump_at_the_baseline_but_not_a_plain_coarse_delta(text_model):
    """An RMSNorm over the embeddings with a zero baseline: more steps do not help, so the note stays;
    a merely coarse delta is left to the receipt's red mark."""

    def normed(ids):
        h = text_model.emb(ids)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-10)
        return text_model.head(torch.tanh(h).mean(1))

    ids = torch.tensor([3, 7, 11, 2])
    w = Explain(normed, ids, tokens=list("abcd"), layer=text_model.emb, steps=8, methods=["integrated_gradients"])
    assert w.wait(30) and w.error == ""
    assert any("jumps at the baseline" in n for n in w.receipt["notes"]), w.receipt["notes"]
    w.close()
    w = Explain(text_model, ids, tokens=list("abcd"), layer=text_model.emb, steps=2, methods=["integrated_gradients"])
    assert w.wait(30) and w.error == ""
    assert abs(w.receipt["delta"]) > 0.05 * abs(w.receipt["fx"] - w.receipt["fbase"])  # coarse: red in the page
    assert not any("more than 5%" in n for n in w.receipt["notes"]), w.receipt["notes"]
    w.close()


def test_operations_without_a_rule_are_one_badge_not_also_a_note():
    """The receipt lists them once: the badge (by name), with the engine's warning as its hover text."""
    torch.manual_seed(3)
    lin = torch.nn.Linear(4, 3)

    def model(x):
        return lin(torch.cumprod(torch.tanh(x), -1))  # cumprod has no DeepLIFT rule

    w = Explain(model, torch.randn(4), feature_names=list("abcd"), methods=["deeplift"])
    assert w.wait(30) and w.error == ""
    r = w.receipt
    assert r["unsupported"] == {"cumprod": 1}
    assert r["unsupported_note"].startswith("deeplift: no rule for cumprod")
    assert "completeness may not hold" in r["unsupported_note"]
    assert not any("no rule" in n for n in r["notes"])
    w.close()


def test_a_model_returning_an_output_object_gets_the_engines_hint(cnn, image):
    import nbattr

    class Output:  # as a Hugging Face ModelOutput
        def __init__(self, logits):
            self.logits = logits

    with pytest.raises(nbattr.InputError, match=r"returned Output: pass `lambda x: model\(x\).logits`"):
        Explain(lambda x: Output(cnn(x)), image)


def test_tabular_view(cnn):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).eval()
    w = Explain(model, torch.tensor([0.5, -1.0, 2.0, 0.1]), feature_names=["a", "b", "c", "d"])
    assert w.wait(30) and w.error == ""
    assert w.kind == "tabular" and w.map_data["shape"] == [2, 4] and w.feature_names == ["a", "b", "c", "d"]
    w.close()


def test_custom_baseline_and_methods_restriction(cnn, image):
    w = Explain(cnn, image, baseline=torch.full((1, 3, 16, 16), 0.5), methods=["saliency", "integrated_gradients"])
    assert w.methods == ["saliency", "integrated_gradients"] and w.baseline == "custom" and "custom" in w.baselines
    w.wait(30)
    assert w.receipt["params"]["baseline"] == "tensor"
    with pytest.raises(ValueError, match="unknown method"):
        Explain(cnn, image, methods=["nope"])
    w.close()


def test_per_method_options_reach_the_engine_and_the_receipt_shows_the_sampling_error(cnn, image):
    """Shapley sampling's delta is ~0 whatever the draws: the receipt shows its standard error."""
    import nbattr

    w = Explain(cnn, image, method="shapley_sampling",
                options={"shapley_sampling": {"permutations": 4, "seed": 5}, "occlusion": {"window": 8}})
    assert w.wait(60) and not w.error
    r = w.receipt
    assert r["params"]["permutations"] == 4 and r["params"]["seed"] == 5
    direct = nbattr.attribute(cnn, image[None], method="shapley_sampling", target=w.target, permutations=4, seed=5)
    st = r["stderr"]
    assert st["draws"] == 4 and st["of"] == "permutations"
    assert st["max"] == pytest.approx(float(direct.stderr.abs().max()), rel=1e-5)
    assert st["relative"] == pytest.approx(st["max"] / float(direct.attributions.abs().max()), rel=1e-5)
    assert abs(r["delta"]) < 1e-4 * max(1.0, abs(r["gap"]))  # however few orderings
    w.method = "occlusion"
    assert w.wait(30) and w.receipt["params"]["windows"] == 4 and w.receipt["stderr"] is None
    w.method = "smoothgrad"
    assert w.wait(30) and w.receipt["stderr"]["of"] == "samples" and w.receipt["stderr"]["draws"] == 50
    w.close()


@pytest.mark.parametrize("options, match", [
    ({"nope": {}}, "unknown method 'nope'"),
    ({"shapley_sampling": {"permutation": 3}}, r"has no option\(s\) \['permutation'\]; its options are: antithetic, feature_mask"),
    ({"integrated_gradients": {"steps": 8}}, r"\['steps'\] are the widget's own"),
    ({"occlusion": 8}, r"options\['occlusion'\] must be a dict"),
    ([("occlusion", {})], "options must map method names"),
])
def test_bad_per_method_options_are_named(cnn, image, options, match):
    with pytest.raises(ValueError, match=match):
        Explain(cnn, image, options=options)


def test_compare_mode_grid(cnn, image):
    w = Explain(cnn, image, steps=8, methods=["integrated_gradients", "saliency"])
    w.wait(30)
    w.compare = ["integrated_gradients", "saliency"]
    w.wait(30)
    assert set(w.compare_maps) == {"integrated_gradients", "saliency"}
    assert w.compare_maps["saliency"]["shape"] == [2, 16, 16]
    w.close()


def test_mimebundle_carries_png_and_save_plot(cnn, image, tmp_path):
    w = Explain(cnn, image)
    data, _meta = w._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in data
    assert base64.b64decode(data["image/png"])[:4] == b"\x89PNG"
    out = w.save(str(tmp_path / "x.png"))
    assert open(out, "rb").read(4) == b"\x89PNG"
    import matplotlib

    matplotlib.use("Agg")
    fig = w.plot()
    assert len(fig.axes) >= 2
    w.close()


def test_missing_bundle_gives_a_message_not_an_import_error(tmp_path):
    assert explain_mod._read("no-such-file.js", "FALLBACK") == "FALLBACK"
    assert "not built" in explain_mod._MISSING_ESM
    # a fresh interpreter with the static folder hidden still imports nbattr and builds a widget
    code = (
        "import pathlib, nbattr.widget.explain as e\n"
        "e.STATIC = pathlib.Path('/nonexistent')\n"
        "assert not e.bundle_present()\n"
        "import nbattr; print('ok', nbattr.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok nbattr" in out.stdout, out.stderr


@pytest.mark.parametrize("wait", [False, True])
def test_a_script_that_exits_with_a_widget_computing_exits_cleanly(wait):
    """A worker still in a torch call when the interpreter exits used to abort the process
    (std::terminate, exit status 134); now exit stops it at its next chunk and waits for it."""
    code = (
        "import torch\n"
        "from torch import nn\n"
        "from nbattr import Explain\n"
        "w = Explain(nn.Sequential(nn.Flatten(), nn.Linear(12, 6)).eval(), torch.randn(3, 2, 2))\n"
        + ("w.wait(60)\n" if wait else "")  # exit while the prefetch (or the request) runs
        + "print('exiting', w.status)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "exiting" in out.stdout, (out.returncode, out.stderr)
    assert "terminate called" not in out.stderr


# -- prefetch of the other top-k classes -------------------------------------------------------
def assert_same_payload(a, b):
    assert set(a) == set(b)
    for k in a:
        if k == "receipt":
            assert a[k] == b[k]
        elif k == "frames":  # the wire's uint8 frames: equal up to one quantisation step
            np.testing.assert_allclose(a[k]["scales"], b[k]["scales"], rtol=1e-6, atol=1e-9)
            qa, qb = codec.decode(a[k]).astype(int), codec.decode(b[k]).astype(int)
            assert np.abs(qa - qb).max() <= 1
        else:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", ["integrated_gradients", "saliency", "smoothgrad"])
def test_prefetch_caches_the_other_top_classes_equal_to_separate_runs(cnn, image, method):
    w = Explain(cnn, image, method=method, steps=8, labels=[f"c{i}" for i in range(10)])
    assert w.wait(30) and w.wait(30, prefetch=True)
    ctl = w._controller
    assert ctl.computed == [w.key()]  # the user's choice alone, first
    others = [p["index"] for p in w.topk if p["index"] != w.target]
    keys = [(method, "zeros", t, 8, ()) for t in others]
    assert ctl.prefetched == keys and ctl.prefetch_errors == []
    for t, k in zip(others, keys):
        assert_same_payload(ctl.get_cached(k), w._attribute_one(method, "zeros", t, 8))
    # clicking another top class is a cache hit, published at once on this thread
    seq = w.seq
    w.target = others[2]
    assert w.seq == seq + 1 and w.receipt["cached"] is True
    assert w.receipt["target"] == others[2] and w.receipt["label"] == f"c{others[2]}"
    assert len(ctl.computed) == 1
    expected = Explain(cnn, image, method=method, steps=8, target=others[2], prefetch=False)
    expected.wait(30)
    np.testing.assert_array_equal(maps(w), maps(expected))
    if method == "integrated_gradients":
        assert w.frames["scales"] == expected.frames["scales"]
        assert bytes(w.frames["view"]) == bytes(expected.frames["view"])
        np.testing.assert_array_equal(codec.decode(w.curve), codec.decode(expected.curve))
    w.close()
    expected.close()


def test_prefetch_of_text_over_an_embedding_layer(text_model):
    ids = torch.tensor([3, 7, 11, 2])
    w = Explain(text_model, ids, tokens=list("abcd"), layer=text_model.emb, steps=8)
    assert w.wait(30) and w.wait(30, prefetch=True)
    other = w.topk[1]["index"]
    k = ("integrated_gradients", "zeros", other, 8, ())
    assert k in w._controller.prefetched
    assert_same_payload(w._controller.get_cached(k), w._attribute_one("integrated_gradients", "zeros", other, 8))
    w.close()


def test_new_request_during_prefetch_is_served_and_ends_on_the_last_choice(cnn, image, monkeypatch):
    gate, started = threading.Event(), threading.Event()
    real = Explain._prefetch

    def slow_prefetch(self, key, stop):
        started.set()
        assert gate.wait(10)
        return real(self, key, stop)

    monkeypatch.setattr(Explain, "_prefetch", slow_prefetch)
    w = Explain(cnn, image, steps=8)
    assert w.wait(30) and started.wait(10)
    assert w.status == "idle" and w._controller.prefetching  # the first view is shown before the prefetch
    w.method = "saliency"  # arrives while the prefetch runs: pending, not lost
    w.target = w.topk[1]["index"]
    assert w.receipt["method"] == "integrated_gradients"
    gate.set()
    assert w.wait(30)
    assert w.receipt["method"] == "saliency" and w.receipt["target"] == w.topk[1]["index"]
    assert not w.receipt["cached"]
    # the prefetch saw the newer request and gave up: nothing of it was published, and the
    # saliency view was computed (then prefetched in turn)
    assert w.wait(30, prefetch=True)
    assert all(k[0] == "saliency" for k in w._controller.prefetched)
    assert w.receipt["method"] == "saliency" and w.receipt["target"] == w.topk[1]["index"]
    w.target = w.topk[3]["index"]
    assert w.receipt["cached"] is True and w.receipt["target"] == w.topk[3]["index"]
    w.close()


def test_request_for_a_class_being_prefetched_waits_for_it_not_recomputes(cnn, image, monkeypatch):
    gate, started = threading.Event(), threading.Event()
    real = Explain._prefetch

    def gated(self, key, stop):
        started.set()
        assert gate.wait(10)
        return real(self, key, lambda: False)  # finishes despite the waiting request

    monkeypatch.setattr(Explain, "_prefetch", gated)
    w = Explain(cnn, image, steps=8)
    assert w.wait(30) and started.wait(10)
    w.target = w.topk[1]["index"]
    gate.set()
    assert w.wait(30)
    assert w.receipt["target"] == w.topk[1]["index"] and w.receipt["cached"] is True
    assert len(w._controller.computed) == 1
    w.close()


def test_a_prefetch_gives_way_to_a_request_it_will_not_serve(cnn, image, monkeypatch):
    """The user switches method while the other classes are prefetched: the prefetch's engine
    call stops (Cancelled, at its next chunk; here before its first), the new method is computed
    at once, and no error is recorded."""
    started, outcome = threading.Event(), {}
    real = Explain._engine_call

    def spy(self, method, baseline, target, steps):
        if isinstance(target, torch.Tensor):  # the prefetch's multi-target call
            started.set()
            deadline = time.monotonic() + 10
            while self._controller.pending() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            try:
                return real(self, method, baseline, target, steps)
            except BaseException as e:
                outcome["error"] = type(e).__name__
                raise
        return real(self, method, baseline, target, steps)

    monkeypatch.setattr(Explain, "_engine_call", spy)
    w = Explain(cnn, image, steps=8)
    assert w.wait(30) and started.wait(10)
    w.method = "saliency"
    assert w.wait(30) and w.wait(30, prefetch=True)
    assert outcome.get("error") == "Cancelled"
    assert w.receipt["method"] == "saliency" and w._controller.prefetch_errors == []
    assert not any(k[0] == "integrated_gradients" for k in w._controller.prefetched)
    w.close()


def test_progress_is_published_while_computing(cnn, image):
    seen = []
    w = Explain(cnn, image, steps=64)
    w.observe(lambda ch: seen.append(ch["new"]), names="progress")
    w.method = "smoothgrad"
    assert w.wait(30) and w.wait(30, prefetch=True)  # no prefetch left to run into the next test
    assert seen[-1] == 1.0 and any(0 < v < 1 for v in seen)
    w.close()


def _spy_engine_targets(monkeypatch):
    """Record the target of each engine call the widget makes; returns (the list, the real attribute)."""
    calls = []
    real = explain_mod.attribute

    def spy(*a, **kw):
        calls.append(kw["target"])
        return real(*a, **kw)

    monkeypatch.setattr(explain_mod, "attribute", spy)
    return calls, real


def test_no_prefetch_for_methods_without_a_native_multi_target_path(cnn, image, monkeypatch):
    """Every built-in method has one; a user's registered method without it is not prefetched."""
    import nbattr
    from tests.engine.models import register_looped_method

    register_looped_method(monkeypatch, "plain_gradient")
    calls, _ = _spy_engine_targets(monkeypatch)
    w = Explain(cnn, image, methods=["deeplift", "plain_gradient", "saliency"], method="plain_gradient")
    assert not w.prefetchable("plain_gradient")
    assert all(w.prefetchable(m) for m in nbattr.methods() if m != "plain_gradient")
    assert w.wait(30) and w.wait(30, prefetch=True)
    assert w._controller.prefetched == [] and calls == [w.target]
    w.target = w.topk[1]["index"]
    w.wait(30)
    assert w.receipt["cached"] is False and len(w._controller.computed) == 2
    w.close()


@pytest.mark.parametrize("method", ["occlusion", "shapley_sampling"])
def test_perturbation_methods_compute_the_other_classes_in_the_same_call(cnn, image, method, monkeypatch):
    """Occlusion and Shapley sampling read all K scores off each forward: the chosen view's one
    engine call also gives the other top classes (cached, however long it took: no prefetch
    here), each equal to computing that class alone."""
    calls, real = _spy_engine_targets(monkeypatch)
    w = Explain(cnn, image, methods=[method, "saliency"], method=method,
                options={"shapley_sampling": {"permutations": 4}}, prefetch_after=0.0)
    assert w.wait(60) and w.wait(60, prefetch=True)
    assert len(calls) == 1 and calls[0].tolist() == [[p["index"] for p in w.topk]]
    assert len(w._controller.prefetched) == len(w.topk) - 1 and len(w._controller.computed) == 1
    opts = {"permutations": 4} if method == "shapley_sampling" else {}
    for p in w.topk[1:]:
        w.target = p["index"]
        assert w.wait(30)
        assert w.receipt["target"] == p["index"] and w.receipt["cached"] is True
        alone = real(cnn, image[None], method=method, target=p["index"], **opts)
        assert w.receipt["total"] == pytest.approx(float(alone.total()[0]), rel=1e-5, abs=1e-6)
    assert len(calls) == 1
    w.prefetch = False  # off: one class per call
    w.baseline = [b for b in w.baselines if b != w.baseline][0]
    assert w.wait(60)
    assert len(calls) == 2 and calls[1] == w.target
    w.close()


def test_deeplift_prefetches_the_other_classes(cnn, image):
    w = Explain(cnn, image, methods=["deeplift", "saliency"], method="deeplift")
    assert w.wait(30) and w.wait(30, prefetch=True)
    assert len(w._controller.prefetched) == len(w.topk) - 1
    w.target = w.topk[2]["index"]
    assert w.wait(30)
    assert w.receipt["target"] == w.topk[2]["index"] and w.receipt["cached"] is True
    w.close()


def test_prefetch_option_off_and_compare_mode(cnn, image):
    w = Explain(cnn, image, steps=8, prefetch=False)
    assert w.wait(30) and w.wait(30, prefetch=True)
    assert w._controller.prefetched == []
    w.prefetch = True  # a plain attribute, read at each prefetch
    w.method = "saliency"
    assert w.wait(30) and w.wait(30, prefetch=True)
    assert len(w._controller.prefetched) == len(w.topk) - 1
    w.prefetch = False
    w.method = "gradient_x_input"
    assert w.wait(30) and w.wait(30, prefetch=True)
    assert all(k[0] == "saliency" for k in w._controller.prefetched)
    w.prefetch = True
    n = len(w._controller.prefetched)
    w.compare = ["saliency", "integrated_gradients"]  # compare grids are not prefetched
    assert w.wait(30) and w.wait(30, prefetch=True)
    assert len(w._controller.prefetched) == n
    w.close()


def test_prefetch_skipped_when_the_view_was_slow(cnn, image):
    w = Explain(cnn, image, steps=8, prefetch_after=0.0)
    assert w.wait(30) and w.wait(30, prefetch=True)
    assert w._controller.prefetched == []
    w.close()


def test_prefetch_error_does_not_break_the_widget(cnn, image, monkeypatch):
    real = explain_mod.attribute

    def broken_multi(*a, **kw):
        if isinstance(kw["target"], torch.Tensor):
            raise RuntimeError("multi-target exploded")
        return real(*a, **kw)

    monkeypatch.setattr(explain_mod, "attribute", broken_multi)
    w = Explain(cnn, image, steps=8)
    assert w.wait(30) and w.wait(30, prefetch=True)
    assert w._controller.prefetch_errors == ["RuntimeError: multi-target exploded"]
    assert w.status == "idle" and w.error == ""  # never shown: the prefetch is a background nicety
    w.target = w.topk[1]["index"]  # computed the ordinary way
    assert w.wait(30)
    assert w.status == "idle" and w.error == "" and w.receipt["target"] == w.topk[1]["index"]
    assert w.receipt["cached"] is False
    w.close()


class _LogLastClass(torch.nn.Module):
    """Three finite linear classes (scores ~20) and a fourth, log(x0) (clamped at 0): occlusion with a
    zero baseline makes the fourth class's drops infinite, the others' stay finite."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        return torch.cat([20 + self.lin(x), torch.log(x[:, :1].clamp_min(0))], 1)


@pytest.mark.parametrize("prefetch", [True, False])
def test_a_non_finite_map_of_one_class_is_noted_on_that_class_only(prefetch):
    """Several classes from one engine call: the non-finite note (counted over all of them by the
    engine) is decided per class, as when each class is computed alone."""
    x = torch.tensor([[148.0, 1.0, 2.0, 3.0]])
    w = Explain(_LogLastClass().eval(), x, methods=["occlusion", "saliency"], method="occlusion", topk=4,
                prefetch=prefetch)
    assert w.wait(30) and not w.error
    notes = {}
    for p in w.topk:
        w.target = p["index"]
        assert w.wait(30) and not w.error
        notes[p["index"]] = [n for n in w.receipt["notes"] if "not finite" in n]
    assert notes[3] and "4 of 4 attributions" in notes[3][0]
    assert all(not notes[c] for c in (0, 1, 2)), notes
    w.close()


def test_one_output_model_with_a_target_that_is_ignored():
    """(N,) scores take no class: a target other than 0 is ignored (as by the engine), and the
    classes computed along with it are none."""
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 1)

    def scalar(z):
        return net(z).squeeze(-1)

    for method in ("occlusion", "shapley_sampling", "saliency"):
        w = Explain(scalar, torch.randn(5), methods=[method], method=method, target=1)
        assert w.wait(30) and w.wait(30, prefetch=True)
        assert not w.error, (method, w.error)
        assert w._controller.prefetched == [] and w._controller.prefetch_errors == []
        w.close()


def test_the_constructor_leaves_the_model_as_found_and_names_a_dtype_mismatch():
    """Explain's own forward (its list of top classes) runs guarded: a model in training mode keeps
    its batch-norm statistics; a float64 or uint8 image gets the engine's hint, not torch's error."""
    import nbattr

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)).train()
    bn = net[1]
    before = (bn.running_mean.clone(), int(bn.num_batches_tracked))
    w = Explain(net, torch.rand(3, 8, 8), methods=["saliency"], method="saliency")
    assert w.wait(30) and not w.error  # (the engine's training-mode warning goes to the receipt)
    w.close()
    assert torch.equal(bn.running_mean, before[0]) and int(bn.num_batches_tracked) == before[1] and net.training
    with pytest.raises(nbattr.InputError, match=r"pass x.to\(torch.float32\)"):
        Explain(net.eval(), torch.rand(3, 8, 8, dtype=torch.float64))
    with pytest.raises(nbattr.InputError, match=r"x.float\(\) / 255"):
        Explain(net, torch.randint(0, 255, (3, 8, 8), dtype=torch.uint8))


def test_an_empty_method_list_is_named(cnn, image):
    with pytest.raises(ValueError, match="methods is empty"):
        Explain(cnn, image, methods=[])


def test_token_ids_without_their_strings_are_a_text_view(text_model):
    """Token ids with layer= but no tokens= were taken for an image (and failed); the ids label the tokens."""
    ids = torch.tensor([3, 1, 4, 1])
    w = Explain(text_model, ids, layer=text_model.emb, methods=["integrated_gradients", "saliency"])
    assert w.wait(30) and not w.error
    assert w.kind == "text" and w.tokens == ["3", "1", "4", "1"]
    w.close()
