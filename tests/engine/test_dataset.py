"""attribute_dataset: files equal a direct attribute call, resuming skips finished chunks, torchrun."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import nbattr
from nbattr.engine import dataset as ds
from nbattr.engine.dataset import attribute_dataset, load

from .models import CallCounter, cnn, mlp, text

pytestmark = pytest.mark.usefixtures("float64")

TORCHRUN = Path(sys.executable).with_name("torchrun")


def data(n: int = 10, d: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g)


def assert_same_as(stored: ds.DatasetAttributions, direct: nbattr.Attribution, rtol: float = 1e-12,
                   atol: float = 1e-13) -> None:
    pairs = [("attributions", direct.attributions), ("target", direct.target), ("outputs", direct.outputs),
             ("baseline_outputs", direct.baseline_outputs), ("delta", direct.delta), ("stderr", direct.stderr)]
    for name, want in pairs:
        got = getattr(stored, name)
        if want is None:
            assert got is None, name
            continue
        np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=rtol, atol=atol, err_msg=name)


def assert_same_files(a: ds.DatasetAttributions, b: ds.DatasetAttributions, exact: bool = False) -> None:
    for name in ("attributions", "target", "outputs", "baseline_outputs", "delta", "stderr"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is None:
            continue
        if exact:
            np.testing.assert_array_equal(x, y, err_msg=name)
        else:
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14, err_msg=name)


# -- results equal nbattr.attribute on the whole tensor ---------------------------------------------
@pytest.mark.parametrize("chunk_size", [1, 3, 10, 64])
def test_tensor_equals_direct_attribute(tmp_path: Path, chunk_size: int) -> None:
    m, x = mlp(0), data(10)
    r = attribute_dataset(m, x, out=tmp_path / "a", chunk_size=chunk_size, steps=8, progress=False)
    direct = nbattr.attribute(m, x, steps=8)
    assert r.complete and len(r) == 10 and r.method == "integrated_gradients"
    assert_same_as(r, direct)
    # the files are plain .npy: numpy and torch read them directly
    a = np.load(tmp_path / "a" / "attributions.npy", mmap_mode="r")
    torch.testing.assert_close(torch.from_numpy(np.array(a)), direct.attributions, rtol=1e-12, atol=1e-13)
    assert np.load(tmp_path / "a" / "targets.npy").dtype == np.int64
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert index["num_examples"] == 10 and index["chunk_size"] == chunk_size
    assert index["complete"] == list(range(-(-10 // chunk_size)))
    assert index["settings"]["options"]["steps"] == 8 and index["nbattr_version"]
    assert not list((tmp_path / "a" / "chunks").iterdir())  # markers folded into the index


def test_method_without_baseline_writes_no_baseline_files(tmp_path: Path) -> None:
    m, x = mlp(2), data(7)
    r = attribute_dataset(m, x, "saliency", out=tmp_path, chunk_size=3, target=1, progress=False)
    assert_same_as(r, nbattr.attribute(m, x, method="saliency", target=1))
    assert r.baseline_outputs is None and r.delta is None
    assert not (tmp_path / "delta.npy").exists() and not (tmp_path / "baseline_outputs.npy").exists()
    assert set(r.tensors()) == {"attributions", "target", "outputs"}


def test_float32_model_keeps_float32_files(tmp_path: Path) -> None:
    m, x = mlp(0).float(), data(5).float()
    r = attribute_dataset(m, x, out=tmp_path, chunk_size=2, steps=4, progress=False)
    assert r.attributions.dtype == np.float32
    # float32: chunks of 2 rows and one call of 5 rows round matmuls differently (BLAS blocking)
    assert_same_as(r, nbattr.attribute(m, x, steps=4), rtol=1e-5, atol=1e-7)


class Pairs(Dataset):
    """Items (x, label) or dicts {"x": x, "label": label}."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, as_dict: bool = False) -> None:
        self.x, self.y, self.as_dict = x, y, as_dict

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        if self.as_dict:
            return {"x": self.x[i], "label": int(self.y[i])}
        return self.x[i], int(self.y[i])


