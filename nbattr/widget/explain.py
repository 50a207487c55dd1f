"""``Explain``: the live widget. Traits and observers only; the work is done by
:class:`~nbattr.widget.controller.Controller`, the bytes by :mod:`nbattr.widget.codec`."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anywidget
import numpy as np
import torch
import traitlets as t
from torch import Tensor, nn

from .. import render
from ..engine import attribute, watch
from ..engine import methods as all_methods
from ..engine.errors import NonFiniteWarning
from ..engine.problem import model_scores, nonfinite_message
from . import codec, payload
from .controller import Controller, Outcome

STATIC = Path(__file__).resolve().parent.parent / "static"

_MISSING_ESM = """
export default { render({ el }) {
  const d = document.createElement("div");
  d.className = "nbattr-missing";
  d.style.cssText = "padding:8px;border:1px solid #c00;color:#900;font-family:sans-serif";
  d.textContent = "nbattr: the widget's JavaScript bundle (nbattr/static/widget.js) is not built. "
    + "Run `make js` (or `npm install && npm run build` in js/) and re-run this cell. "
    + "Explain(...).plot() works without it.";
  el.appendChild(d);
} };
"""

IMAGE_BASELINES = ["zeros", "blur", "uniform", "mean"]
OTHER_BASELINES = ["zeros", "uniform", "mean"]
#: ``steps="auto"`` in the widget: |delta| goal relative to |F(x) - F(x')| (the receipt turns red at 5%)
AUTO_TOL = 1e-2
#: ``steps="auto"`` in the widget: the most gradients (and α frames) one view may take
AUTO_MAX_STEPS = 129
#: ``steps="auto"`` for path methods that have no adaptive rule
FIXED_STEPS = 32


def _read(name: str, fallback: str) -> str:
    p = STATIC / name
    try:
        return p.read_text(encoding="utf-8")
    except OSError:
        return fallback


def bundle_present() -> bool:
    return (STATIC / "widget.js").is_file()


#: engine options the widget sets itself (traits, or what its views need)
OWN_OPTIONS = ("steps", "keep_path", "target", "baseline")


def _check_options(options: Mapping[str, Mapping[str, Any]] | None, known: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``options`` as ``{method: {option: value}}``, every name checked against the registry."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"options must map method names to dicts of their options, got {type(options).__name__}")
    out = {}
    for method, opts in options.items():
        if method not in known:
            raise ValueError(f"options: unknown method {method!r}; known: {sorted(known)}")
        if not isinstance(opts, Mapping):
            raise ValueError(f"options[{method!r}] must be a dict of {method}'s options, got {type(opts).__name__}")
        own = sorted(set(opts) & set(OWN_OPTIONS))
        if own:
            raise ValueError(f"options[{method!r}]: {own} are the widget's own (steps= and the controls set them)")
        valid = set(known[method].options)
        bad = sorted(set(opts) - valid)
        if bad:
            raise ValueError(f"options[{method!r}]: {method} has no option(s) {bad}; its options are: "
                             f"{', '.join(sorted(valid)) or 'none'}")
        out[method] = dict(opts)
    return out


class Explain(anywidget.AnyWidget):
    """Live attribution view for one input: image overlay, token bars or feature bars.

    Parameters
    ----------
    model : ``nn.Module`` (eval mode) mapping a batch to scores ``(N, C)`` or ``(N,)``.
    x : image ``(C, H, W)`` / ``(1, C, H, W)``; token ids ``(L,)`` / ``(1, L)`` with ``tokens=`` and
        ``layer=`` (without ``tokens=`` the ids themselves label the tokens); or a feature row
        ``(F,)`` / ``(1, F)`` with ``feature_names=``.
    tokens, layer : the text view: token strings (shown as text, never HTML) and the embedding module.
    forward_kwargs : keyword arguments of every model call (an attention mask ``(1, L)``), as for
        :func:`nbattr.attribute`.
    feature_names : the tabular view.
    labels : class names (a sequence or ``{index: name}``).
    methods : restrict the method list (names from :func:`nbattr.methods`).
    method, baseline, target, steps : the starting choice; all four are synced traits.
    baseline may also be a tensor or callable (listed as ``"custom"``). ``steps="auto"`` (the
    default) lets integrated gradients choose its step count per view (the engine's
    ``steps="auto"`` with ``tol=AUTO_TOL`` = 1% of |F(x) - F(x')| and at most
    ``AUTO_MAX_STEPS`` gradients; the α frames are then its Clenshaw-Curtis nodes, crowded at
    both ends); an int fixes it (evenly spaced trapezoid frames including α = 0 and 1). Path
    methods without an adaptive rule (interior gradients) take ``FIXED_STEPS`` under "auto".
    options : per-method engine options, ``{method: {option: value}}`` (names from
        :func:`nbattr.methods`), e.g. ``{"shapley_sampling": {"permutations": 8}}`` for a quicker,
        rougher view (the receipt shows its sampling error) or ``{"occlusion": {"window": 32}}``.
        Checked here; ``steps``, ``keep_path``, ``target`` and ``baseline`` are the widget's own.
    image : what to draw under the map (defaults to ``x`` min-max scaled).
    prefetch : after the chosen (method, baseline, target, steps) is computed and shown, compute the
        other top-k classes in the background in ONE multi-target engine call, so that clicking
        another top class is a cache hit. Only for methods with a native multi-target path
        (every built-in one: the gradient and rule-based methods take one forward per point and
        K backward passes); not in compare mode. Occlusion and Shapley sampling read all K scores
        off the same forwards, so they compute the other top classes in the chosen view's own
        call instead (whatever it took). A plain attribute: ``w.prefetch = False`` turns both off later.
    prefetch_after : skip the prefetch when the chosen view took longer than this many seconds to
        compute (None: always prefetch). A request for one of the classes being prefetched waits
        for the prefetch and is served from its result, not computed again: at worst the rest of
        one prefetch call, about ``F + (k-1) B`` for a forward pass F over the path points and a
        backward pass B (measured on CPU for top-5: 1.4-3.4x the chosen view's own time, less on
        CUDA, where the K backward passes are batched). Any other request stops the prefetch at
        its next chunk of work.
    """

    _esm = _read("widget.js", _MISSING_ESM)
    _css = _read("widget.css", "")

    # the user's choices (synced both ways)
    method = t.Unicode("integrated_gradients").tag(sync=True)
    baseline = t.Unicode("zeros").tag(sync=True)
    target = t.Int(0).tag(sync=True)
    steps = t.Union([t.Enum(["auto"]), t.Int(min=2)], default_value="auto").tag(sync=True)
    colormap = t.Unicode("inferno").tag(sync=True)
    sign = t.Unicode("absolute").tag(sync=True)
    opacity = t.Float(0.65).tag(sync=True)
    clip = t.Float(99.0).tag(sync=True)
    compare = t.List(t.Unicode()).tag(sync=True)

    # what the page needs to know (Python -> page)
    kind = t.Unicode("image").tag(sync=True)
    methods = t.List(t.Unicode()).tag(sync=True)
    descriptions = t.Dict().tag(sync=True)
    path_methods = t.List(t.Unicode()).tag(sync=True)
    baselines = t.List(t.Unicode()).tag(sync=True)
    tokens = t.List(t.Unicode()).tag(sync=True)
    feature_names = t.List(t.Unicode()).tag(sync=True)
    topk = t.List(t.Dict()).tag(sync=True)
    status = t.Unicode("idle").tag(sync=True)
    error = t.Unicode("").tag(sync=True)
    progress = t.Float(0.0).tag(sync=True)
    receipt = t.Dict().tag(sync=True)
    seq = t.Int(0).tag(sync=True)
    image_data = t.Dict().tag(sync=True)
    map_data = t.Dict().tag(sync=True)
    frames = t.Dict().tag(sync=True)
    curve = t.Dict().tag(sync=True)
    compare_maps = t.Dict().tag(sync=True)

    def __init__(
        self,
        model: Any,
        x: Tensor,
        *,
        tokens: Sequence[str] | None = None,
        layer: nn.Module | None = None,
        feature_names: Sequence[str] | None = None,
        labels: Sequence[str] | Mapping[int, str] | None = None,
        methods: Sequence[str] | None = None,
        method: str | None = None,
        baseline: Any = "zeros",
        target: int | None = None,
        steps: int | str = "auto",
        image: Any = None,
        topk: int = 5,
        prefetch: bool = True,
        prefetch_after: float | None = 3.0,
        forward_kwargs: Mapping[str, Any] | None = None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        if steps != "auto" and (isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 2):
            raise ValueError(f"steps must be 'auto' or an int >= 2 (the path points of a path method), got {steps!r}")
        if not isinstance(x, Tensor):
            x = torch.as_tensor(x)
        known = all_methods()
        names = list(methods) if methods is not None else list(known)
        bad = [m for m in names if m not in known]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; known: {sorted(known)}")
        if not names:
            raise ValueError(f"methods is empty: name at least one of {sorted(known)}")
        self._options = _check_options(options, known)
        if tokens is None and layer is not None and not x.is_floating_point() and x.dim() <= 2:
            tokens = [str(int(i)) for i in x.reshape(-1)]  # token ids without their strings: the ids, as text
        if tokens is not None:
            kind = "text"
            x = x.reshape(1, -1) if x.dim() == 1 else x
        elif feature_names is not None or (x.dim() <= 2 and x.is_floating_point()):
            kind = "tabular"
            x = x.reshape(1, -1) if x.dim() == 1 else x
        else:
            kind = "image"
            x = x[None] if x.dim() == 3 else x
        self._model, self._x, self._layer, self._labels = model, x, layer, labels
        self._forward_kwargs = dict(forward_kwargs or {})
        self._custom_baseline = None
        base_list = list(IMAGE_BASELINES if kind == "image" else OTHER_BASELINES)
        if not isinstance(baseline, str):
            self._custom_baseline = baseline
            base_list.append("custom")
            baseline = "custom"
        self.payload: dict[str, Any] | None = None
        self.prefetch = bool(prefetch)
        self._compare_cache: dict[str, np.ndarray] = {}

        # guarded (the model's state as found), with the engine's hints (a ModelOutput, a dtype)
        logits = model_scores(model, x, self._forward_kwargs, layer)
        top = self._predictions(logits, topk)
        if target is None:
            target = top[0]["index"] if top else 0

        super().__init__(**kwargs)
        self._controller = Controller(self._compute, self._publish, self._on_state,
                                      prefetch=self._prefetch, prefetch_after=prefetch_after,
                                      on_progress=self._on_progress)
        with self.hold_trait_notifications():
            self.kind = kind
            self.methods = names
            self.descriptions = {m: known[m].description for m in names}
            self.path_methods = [m for m in names if known[m].path]
            self.baselines = base_list
            self.topk = top
            if tokens is not None:
                self.tokens = [str(s) for s in tokens]
            if feature_names is not None:
                self.feature_names = [str(s) for s in feature_names]
            elif kind == "tabular":
                self.feature_names = [f"x{i}" for i in range(x.shape[-1])]
            if kind == "image":
                self.image_data = codec.encode_image(image if image is not None else x)
            if kind != "image":
                self.sign = "signed"
            self.method = method or ("integrated_gradients" if "integrated_gradients" in names else names[0])
            self.baseline = baseline
            self.steps = steps if steps == "auto" else int(steps)
            self.target = int(target)
        self._request()

    # -- predictions ---------------------------------------------------------------------
    def label(self, i: int) -> str:
        lab = self._labels
        try:
            if lab is not None:
                return str(lab[i])
        except (IndexError, KeyError, TypeError):
            pass
        return str(i)

    def _predictions(self, logits: Tensor, k: int) -> list[dict[str, Any]]:
        out = logits.detach().float().cpu()
        if out.dim() == 2:
            out = out[0]
        if out.dim() == 0 or out.numel() == 1:
            return [{"index": 0, "label": self.label(0), "prob": None, "score": float(out.reshape(-1)[0])}]
        probs = torch.softmax(out, 0)
        vals, idx = probs.topk(min(k, out.numel()))
        return [{"index": int(i), "label": self.label(int(i)), "prob": float(v), "score": float(out[i])}
                for v, i in zip(vals, idx)]

    # -- requests --------------------------------------------------------------------------
    @t.observe("method", "baseline", "target", "steps")
    def _on_choice(self, _change: dict[str, Any]) -> None:
        if hasattr(self, "_controller"):
            self._request()

    @t.observe("compare")
    def _on_compare(self, _change: dict[str, Any]) -> None:
        if hasattr(self, "_controller"):
            self._request()

    def key(self) -> tuple[Any, ...]:
        return (self.method, self.baseline, int(self.target), self.steps, tuple(self.compare))

    def _request(self) -> None:
        self._controller.request(self.key())

    def _baseline_spec(self, name: str) -> Any:
        if name == "custom":
            return self._custom_baseline
        if name == "noise":
            return "uniform"
        try:
            return float(name)
        except ValueError:
            return name

    def _engine_call(self, method: str, baseline: str, target: Any, steps: int | str) -> tuple[Any, list[Warning]]:
        """The engine's result and its warnings (shown in the receipt; from the worker thread they
        would land in whatever notebook cell ran last)."""
        known = all_methods()
        if method not in known:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(sorted(known))}")
        info = known[method]
        opts: dict[str, Any] = {}
        if info.path and steps == "auto" and "tol" in info.options:
            # Clenshaw-Curtis nodes, refined until |delta| <= 1%; the receipt shows the steps used,
            # and its delta turns red when AUTO_MAX_STEPS did not get within 5%
            opts.update(tol=AUTO_TOL, max_steps=AUTO_MAX_STEPS)
        elif info.path:
            steps = FIXED_STEPS if steps == "auto" else int(steps)  # the trait holds ints >= 2
            if "rule" in info.options:
                opts["rule"] = "riemann_trapezoid"  # evenly spaced α frames including 0 and 1
        opts.update(self._options.get(method, {}))  # the user's choice over the widget's defaults
        if "keep_path" in info.options:
            opts["keep_path"] = True
        notes: list[Warning] = []
        with watch(warn=notes.append):
            attr = attribute(self._model, self._x, method=method, target=target,
                             baseline=self._baseline_spec(baseline), steps=steps, layer=self._layer,
                             forward_kwargs=self._forward_kwargs, **opts)
        return attr, notes

    def _attribute_one(self, method: str, baseline: str, target: int, steps: int | str) -> dict[str, Any]:
        others = self._classes_along(method, baseline, target, steps)
        if not others:
            attr, notes = self._engine_call(method, baseline, target, steps)
            return self._build(attr, target, notes)
        # a method whose K targets cost what one does (occlusion, Shapley sampling): the other
        # top classes in the same call, cached unpublished, so clicking them is a cache hit
        targets = torch.tensor([[target, *others]] * self._x.shape[0], dtype=torch.long)
        attr, notes = self._engine_call(method, baseline, targets, steps)
        self._controller.offer({(method, baseline, ti, steps, ()): self._build_one_of(attr, j + 1, ti, notes)
                                for j, ti in enumerate(others)})
        return self._build_one_of(attr, 0, target, notes)

    def _classes_along(self, method: str, baseline: str, target: int, steps: int | str) -> list[int]:
        """The top classes (other than ``target``, not cached yet) that come at no extra model
        calls with ``target``'s computation: none unless ``prefetch`` is on and the method reads
        all targets' scores off the same forwards (:func:`nbattr.engine.registry.targets_share_forwards`)."""
        info = all_methods().get(method)
        if not self.prefetch or info is None or not getattr(info.fn, "targets_share_forwards", False):
            return []
        return self._uncached_others(method, baseline, target, steps)

    def _uncached_others(self, method: str, baseline: str, target: int, steps: int | str) -> list[int]:
        """The top classes other than ``target`` whose view is not cached yet; none for a model
        with one output (its ``(N,)`` scores take no class: ``target`` is ignored there)."""
        if len(self.topk) < 2:
            return []
        ctl = self._controller
        return [int(p["index"]) for p in self.topk
                if int(p["index"]) != int(target) and not ctl.cached((method, baseline, int(p["index"]), steps, ()))]

    def _build_one_of(self, attr: Any, j: int, target: int, notes: list[Warning]) -> dict[str, Any]:
        """The payload of target ``j`` of a several-target result: the call's notes, with the
        non-finite one (which counts over all K targets) decided by this target's own map."""
        one = attr.for_target(j)
        kept: list[Warning] = [n for n in notes if not isinstance(n, NonFiniteWarning)]
        message = nonfinite_message(one.method, one.attributions)
        if message is not None:
            kept.append(NonFiniteWarning(message))
        return self._build(one, target, kept)

    def _build(self, attr: Any, target: int, notes: list[Warning]) -> dict[str, Any]:
        """The cached payload: its α frames already quantised for the wire (uint8, a quarter of
        float32; up to AUTO_MAX_STEPS frames per view under steps="auto")."""
        p = payload.build(attr, self.kind, self.label(target), notes=notes)
        if "frames" in p:
            p["frames"] = codec.encode_frames(p["frames"])
        return p

    def prefetchable(self, method: str) -> bool:
        """Whether ``method`` has the engine's native multi-target path (one forward, K backward)."""
        info = all_methods().get(method)
        return info is not None and bool(getattr(info.fn, "multi_target", False))

    def _prefetch(self, key: tuple[Any, ...], stop: Any) -> dict[tuple[Any, ...], dict[str, Any]]:
        """The other top-k classes of ``key`` in one multi-target call (worker thread, when idle)."""
        method, baseline, target, steps, compare = key
        if not self.prefetch or compare or not self.prefetchable(method):
            return {}
        ctl = self._controller
        todo = self._uncached_others(method, baseline, target, steps)
        if not todo or stop():
            return {}
        keys = {(method, baseline, ti, steps, ()) for ti in todo}

        def give_way() -> bool:  # to a request this prefetch will not serve
            waiting = ctl.pending()
            return ctl.closed or (waiting is not None and waiting not in keys)

        targets = torch.tensor([todo] * self._x.shape[0], dtype=torch.long)
        with watch(cancel=give_way):  # stops at the next chunk; Cancelled is no error here
            attr, notes = self._engine_call(method, baseline, targets, steps)
        out = {}
        for j, ti in enumerate(todo):
            if give_way():  # keep what is built, leave the rest
                break
            out[(method, baseline, ti, steps, ())] = self._build_one_of(attr, j, ti, notes)
        return out

    def _compute(self, key: tuple[Any, ...]) -> dict[str, Any]:
        method, baseline, target, steps, compare = key
        p = self._attribute_one(method, baseline, target, steps)
        if compare:
            grid = {}
            for m in compare:
                ck = (m, baseline, target, steps, ())
                hit = self._controller.get_cached(ck)
                if hit is None:
                    hit = self._attribute_one(m, baseline, target, steps)
                grid[m] = hit["maps"]
            p["compare"] = grid
        return p

    # -- results (worker thread, or the caller's for cache hits) ---------------------------
    def _on_state(self, state: str, _key: Any) -> None:
        if state == "computing":
            with self.hold_sync():
                self.status = "computing"
                self.progress = 0.0  # not known yet: the bar slides until the engine reports
        elif self.status == "computing":
            self.status = "idle"

    def _on_progress(self, fraction: float) -> None:
        if self.status == "computing":
            self.progress = float(fraction)

    def _publish(self, o: Outcome) -> None:
        with self.hold_sync():
            if o.error is not None:
                self.error = o.error
                self.status = "error"
                self.progress = 0.0
                self.seq = self.seq + 1
                return
            p = o.payload
            self.payload = p
            self.error = ""
            self.map_data = codec.encode(p["maps"])
            if "frames" in p:
                self.frames = p["frames"]
                self.curve = codec.encode(p["curve"])
            else:
                self.frames = {}
                self.curve = {}
            if "compare" in p:
                self.compare_maps = {m: codec.encode(v) for m, v in p["compare"].items()}
            else:
                self.compare_maps = {}
            self.receipt = dict(p["receipt"], cached=o.cached, seconds=round(o.seconds, 4))
            self.progress = 1.0
            self.status = "idle"
            self.seq = self.seq + 1

    # -- static pictures -------------------------------------------------------------------
    def wait(self, timeout: float = 60.0, prefetch: bool = False) -> bool:
        """Block until the current request is done (True) or ``timeout`` seconds passed; with
        ``prefetch=True`` also until the background prefetch of the other top classes is done."""
        return self._controller.wait(timeout, prefetch=prefetch)

    def _picture_kw(self) -> dict[str, Any]:
        img = None
        if self.kind == "image" and self.image_data:
            img = codec.decode(self.image_data)[..., :3]
        names = self.tokens if self.kind == "text" else self.feature_names
        p = self.payload
        return dict(kind=self.kind, maps=None if p is None else p["maps"], image=img,
                    receipt=None if p is None else p["receipt"], names=names or None, sign=self.sign,
                    cmap=self.colormap, opacity=self.opacity, clip=self.clip)

    def png(self, timeout: float = 30.0) -> bytes:
        self.wait(timeout)
        kw = self._picture_kw()
        return render.png_bytes(kw.pop("kind"), kw.pop("maps"), **kw)

    def save(self, path: str, timeout: float = 60.0) -> str:
        """Write the current explanation as a PNG (no Jupyter needed)."""
        with open(path, "wb") as f:
            f.write(self.png(timeout))
        return path

    def plot(self, timeout: float = 60.0) -> Any:
        """The current explanation as a matplotlib Figure."""
        import matplotlib.pyplot as plt

        self.wait(timeout)
        kw = self._picture_kw()
        fig = plt.figure(figsize=(8, 3.6) if kw["kind"] == "image" else (6, 4))
        return render.draw(fig, kw.pop("kind"), kw.pop("maps"), **kw)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        out = super()._repr_mimebundle_(**kwargs)
        data, meta = out if isinstance(out, tuple) else (out, {})
        try:
            data["image/png"] = base64.b64encode(self.png(timeout=20.0)).decode("ascii")
        except Exception:  # noqa: BLE001 - the live view matters more than the picture
            pass
        return data, meta

    def close(self) -> None:
        ctl = getattr(self, "_controller", None)
        if ctl is not None:
            ctl.close()
        super().close()
