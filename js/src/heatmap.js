// The image view: the input with the attribution overlaid on a <canvas>, and the legend.
import { colorize, lut, DIVERGING, fmt } from "./colormap.js";

// Integer upscale so small inputs (32x32) are visible; large ones drawn 1:1 up to ~320 px.
export function scaleFor(h, w, target = 256) {
  return Math.max(1, Math.floor(target / Math.max(h, w)));
}

// Composite overlay RGBA (alpha = weight) onto the base RGBA image, in place into `out`.
export function composite(base, overlay, out) {
  for (let i = 0; i < out.length; i += 4) {
    const a = overlay[i + 3] / 255;
    const b0 = base ? base[i] : 0, b1 = base ? base[i + 1] : 0, b2 = base ? base[i + 2] : 0;
    const bw = base ? 1 - a : 0; // without an input image the map is drawn opaque
    const aw = base ? a : 1;
    out[i] = b0 * bw + overlay[i] * aw;
    out[i + 1] = b1 * bw + overlay[i + 1] * aw;
    out[i + 2] = b2 * bw + overlay[i + 2] * aw;
    out[i + 3] = 255;
  }
  return out;
}

export function drawMap(canvas, { values, h, w, image, limit, signed, cmap, opacity }) {
  const s = scaleFor(h, w);
  if (canvas.width !== w * s || canvas.height !== h * s) {
    canvas.width = w * s;
    canvas.height = h * s;
  }
  const overlay = colorize(values, { limit, signed, cmap, opacity });
  const small = new ImageData(w, h);
  composite(image, overlay, small.data);
  const off = document.createElement("canvas");
  off.width = w;
  off.height = h;
  off.getContext("2d").putImageData(small, 0, 0);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(off, 0, 0, w * s, h * s);
}

// A colour bar with numeric labels (0 .. limit, or -limit .. limit when signed).
export function drawLegend(box, { limit, signed, cmap }) {
  box.replaceChildren();
  const bar = document.createElement("canvas");
  bar.width = 160;
  bar.height = 10;
  bar.className = "nbattr-legend-bar";
  const ctx = bar.getContext("2d");
  const table = lut(signed ? DIVERGING : cmap);
  for (let x = 0; x < bar.width; x++) {
    const i = Math.round((x / (bar.width - 1)) * 255);
    ctx.fillStyle = `rgb(${table[i * 3]},${table[i * 3 + 1]},${table[i * 3 + 2]})`;
    ctx.fillRect(x, 0, 1, bar.height);
  }
  const labels = document.createElement("div");
  labels.className = "nbattr-legend-labels";
  const ticks = signed ? [-limit, 0, limit] : [0, limit / 2, limit];
  for (const t of ticks) {
    const span = document.createElement("span");
    span.textContent = fmt(t);
    labels.appendChild(span);
  }
  box.append(bar, labels);
}