@pytest.mark.parametrize("as_dict", [False, True])
def test_dataset_items_with_label_target(tmp_path: Path, as_dict: bool) -> None:
    m, x = mlp(3), data(9)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 1])
    r = attribute_dataset(m, Pairs(x, y, as_dict), out=tmp_path, chunk_size=4, target="label",
                          baseline=0.5, steps=6, progress=False)
    direct = nbattr.attribute(m, x, target=y, baseline=0.5, steps=6)
    assert_same_as(r, direct)
    np.testing.assert_array_equal(r.target, y.numpy())


def test_dataloader_gives_chunk_size_and_collate(tmp_path: Path) -> None:
    m, x = mlp(4), data(11)
    y = torch.arange(11) % 4
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)
    r = attribute_dataset(m, loader, out=tmp_path, target="label", steps=5, progress=False, fsync=False)
    assert r.index["chunk_size"] == 4 and r.index["num_chunks"] == 3 and r.index["data"] == "dataloader"
    assert_same_as(r, nbattr.attribute(m, x, target=y, steps=5))


def test_input_fn_target_callable_and_list_dataset(tmp_path: Path) -> None:
    m, x = mlp(5), data(6)
    items = [{"features": x[i], "meta": i} for i in range(6)]
    r = attribute_dataset(m, items, out=tmp_path, chunk_size=4, input_fn=lambda b: b["features"] * 2,
                          target=lambda b: b["meta"] % 4, steps=4, progress=False)
    assert_same_as(r, nbattr.attribute(m, x * 2, target=torch.arange(6) % 4, steps=4))


def test_per_example_targets_and_baselines_are_sliced(tmp_path: Path) -> None:
    m, x = mlp(6), data(8)
    t = torch.tensor([3, 2, 1, 0, 3, 2, 1, 0])
    b = data(8, seed=7) * 0.1
    r = attribute_dataset(m, x, out=tmp_path, chunk_size=3, target=t, baseline=b, steps=6, progress=False)
    assert_same_as(r, nbattr.attribute(m, x, target=t, baseline=b, steps=6))


def _scaled(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x * scale) @ torch.linspace(-1, 1, x.shape[1] * 3).reshape(x.shape[1], 3)


@pytest.mark.parametrize("how", ["dict", "callable"])
def test_per_example_forward_kwargs_are_sliced(tmp_path: Path, how: str) -> None:
    x, scale = data(7), data(7, seed=3).abs() + 0.5
    if how == "dict":
        r = attribute_dataset(_scaled, x, out=tmp_path, chunk_size=3, steps=6, progress=False,
                              forward_kwargs={"scale": scale})
    else:
        items = [{"x": x[i], "scale": scale[i]} for i in range(7)]
        r = attribute_dataset(_scaled, items, out=tmp_path, chunk_size=3, steps=6, progress=False,
                              forward_kwargs=lambda b: {"scale": b["scale"]})
    assert_same_as(r, nbattr.attribute(_scaled, x, steps=6, forward_kwargs={"scale": scale}))


def test_several_targets_per_example(tmp_path: Path) -> None:
    m, x = mlp(7), data(7)
    r = attribute_dataset(m, x, out=tmp_path / "top", chunk_size=3, target="top2", steps=6, progress=False)
    direct = nbattr.attribute(m, x, target="top2", steps=6)
    assert r.attributions.shape == (7, 2, 6) and r.target.shape == (7, 2)
    assert_same_as(r, direct)
    t = torch.tensor([[0, 3], [1, 2]] * 3 + [[2, 2]])
    r = attribute_dataset(m, x, out=tmp_path / "nk", chunk_size=3, target=t, steps=6, progress=False)
    assert_same_as(r, nbattr.attribute(m, x, target=t, steps=6))


