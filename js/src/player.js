// α player: scrub the interior-gradient maps α = 0..1 beside the score curve F(x' + α(x − x'))
// and F(x') + the cumulative attribution sum (they meet at α = 1 when the attributions add up).
import { drawMap } from "./heatmap.js";
import { limitOf, fmt } from "./colormap.js";

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  return e;
}

function h(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text; // text, never HTML
  return e;
}

export function createPlayer() {
  const el = h("div", "nbattr-player");
  const title = h("div", "nbattr-subtitle", "interior gradients along α");
  const canvas = h("canvas", "nbattr-frame");
  const row = h("div", "nbattr-row");
  const play = h("button", "nbattr-play", "▶ play");
  play.type = "button";
  play.setAttribute("aria-label", "play or pause the α animation");
  const slider = h("input", "nbattr-alpha");
  slider.type = "range";
  slider.min = "0";
  slider.step = "1";
  slider.setAttribute("aria-label", "α step");
  const label = h("span", "nbattr-alpha-label");
  row.append(play, slider, label);
  const chart = svg("svg", { width: 240, height: 130, class: "nbattr-chart", role: "img" });
  const key = h("div", "nbattr-chart-key");
  key.append(h("span", "k-score", "— F(x' + α(x − x'))"),
             h("span", "k-cum", "— F(x') + Σ attributions up to α"));
  const left = document.createElement("div");
  left.append(canvas, row);
  const right = document.createElement("div");
  right.append(chart, key);
  const body = document.createElement("div");
  body.className = "nbattr-row nbattr-top";
  body.append(left, right);
  el.append(title, body);

  let state = null; // {frames, curve, image, h, w, opts}
  let timer = null;
  let marker = null;

  function show(k) {
    if (!state) return;
    const { frames, curve, h, w } = state;
    k = Math.max(0, Math.min(frames.count - 1, k));
    const values = frames.frame(k);
    const o = state.opts;
    drawMap(canvas, { values, h, w, image: state.image, limit: limitOf(values, o.clip), signed: false, cmap: o.cmap, opacity: o.opacity });
    slider.value = String(k);
    const a = curve ? curve.alphas[k] : k / Math.max(1, frames.count - 1);
    label.textContent = `α = ${a.toFixed(3)}  |grad| scale ${fmt(frames.scales[k])}`;
    el.dataset.frame = String(k);
    if (marker && curve) {
      const x = state.sx(a);
      marker.setAttribute("x1", x);
      marker.setAttribute("x2", x);
    }
  }

  function drawChart(curve) {
    chart.replaceChildren();
    marker = null;
    if (!curve) return;
    const W = 240, H = 130, L = 44, R = 6, T = 6, B = 20;
    const ys = [...curve.scores, ...curve.cum];
    let lo = Math.min(...ys), hi = Math.max(...ys);
    if (!(hi > lo)) { hi = lo + 1; }
    const sx = (a) => L + a * (W - L - R);
    const sy = (v) => T + (1 - (v - lo) / (hi - lo)) * (H - T - B);
    state.sx = sx;
    chart.appendChild(svg("rect", { x: L, y: T, width: W - L - R, height: H - T - B, class: "frame" }));
    const line = (vals, cls) => {
      const pts = Array.from(vals, (v, i) => `${sx(curve.alphas[i]).toFixed(1)},${sy(v).toFixed(1)}`).join(" ");
      chart.appendChild(svg("polyline", { points: pts, class: cls, fill: "none" }));
    };
    line(curve.cum, "cum");
    line(curve.scores, "score");
    const txt = (x, y, s, anchor = "end") => {
      const t = svg("text", { x, y, "text-anchor": anchor, class: "tick" });
      t.textContent = s;
      chart.appendChild(t);
    };
    txt(L - 3, T + 8, fmt(hi));
    txt(L - 3, H - B, fmt(lo));
    txt(L, H - 6, "α=0", "start");
    txt(W - R, H - 6, "1");
    marker = svg("line", { y1: T, y2: H - B, class: "marker" });
    chart.appendChild(marker);
  }

  function stop() {
    if (timer) clearInterval(timer);
    timer = null;
    play.textContent = "▶ play";
    el.dataset.playing = "0";
  }

  play.addEventListener("click", () => {
    if (timer) return stop();
    if (!state) return;
    play.textContent = "❚❚ pause";
    el.dataset.playing = "1";
    timer = setInterval(() => {
      const k = (Number(slider.value) + 1) % state.frames.count;
      show(k);
    }, 120);
  });
  slider.addEventListener("input", () => show(Number(slider.value)));

  return {
    el,
    update({ frames, curve, image, h, w, opts }) {
      const keep = state && state.frames.count === frames.count ? Number(slider.value) : frames.count - 1;
      state = { frames, curve, image, h, w, opts };
      slider.max = String(frames.count - 1);
      drawChart(curve);
      show(keep);
    },
    restyle(opts) {
      if (!state) return;
      state.opts = opts;
      show(Number(slider.value));
    },
    stop,
  };
}
