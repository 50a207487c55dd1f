// nbattr Explain widget (anywidget ESM). Everything is drawn with DOM APIs and textContent.
import "./widget.css";
import { decode, decodeFrames, rows } from "./codec.js";
import { select, limitOf, SEQUENTIAL, SIGN_MODES, fmt } from "./colormap.js";
import { drawMap, drawLegend } from "./heatmap.js";
import { renderTokens, renderBars } from "./tokens.js";
import { createPlayer } from "./player.js";
import { bindSelect, bindNumber, bindSteps, labelled, renderTopk } from "./controls.js";

// the receipt's sampling error turns red above this fraction of the largest |attribution|
const SAMPLING_BAD = 0.1;

function div(cls, text) {
  const d = document.createElement("div");
  if (cls) d.className = cls;
  if (text != null) d.textContent = text;
  return d;
}

function render({ model, el }) {
  const listeners = [];
  const on = (name, fn) => { model.on(name, fn); listeners.push([name, fn]); };
  const root = div("nbattr-root");
  // keys typed in the widget (arrow keys on the α slider, digits in "steps") are for the widget,
  // not for JupyterLab's notebook shortcuts
  root.dataset.lmSuppressShortcuts = "true";
  const keys = (e) => { if (e.target && e.target.closest && e.target.closest("input, select, button")) e.stopPropagation(); };
  root.addEventListener("keydown", keys);
  el.appendChild(root);
  let drawn = 0;

  // controls
  const method = bindSelect(model, "method", "methods", { titles: () => model.get("descriptions") });
  const baseline = bindSelect(model, "baseline", "baselines");
  const steps = bindSteps(model, { min: 2, max: 512 });
  const cmap = bindSelect(model, "colormap", SEQUENTIAL);
  const sign = bindSelect(model, "sign", SIGN_MODES);
  const opacity = bindNumber(model, "opacity", { type: "range", min: 0, max: 1, step: 0.05, live: true });
  const clip = bindNumber(model, "clip", { type: "range", min: 90, max: 100, step: 0.5, live: true });
  const compare = document.createElement("input");
  compare.type = "checkbox";
  compare.className = "nbattr-compare-toggle";
  const syncCompare = () => { compare.checked = model.get("compare").length > 0; };
  syncCompare();
  compare.addEventListener("change", () => {
    model.set("compare", compare.checked ? model.get("methods").slice() : []);
    model.save_changes();
  });
  for (const c of [method, baseline, steps, cmap, sign, opacity, clip]) for (const [n, f] of c.listeners) on(n, f);
  on("change:compare", syncCompare);

  const controls = div("nbattr-controls");
  // colormap, sign, opacity, clipping and the compare grid apply to the image view only
  const imageOnly = [labelled("colormap", cmap.el), labelled("sign", sign.el), labelled("opacity", opacity.el),
    labelled("clip %", clip.el), labelled("compare", compare)];
  controls.append(labelled("method", method.el), labelled("baseline", baseline.el), steps.control, ...imageOnly);
  const showImageControls = () => {
    for (const c of imageOnly) c.style.display = model.get("kind") === "image" ? "" : "none";
  };
  showImageControls();
  on("change:kind", showImageControls);

  // status
  const progress = div("nbattr-progress");
  const progressBar = div("nbattr-progress-bar");
  progress.appendChild(progressBar);
  const statusText = div("nbattr-status");
  const error = div("nbattr-error");
  error.setAttribute("role", "alert");

  // views
  const canvas = document.createElement("canvas");
  canvas.className = "nbattr-canvas";
  const legend = div("nbattr-legend");
  const textView = div("nbattr-text");
  const barsView = div("nbattr-tabular");
  const viewCol = div("nbattr-view");
  viewCol.append(canvas, legend, textView, barsView);
  const receipt = div("nbattr-receipt");
  const topk = div("nbattr-topk");
  const side = div("nbattr-side");
  side.append(div("nbattr-subtitle", "predictions (click to explain)"), topk, div("nbattr-subtitle", "receipt"), receipt);
  const main = div("nbattr-row nbattr-top");
  main.append(viewCol, side);
  const player = createPlayer();
  const grid = div("nbattr-grid");
  root.append(controls, progress, statusText, error, main, player.el, grid);

  let image = null; // Uint8 RGBA (H, W, 4)
  let imgShape = null;
  const loadImage = () => {
    const a = decode(model.get("image_data"));
    image = a ? a.data : null;
    imgShape = a ? a.shape : null;
  };

  const opts = () => ({ cmap: model.get("colormap"), opacity: model.get("opacity"), clip: model.get("clip"), sign: model.get("sign") });

  function viewShape(arr) {
    // maps arrive as (2, H, W) for images, (2, L) for tokens / features
    return arr.shape.length === 3 ? [arr.shape[1], arr.shape[2]] : [1, arr.shape[1]];
  }

  function drawMain() {
    const kind = model.get("kind");
    const arr = decode(model.get("map_data"));
    root.dataset.kind = kind;
    canvas.style.display = kind === "image" ? "" : "none";
    textView.style.display = kind === "text" ? "" : "none";
    barsView.style.display = kind === "tabular" ? "" : "none";
    if (!arr) return;
    const maps = rows(arr);
    const o = opts();
    if (kind === "image") {
      const [h, w] = viewShape(arr);
      const { values, signed } = select(maps, o.sign);
      const limit = limitOf(values, o.clip);
      drawMap(canvas, { values, h, w, image, limit, signed, cmap: o.cmap, opacity: o.opacity });
      drawLegend(legend, { limit, signed, cmap: o.cmap });
    } else if (kind === "text") {
      const values = maps[1];
      renderTokens(textView, model.get("tokens"), values, limitOf(values, 100));
      legend.replaceChildren();
    } else {
      renderBars(barsView, model.get("feature_names"), maps[1]);
      legend.replaceChildren();
    }
    drawn += 1;
    root.dataset.drawn = String(drawn);
  }

  function drawPlayer() {
    const fw = model.get("frames");
    const frames = fw && fw.view ? decodeFrames(fw) : null;
    if (!frames) {
      player.stop();
      player.el.style.display = "none";
      return;
    }
    player.el.style.display = "";
    const c = decode(model.get("curve"));
    let curve = null;
    if (c) {
      const [alphas, scores, cum] = rows(c);
      curve = { alphas, scores, cum };
    }
    const shp = frames.shape.length === 2 ? frames.shape : [1, frames.shape[0]];
    const isImage = model.get("kind") === "image";
    player.update({ frames, curve, image: isImage ? image : null, h: shp[0], w: shp[1], opts: opts() });
  }

  function drawGrid() {
    grid.replaceChildren();
    const cm = model.get("compare_maps") || {};
    const names = Object.keys(cm);
    grid.style.display = names.length ? "" : "none";
    const o = opts();
    for (const name of names) {
      const arr = decode(cm[name]);
      if (!arr || model.get("kind") !== "image") continue;
      const cell = div("nbattr-grid-cell");
      const c = document.createElement("canvas");
      const [h, w] = viewShape(arr);
      const { values, signed } = select(rows(arr), o.sign);
      drawMap(c, { values, h, w, image, limit: limitOf(values, o.clip), signed, cmap: o.cmap, opacity: o.opacity });
      cell.append(c, div("nbattr-grid-label", name));
      grid.appendChild(cell);
    }
  }

  function drawReceipt() {
    const r = model.get("receipt") || {};
    receipt.replaceChildren();
    if (!r.method) return;
    const line = (k, v) => {
      const d = div("nbattr-receipt-row");
      const a = document.createElement("span");
      a.textContent = k;
      const b = document.createElement("span");
      b.textContent = v;
      d.append(a, b);
      receipt.appendChild(d);
    };
    line("class", `${r.label ?? r.target}`);
    line("F(x)", fmt(r.fx));
    if (r.fbase != null) line("F(x') baseline", fmt(r.fbase));
    line("Σ attributions", fmt(r.total));
    if (r.steps != null) line("steps", r.auto ? `${r.steps} (auto)` : `${r.steps}`);
    if (r.delta != null) {
      line("delta", fmt(r.delta));
      const gap = Math.abs(r.gap ?? 0);
      if (Math.abs(r.delta) > 0.05 * Math.max(gap, 1e-6)) {
        receipt.lastChild.classList.add("bad");
        receipt.lastChild.title = r.auto
          ? "sum of attributions is more than 5% off F(x) - F(x') at the most steps auto takes: untick auto and raise steps"
          : "sum of attributions is more than 5% off F(x) - F(x'): raise steps (or tick auto)";
      }
    }
    if (r.stderr) {
      // a sampling estimator: delta is ~0 whatever the draws, the standard error is its error
      const st = r.stderr;
      const rel = st.relative != null ? ` (${(100 * st.relative).toPrecision(2)}% of the largest)` : "";
      line("sampling error", `± ${fmt(st.max)}${rel}`);
      const row = receipt.lastChild;
      row.classList.add("nbattr-stderr");
      const over = st.draws != null ? ` over ${st.draws} ${st.of}` : "";
      row.title = `the largest standard error of an attribution${over}; it shrinks as 1/√${st.of}`;
      if (st.relative != null && st.relative > SAMPLING_BAD) {
        row.classList.add("bad");
        row.title += `. Above ${100 * SAMPLING_BAD}% the brightest parts of the map are not settled: `
          + `more ${st.of}, e.g. Explain(..., options={"${r.method}": {"${st.of}": ${2 * (st.draws || 24)}}})`;
      }
    }
    line("time", r.cached ? "cached" : `${(r.seconds ?? 0).toFixed(3)} s`);
    for (const n of r.notes || []) receipt.appendChild(div("nbattr-note", `⚠ ${n}`)); // text, never HTML
    const bad = Object.entries(r.unsupported || {});
    if (bad.length) {
      // the operations by name (text, never HTML); the engine's warning, with its consequence, on hover
      const names = bad.map(([k, v]) => `${k} ×${v}`).join(", ");
      const badge = div("nbattr-badge", `⚠ no rule for ${names}: plain gradient there`);
      badge.title = r.unsupported_note || `no rule for ${names}; plain gradient used`;
      receipt.appendChild(badge);
    }
  }

  function drawStatus() {
    const st = model.get("status");
    root.dataset.status = st;
    const done = model.get("progress") || 0;
    // computing: a sliding bar until the engine reports how far its pass is, then that fraction
    progress.classList.toggle("busy", st === "computing" && !(done > 0));
    progress.dataset.progress = String(done);
    progressBar.style.width = `${Math.round(100 * done)}%`;
    const pct = done > 0 && done < 1 ? ` ${Math.round(100 * done)}%` : "";
    statusText.textContent = st === "computing" ? `computing ${model.get("method")}…${pct}` : "";
    const err = model.get("error");
    error.textContent = err;
    error.style.display = err ? "" : "none";
  }

  function all() {
    root.dataset.method = model.get("method");
    root.dataset.target = String(model.get("target"));
    drawMain();
    drawPlayer();
    drawGrid();
    drawReceipt();
    renderTopk(topk, model);
    drawStatus();
    root.dataset.seq = String(model.get("seq"));
  }

  loadImage();
  all();
  on("change:image_data", () => { loadImage(); all(); });
  on("change:seq", all); // a published result (maps, frames, receipt arrive together)
  on("change:status", drawStatus);
  on("change:progress", drawStatus);
  on("change:error", drawStatus);
  on("change:method", () => { root.dataset.method = model.get("method"); });
  on("change:target", () => { root.dataset.target = String(model.get("target")); renderTopk(topk, model); });
  on("change:topk", () => renderTopk(topk, model));
  // display options: redrawn in the page, no kernel round trip needed
  for (const k of ["colormap", "sign", "opacity", "clip"]) {
    on(`change:${k}`, () => { drawMain(); drawGrid(); player.restyle(opts()); });
  }

  return () => {
    player.stop();
    for (const [n, f] of listeners) model.off(n, f);
  };
}

export default { render };