@pytest.mark.parametrize("case", ["occlusion window", "shapley mask"])
def test_settings_as_long_as_a_chunk_stay_settings(tmp_path: Path, case: str) -> None:
    """A tuple or 1-D tensor setting with as many entries as a chunk has rows (occlusion's window
    (3, 8, 8) beside a 3-row chunk; a 6-feature mask with 6-row chunks) is not a per-example array:
    it failed on the chunk of another size, or was written as param_feature_mask.npy."""
    if case == "occlusion window":
        m, x = cnn(1), torch.randn(7, 3, 16, 16, dtype=torch.float64)
        opts = {"method": "occlusion", "window": (3, 8, 8), "target": "top2"}
        chunk = 4  # chunks of 4 and 3 rows
    else:
        m, x = mlp(2), data(12)
        opts = {"method": "shapley_sampling", "feature_mask": torch.tensor([0, 0, 1, 1, 2, 2]), "permutations": 4}
        chunk = 6
    r = attribute_dataset(m, x, out=tmp_path, chunk_size=chunk, progress=False, **opts)
    direct = nbattr.attribute(m, x, **opts)
    assert_same_as(r, direct)
    assert not [f for f in os.listdir(tmp_path) if f.startswith("param_")]


def test_per_example_baseline_of_a_layer_is_sliced(tmp_path: Path) -> None:
    """With layer=, an (N, L, E) baseline (the layer's output space) is one row per example, and a
    shared (1, L, E) one broadcasts: the token ids' rank (2) said neither (it crashed)."""
    t = text(0)
    ids = torch.randint(0, 10, (7, 5), generator=torch.Generator().manual_seed(0))
    per_row = torch.randn(7, 5, 4, dtype=torch.float64)
    for k, base in enumerate((per_row, per_row[:1])):
        r = attribute_dataset(t, ids, out=tmp_path / str(k), chunk_size=3, layer=t.emb, steps=8, baseline=base,
                              progress=False)
        assert_same_as(r, nbattr.attribute(t, ids, layer=t.emb, steps=8, baseline=base))


def test_uniform_baseline_equals_one_call(tmp_path: Path) -> None:
    """The "uniform" baseline draws each example's noise for its row number in the data set: chunks
    of 4 gave rows 4 and 5 the noise of rows 0 and 1 (IG 0.16 off on a CNN, in the bug report)."""
    m, x = cnn(1), torch.randn(6, 3, 16, 16, dtype=torch.float64)
    r = attribute_dataset(m, x, "deeplift", out=tmp_path, chunk_size=4, baseline="uniform", progress=False)
    direct = nbattr.attribute(m, x, method="deeplift", baseline="uniform")
    assert_same_as(r, direct)
    assert r.index["params"]["baseline"] == "uniform"


def test_a_callable_models_weights_and_layer_are_part_of_the_settings(tmp_path: Path) -> None:
    """``lambda x: net(x)`` (the Hugging Face pattern): changed weights, or another layer of the same
    type, are refused on an existing directory as for a module (they resumed with the old files)."""
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()

    def f(z: torch.Tensor) -> torch.Tensor:
        return net(z)

    x = data(8)
    attribute_dataset(f, x, out=tmp_path / "w", chunk_size=4, steps=8, progress=False)
    attribute_dataset(f, x, out=tmp_path / "w", chunk_size=4, steps=8, progress=False)  # same: resumes
    with torch.no_grad():
        net[0].weight.mul_(2)
    with pytest.raises(nbattr.InputError, match="model"):
        attribute_dataset(f, x, out=tmp_path / "w", chunk_size=4, steps=8, progress=False)
    attribute_dataset(f, x, out=tmp_path / "l", chunk_size=4, steps=8, layer=net[0], progress=False)
    with pytest.raises(nbattr.InputError, match="layer"):
        attribute_dataset(f, x, out=tmp_path / "l", chunk_size=4, steps=8, layer=net[2], progress=False)


