"""nbattr.watch: progress of the chunked passes, and cancellation that leaves the model as found."""

from __future__ import annotations

import threading

import pytest
import torch

import nbattr
from nbattr.engine.batching import run_chunked

from .models import cnn, mode_stack_empty, register_looped_method
from .test_problem import _same, _state

pytestmark = pytest.mark.usefixtures("float64")

# the options that make each method small and chunked
OPTIONS = {
    "integrated_gradients": {"steps": 8},
    "interior_gradients": {"steps": 8},
    "smoothgrad": {"samples": 8},
    "occlusion": {"window": 4},
    "shapley_sampling": {"permutations": 2},
}


def _quadrants():
    m = torch.zeros(1, 3, 16, 16, dtype=torch.long)
    m[..., :8, 8:], m[..., 8:, :8], m[..., 8:, 8:] = 1, 2, 3
    return m


def _x(n=3):
    torch.manual_seed(0)
    return torch.rand(n, 3, 16, 16, dtype=torch.float64)


def test_progress_counts_every_row_of_a_pass_in_order():
    seen = []
    with nbattr.watch(progress=lambda done, total: seen.append((done, total))):
        run_chunked(10, lambda rows: None, batch_size=3)
    assert seen == [(3, 10), (6, 10), (9, 10), (10, 10)]


def test_progress_of_integrated_gradients_reaches_its_total():
    seen = []
    with nbattr.watch(progress=lambda done, total: seen.append((done, total))):
        r = nbattr.attribute(cnn(), _x(), steps=8, batch_size=5)
    totals = {t for _, t in seen}
    assert totals == {3 * 8}  # one pass over N x steps rows
    assert [d for d, _ in seen] == [5, 10, 15, 20, 24]
    assert r.attributions.shape == (3, 3, 16, 16)


@pytest.mark.parametrize("method", sorted(nbattr.methods()))
def test_a_cancelled_call_raises_and_leaves_the_model_as_found(method):
    """Cancel as soon as the first chunk is done (or at once for a method that has no chunks):
    the call raises Cancelled, no mode or hook is left, the model is as it was."""
    model = cnn()
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    before = _state(model)
    done = []
    kw = dict(OPTIONS.get(method, {}))
    if method == "shapley_sampling":
        kw["feature_mask"] = _quadrants()
    if nbattr.methods()[method].needs_baseline:
        kw.setdefault("baseline", "zeros")
    with nbattr.watch(progress=lambda d, t: done.append(d), cancel=lambda: bool(done)):
        # saliency and gradient x input on a few rows run without chunks: cancelled up front
        first = method in ("saliency", "gradient_x_input")
        if first:
            done.append(0)
        with pytest.raises(nbattr.Cancelled, match="cancelled"):
            nbattr.attribute(model, _x(6), method=method, batch_size=2, **kw)
    assert mode_stack_empty()
    _same(before, _state(model))
    # and the model still works, and so does nbattr outside the block
    r = nbattr.attribute(model, _x(2), method=method, **kw)
    assert torch.isfinite(r.attributions).all()


def test_cancel_is_asked_before_each_chunk_and_stops_the_work():
    calls = []
    asked = []

    def cancel():
        asked.append(len(calls))
        return len(calls) == 2

    with nbattr.watch(cancel=cancel), pytest.raises(nbattr.Cancelled):
        run_chunked(10, lambda rows: calls.append(rows), batch_size=3)
    assert asked == [0, 1, 2] and len(calls) == 2


def test_blocks_nest_and_belong_to_their_thread():
    outer, inner = [], []
    with nbattr.watch(progress=lambda d, t: outer.append(d)):
        with nbattr.watch(progress=lambda d, t: inner.append(d)):
            run_chunked(4, lambda rows: None, batch_size=2)
        run_chunked(2, lambda rows: None, batch_size=2)
    assert inner == [2, 4] and outer == [2]
    # a thread's work is not cancelled by another thread's block
    result = {}

    def work():
        result["r"] = nbattr.attribute(cnn(), _x(2), steps=4)

    with nbattr.watch(cancel=lambda: True):
        th = threading.Thread(target=work)
        th.start()
        th.join()
        with pytest.raises(nbattr.Cancelled):
            nbattr.attribute(cnn(), _x(2), steps=4)
    assert result["r"].attributions.shape == (2, 3, 16, 16)
    run_chunked(2, lambda rows: None, batch_size=1)  # outside any block: nothing is asked


def test_several_targets_without_a_native_path_are_cancelled_between_targets(monkeypatch):
    method = register_looped_method(monkeypatch)
    seen = []
    with nbattr.watch(cancel=lambda: len(seen) > 0, progress=lambda d, t: seen.append(d)):
        with pytest.raises(nbattr.Cancelled):
            nbattr.attribute(cnn(), _x(2), method=method, target="top3", batch_size=100)
    assert len(seen) == 1  # the one chunk of the first target, then stopped


def test_an_inner_block_keeps_what_it_leaves_out():
    seen, stop = [], []
    with nbattr.watch(progress=lambda d, t: seen.append(d), cancel=lambda: bool(stop)):
        with nbattr.watch(warn=lambda m: None):  # only warn: progress and cancel stay the outer's
            run_chunked(4, lambda rows: None, batch_size=2)
            stop.append(1)
            with pytest.raises(nbattr.Cancelled):
                run_chunked(2, lambda rows: None, batch_size=1)
    assert seen == [2, 4]


def test_warn_receives_the_engine_warnings_instead_of_python(recwarn):
    import warnings

    notes = []
    net = torch.nn.Sequential(cnn(), torch.nn.Dropout(0.0)).train()
    with nbattr.watch(warn=notes.append):
        nbattr.attribute(net, _x(1), method="saliency")
        nbattr.attribute(cnn(), _x(1), steps="auto", tol=1e-12, max_steps=5)
    assert [type(n) for n in notes] == [nbattr.TrainingModeWarning, nbattr.MaxStepsWarning]
    assert "training mode" in str(notes[0]) and "reached max_steps=5" in str(notes[1])
    assert len(recwarn) == 0
    # outside a block: a UserWarning at the caller's line
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nbattr.attribute(net, _x(1), method="saliency")
    assert [c.filename for c in caught] == [__file__]


def test_each_kind_of_warning_is_its_own_category_and_can_be_silenced():
    """Users silence one kind by category, not by matching message text."""
    import warnings

    assert issubclass(nbattr.CoarseDeltaWarning, nbattr.CompletenessWarning)
    assert issubclass(nbattr.BaselineJumpWarning, nbattr.CompletenessWarning)
    assert all(issubclass(c, nbattr.NbattrWarning) and issubclass(c, UserWarning)
               for c in (nbattr.CompletenessWarning, nbattr.MissingRuleWarning, nbattr.TrainingModeWarning,
                         nbattr.NonFiniteWarning, nbattr.MaxStepsWarning))
    net = torch.nn.Sequential(cnn(), torch.nn.Dropout(0.0)).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=nbattr.MaxStepsWarning)
        nbattr.attribute(net, _x(1), steps="auto", tol=1e-12, max_steps=5)
    assert [c.category for c in caught] == [nbattr.TrainingModeWarning]