def test_adaptive_steps_are_kept_per_example(tmp_path: Path) -> None:
    m, x = mlp(8, act=nn.Softplus), data(5)
    r = attribute_dataset(m, x, out=tmp_path, chunk_size=2, steps="auto", tol=1e-4, progress=False)
    direct = nbattr.attribute(m, x, steps="auto", tol=1e-4)
    assert_same_as(r, direct)
    for name in ("steps", "converged"):
        np.testing.assert_array_equal(r.per_example[name], np.asarray(direct.params[name]), err_msg=name)
    np.testing.assert_allclose(r.per_example["delta_reached"], direct.params["delta_reached"], atol=1e-14)
    assert all((tmp_path / f"param_{n}.npy").exists() for n in ("steps", "converged", "delta_reached"))
    assert "steps" not in r.index["params"] and r.index["params"]["tol"] == 1e-4


def test_dataloader_with_workers(tmp_path: Path) -> None:
    m, x = mlp(4), data(5)
    loader = DataLoader(TensorDataset(x), batch_size=2, num_workers=1)
    r = attribute_dataset(m, loader, out=tmp_path, steps=4, progress=False)
    # float32: chunks of 2 rows and one call of 5 rows round matmuls differently (BLAS blocking)
    assert_same_as(r, nbattr.attribute(m, x, steps=4), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method, opts", [("deeplift", {}), ("occlusion", {"window": 8, "stride": 8}),
                                          ("gradient_x_input", {})])
def test_images_with_other_methods(tmp_path: Path, method: str, opts: dict) -> None:
    m = cnn(1)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    r = attribute_dataset(m, x, method, out=tmp_path, chunk_size=2, progress=False, **opts)
    assert r.attributions.shape == (3, 3, 16, 16)
    assert_same_as(r, nbattr.attribute(m, x, method=method, **opts))


def test_sampling_error_is_written(tmp_path: Path) -> None:
    """Shapley sampling uses the same orderings for every example: chunking changes nothing."""
    m, x = mlp(0), data(7)
    r = attribute_dataset(m, x, "shapley_sampling", out=tmp_path, chunk_size=3, permutations=5, progress=False)
    assert (tmp_path / "stderr.npy").exists() and r.stderr.shape == x.shape
    assert_same_as(r, nbattr.attribute(m, x, method="shapley_sampling", permutations=5))
    assert "stderr" in r.tensors()


def test_seeded_random_method_draws_per_chunk(tmp_path: Path) -> None:
    m, x = mlp(0), data(7)
    r = attribute_dataset(m, x, "smoothgrad", out=tmp_path, chunk_size=3, seed=3, samples=4, progress=False)
    per_chunk = torch.cat([nbattr.attribute(m, x[i:i + 3], method="smoothgrad", seed=3, samples=4).attributions
                           for i in (0, 3, 6)])
    np.testing.assert_allclose(r.attributions, per_chunk.numpy(), rtol=1e-12, atol=1e-14)


class Sorted(nn.Module):
    """A ``sort`` whose order differs between the input and the zero baseline: reported once per call."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.sort(x, 1).values)


def test_unsupported_operations_are_summed_over_chunks(tmp_path: Path) -> None:
    m, x = Sorted().eval(), data(7)
    with pytest.warns(nbattr.MissingRuleWarning):
        r = attribute_dataset(m, x, "deeplift", out=tmp_path, chunk_size=3, progress=False)
    with pytest.warns(nbattr.MissingRuleWarning):
        per_chunk = [nbattr.attribute(m, x[i:i + 3], method="deeplift").unsupported for i in (0, 3, 6)]
    key = "sort (selection differs from the reference)"
    assert r.index["unsupported"] == {key: sum(u[key] for u in per_chunk)} and per_chunk[0][key] > 0


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.emb(ids)).mean(1))


def test_layer_attribution_shape_follows_the_layer(tmp_path: Path) -> None:
    m = TokenModel().double().eval()
    ids = torch.randint(0, 20, (7, 5), generator=torch.Generator().manual_seed(0))
    r = attribute_dataset(m, ids, out=tmp_path, chunk_size=3, layer=m.emb, steps=8, progress=False)
    direct = nbattr.attribute(m, ids, layer=m.emb, steps=8)
    assert r.attributions.shape == (7, 5, 4)
    assert_same_as(r, direct)
    assert r.index["settings"]["options"]["layer"] == "emb"


# -- resuming ----------------------------------------------------------------------------------------
class Flaky(nn.Module):
    """Counts its calls and raises on call number ``fail_at`` (a simulated crash)."""

    def __init__(self, model: nn.Module, fail_at: int | None = None) -> None:
        super().__init__()
        self.model, self.fail_at, self.calls = model, fail_at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        return self.model(x)


def test_resume_after_crash_skips_finished_chunks(tmp_path: Path) -> None:
    x = data(10)
    kw = {"chunk_size": 2, "steps": 4, "batch_size": 3, "progress": False}
    whole = Flaky(mlp(0))
    full = attribute_dataset(whole, x, out=tmp_path / "full", **kw)
    per_chunk = whole.calls // 5
    assert per_chunk * 5 == whole.calls and per_chunk >= 3  # equal chunks; several calls each

    crashing = Flaky(mlp(0), fail_at=3 * per_chunk + 2)  # inside chunk 3: chunks 0, 1, 2 are done
    with pytest.raises(RuntimeError, match="simulated crash"):
        attribute_dataset(crashing, x, out=tmp_path / "run", **kw)
    partial = load(tmp_path / "run")
    assert not partial.complete
    np.testing.assert_array_equal(partial.done, np.arange(10) < 6)

    again = Flaky(mlp(0))
    r = attribute_dataset(again, x, out=tmp_path / "run", **kw)
    assert again.calls == 2 * per_chunk  # only chunks 3 and 4 were computed
    assert r.complete and r.index["complete"] == [0, 1, 2, 3, 4]
    assert_same_files(r, full, exact=True)

    done = Flaky(mlp(0))
    attribute_dataset(done, x, out=tmp_path / "run", **{**kw, "batch_size": 5})  # batch_size may change
    assert done.calls == 0
    fresh = Flaky(mlp(0))
    attribute_dataset(fresh, x, out=tmp_path / "run", overwrite=True, **kw)  # starts afresh
    assert fresh.calls == 5 * per_chunk


def test_rows_without_marker_are_recomputed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk whose rows were written but whose marker was not (killed in between) is not done."""
    x, kw = data(6), {"chunk_size": 2, "steps": 4, "batch_size": 8, "progress": False}
    ref = attribute_dataset(CallCounter(mlp(0)), x, out=tmp_path / "ref", **kw)
    real = ds._write_json

    def write_json(f: Path, obj, **kw) -> None:
        if f.parent.name == "chunks" and obj["chunk"] == 1:
            raise KeyboardInterrupt  # killed after the rows of chunk 1, before its marker
        real(f, obj, **kw)

    monkeypatch.setattr(ds, "_write_json", write_json)
    with pytest.raises(KeyboardInterrupt):
        attribute_dataset(CallCounter(mlp(0)), x, out=tmp_path / "run", **kw)
    monkeypatch.setattr(ds, "_write_json", real)
    np.testing.assert_array_equal(load(tmp_path / "run").done, [True, True, False, False, False, False])
    m = CallCounter(mlp(0))
    r = attribute_dataset(m, x, out=tmp_path / "run", **kw)
    assert sorted(m.calls) == [2, 2, 2, 2, 8, 8]  # chunks 1 and 2: forward, baseline, one gradient batch
    assert_same_files(r, ref, exact=True)


@pytest.mark.parametrize("change", [
    {"steps": 6}, {"method": "saliency"}, {"chunk_size": 3}, {"target": 1}, {"baseline": 0.5},
    {"model_seed": 9}, {"rule": "riemann_left"}, {"model_seed": 9, "chunk_size": 3},
])
def test_other_settings_on_existing_directory_raise(tmp_path: Path, change: dict) -> None:
    x = data(6)
    base = {"method": "integrated_gradients", "chunk_size": 2, "steps": 4, "progress": False}
    attribute_dataset(mlp(0), x, out=tmp_path, **base)
    kw = {**base, **change}
    model = mlp(kw.pop("model_seed", 0))
    with pytest.raises(nbattr.InputError, match="other settings.*overwrite=True") as err:
        attribute_dataset(model, x, out=tmp_path, **kw)
    assert ("weights" if "model_seed" in change else next(iter(change))) in str(err.value)
    r = attribute_dataset(model, x, out=tmp_path, overwrite=True, **kw)
    method = kw.pop("method")
    for k in ("chunk_size", "progress"):
        kw.pop(k)
    assert_same_as(r, nbattr.attribute(model, x, method=method, **kw))


@pytest.mark.parametrize("method, explicit", [("integrated_gradients", {"steps": 50, "baseline": "zeros"}),
                                              ("deeplift", {"rule": "rescale", "strict": False})])
def test_defaults_given_explicitly_are_the_same_settings(tmp_path: Path, method: str, explicit: dict) -> None:
    x = data(4)
    attribute_dataset(CallCounter(mlp(0)), x, method, out=tmp_path, chunk_size=2, progress=False)
    m = CallCounter(mlp(0))
    attribute_dataset(m, x, method, out=tmp_path, chunk_size=2, progress=False, **explicit)
    assert m.calls == []  # resumed a finished run: nothing computed, no mismatch


def test_foreign_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "index.json").write_text('{"something": "else"}')
    with pytest.raises(nbattr.InputError, match="not written by nbattr"):
        attribute_dataset(mlp(0), data(4), out=tmp_path, progress=False)
    assert (tmp_path / "index.json").read_text() == '{"something": "else"}'


def test_overwrite_removes_only_its_own_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    attribute_dataset(mlp(0), data(4), out=tmp_path, steps="auto", tol=1e-2, chunk_size=2, progress=False)
    assert (tmp_path / "param_steps.npy").exists()
    r = attribute_dataset(mlp(0), data(4), "saliency", out=tmp_path, overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "attributions.npy", "chunks", "index.json", "notes.txt", "outputs.npy", "targets.npy"]
    assert r.method == "saliency" and (tmp_path / "notes.txt").read_text() == "mine"


# -- bad input --------------------------------------------------------------------------------------
class Stream(IterableDataset):
    def __iter__(self):
        yield from data(4)


@pytest.mark.parametrize("bad, match", [
    (lambda: DataLoader(TensorDataset(data(4)), batch_size=2, shuffle=True), "shuffles"),
    (lambda: Stream(), "IterableDataset"),
    (lambda: data(4)[:, 0], "at least one feature"),
    (lambda: data(0), "no examples"),
    (lambda: 3.0, "data must be"),
])
def test_bad_data_raises(tmp_path: Path, bad, match: str) -> None:
    with pytest.raises(nbattr.InputError, match=match):
        attribute_dataset(mlp(0), bad(), out=tmp_path, progress=False)


def test_bad_options_raise(tmp_path: Path) -> None:
    m, x = mlp(0), data(4)
    with pytest.raises(nbattr.InputError, match="out= is required"):
        attribute_dataset(m, x)
    with pytest.raises(nbattr.InputError, match="3 entries for a data set of 4"):
        attribute_dataset(m, x, out=tmp_path, target=[0, 1, 2], progress=False)
    with pytest.raises(nbattr.InputError, match="no option"):
        attribute_dataset(m, x, out=tmp_path, stepz=3, progress=False)
    with pytest.raises(nbattr.InputError, match="no label"):
        attribute_dataset(m, x, out=tmp_path, target="label", progress=False)
    with pytest.raises(nbattr.InputError, match="chunk_size"):
        attribute_dataset(m, x, out=tmp_path, chunk_size=0, progress=False)


def test_model_left_as_found_after_a_crash(tmp_path: Path) -> None:
    m = Flaky(mlp(0), fail_at=4).train()
    before = [p.requires_grad for p in m.parameters()]
    with pytest.raises(RuntimeError, match="simulated crash"):
        attribute_dataset(m, data(6), out=tmp_path, chunk_size=2, steps=4, progress=False)
    assert m.training and all(mod.training for mod in m.modules())
    assert [p.requires_grad for p in m.parameters()] == before


def test_progress_only_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    attribute_dataset(mlp(0), data(4), out=tmp_path / "a", chunk_size=2, steps=4, progress=False)
    assert capsys.readouterr().err == ""
    attribute_dataset(mlp(0), data(4), out=tmp_path / "b", chunk_size=2, steps=4, progress=True)
    assert "4/4" in capsys.readouterr().err


def test_progress_without_tqdm_is_a_counter(tmp_path: Path, capsys: pytest.CaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails
    attribute_dataset(mlp(0), data(5), out=tmp_path, chunk_size=2, steps=4, progress=True)
    err = capsys.readouterr().err
    assert "5/5 examples (100%)" in err and "it/s" not in err and "ex/s" not in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_moves_the_model_and_back(tmp_path: Path) -> None:
    m, x = mlp(0), data(6)
    r = attribute_dataset(m, x, out=tmp_path / "a", chunk_size=4, steps=4, device="cuda", progress=False)
    assert all(p.device.type == "cpu" for p in m.parameters())  # moved for the call, then back
    direct = nbattr.attribute(m, x, steps=4)
    np.testing.assert_allclose(r.attributions, direct.attributions.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(r.target, direct.target.numpy())
    mc = mlp(0).cuda()
    r2 = attribute_dataset(mc, x, out=tmp_path / "b", chunk_size=4, steps=4, progress=False)
    assert all(p.device.type == "cuda" for p in mc.parameters())
    np.testing.assert_allclose(r2.attributions, r.attributions, rtol=1e-9, atol=1e-12)


# -- torchrun ---------------------------------------------------------------------------------------
SCRIPT = """
import os, sys, torch
from torch import nn
from nbattr.engine.dataset import attribute_dataset

torch.set_default_dtype(torch.float64)
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
x = torch.randn(11, 6, generator=torch.Generator().manual_seed(1))


class Watched(nn.Module):
    \"\"\"Records which examples of x it is run on; raises on example ``fail_row`` (a crash).\"\"\"

    def __init__(self, model, fail_row=None):
        super().__init__()
        self.model, self.fail_row, self.rows = model, fail_row, set()

    def forward(self, z):
        hits = (z[:, None, :] == x[None]).all(-1).nonzero()[:, 1].tolist()
        if self.fail_row in hits:
            raise RuntimeError("simulated crash")
        self.rows.update(hits)
        return self.model(z)


if os.environ.get("INIT_FIRST") and "RANK" in os.environ:  # the script sets up torch.distributed itself
    torch.distributed.init_process_group("gloo")
fail = os.environ.get("FAIL_ROW") if os.environ.get("RANK") == "1" else None
model = Watched(net, int(fail) if fail else None)
r = attribute_dataset(model, x, out=sys.argv[1], chunk_size=2, steps=4, batch_size=8)
line = f"rank {os.environ.get('RANK')} rows {sorted(model.rows)} done {int(r.done.sum())}\\n"
sys.stdout.write(line)  # one write: the ranks' lines do not interleave
sys.stdout.flush()
if torch.distributed.is_initialized():  # still usable after attribute_dataset
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
"""


def _torchrun(script: Path, out: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(script), str(out)],
                          capture_output=True, text=True, timeout=180, env=env, cwd=script.parent)


def _single(script: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``python script.py out``, run in this process (no torch.distributed, no RANK)."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "FAIL_ROW", "INIT_FIRST"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(sys, "argv", [str(script), str(out)])
    runpy.run_path(str(script), run_name="__main__")


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to python")
def test_torchrun_two_processes_equal_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    two = _torchrun(script, tmp_path / "two", {"INIT_FIRST": "1"})  # a process group made by the script
    assert two.returncode == 0, two.stderr[-3000:]
    _single(script, tmp_path / "one", monkeypatch)
    a, b = load(tmp_path / "two"), load(tmp_path / "one")
    assert a.complete and b.complete
    # rank r did chunks r, r + 2, ... (6 chunks of 2 rows: the last has 1)
    assert a.index["chunk_rank"] == [0, 1, 0, 1, 0, 1] and b.index["chunk_rank"] == [0] * 6
    assert_same_files(a, b)
    assert "simulated" not in two.stderr and two.stderr.count("0/11") == 1  # one progress bar: rank 0's
    assert "rank 0 rows [0, 1, 4, 5, 8, 9] done 11" in two.stdout
    assert "rank 1 rows [2, 3, 6, 7, 10] done 11" in two.stdout


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to python")
def test_torchrun_failure_on_one_rank_stops_all_and_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    # rank 1 takes chunks 1, 3, 5 (rows 2-3, 6-7, 10) and crashes on row 6: chunks 3 and 5 stay undone.
    # No process group is made by the script: attribute_dataset initialises one from torchrun's env.
    two = _torchrun(script, tmp_path / "out", {"FAIL_ROW": "6"})
    assert two.returncode != 0
    assert "rank 1 failed: " in two.stderr and "simulated crash" in two.stderr
    partial = load(tmp_path / "out")
    np.testing.assert_array_equal(partial.done, [True] * 6 + [False] * 2 + [True] * 2 + [False])
    capsys.readouterr()
    _single(script, tmp_path / "out", monkeypatch)  # the same script without torchrun finishes the run
    assert "rows [6, 7, 10] done 11" in capsys.readouterr().out  # chunks 3 and 5 only
    _single(script, tmp_path / "ref", monkeypatch)
    a, b = load(tmp_path / "out"), load(tmp_path / "ref")
    assert_same_files(a, b)


PLAIN_SCRIPT = """
import sys, torch
from torch import nn
from nbattr.engine.dataset import attribute_dataset
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
x = torch.randn(11, 6, generator=torch.Generator().manual_seed(1))
attribute_dataset(net, x, out=sys.argv[1], chunk_size=2, steps=4, progress=False)
"""


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to python")
def test_torchrun_script_unchanged_exits_cleanly(tmp_path: Path) -> None:
    """A script that leaves torch.distributed to nbattr (it never ends the process group) exits 0:
    the group nbattr started is ended at exit. Left to the interpreter's teardown, gloo aborted
    one run in six here ("terminate called without an active exception")."""
    script = tmp_path / "plain.py"
    script.write_text(textwrap.dedent(PLAIN_SCRIPT))
    for k in range(3):
        run = _torchrun(script, tmp_path / f"out{k}")
        assert run.returncode == 0 and "terminate called" not in run.stderr, run.stderr[-3000:]
        assert load(tmp_path / f"out{k}").complete


def test_a_process_group_started_here_is_ended_at_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministic half of the test above: _Dist registers the exit hook when it starts the group."""
    import atexit

    registered = []
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: None)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda: "gloo")
    monkeypatch.setattr(atexit, "register", registered.append)
    comm = ds._Dist("cpu")
    assert comm.initialised_here and registered == [ds._destroy_own_group]
