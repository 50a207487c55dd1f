// Colormaps, sign modes and percentile clipping, all in the page (no kernel round trip).

const STOPS = {
  inferno: ["#000004", "#1b0c41", "#4a0c6b", "#781c6d", "#a52c60", "#cf4446", "#ed6925", "#fb9b06", "#f7d13d", "#fcffa4"],
  viridis: ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"],
  magma: ["#000004", "#180f3d", "#440f76", "#721f81", "#9e2f7f", "#cd4071", "#f1605d", "#fd9668", "#feca8d", "#fcfdbf"],
  hot: ["#0b0000", "#6b0000", "#cc0000", "#ff3300", "#ff9900", "#ffff00", "#ffffff"],
  gray: ["#000000", "#ffffff"],
  // diverging, used for signed maps: negative blue, zero white, positive red
  RdBu: ["#053061", "#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7", "#fddbc7", "#f4a582", "#d6604d", "#b2182b", "#67001f"],
};

export const SEQUENTIAL = ["inferno", "viridis", "magma", "hot", "gray"];
export const DIVERGING = "RdBu";
export const SIGN_MODES = ["absolute", "positive", "negative", "signed"];

function hex(h) {
  const v = parseInt(h.slice(1), 16);
  return [(v >> 16) & 255, (v >> 8) & 255, v & 255];
}

const cache = new Map();

// 256 x RGB lookup table.
export function lut(name) {
  const key = STOPS[name] ? name : "inferno";
  if (cache.has(key)) return cache.get(key);
  const stops = STOPS[key].map(hex);
  const out = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const pos = (i / 255) * (stops.length - 1);
    const j = Math.min(Math.floor(pos), stops.length - 2);
    const f = pos - j;
    for (let c = 0; c < 3; c++) out[i * 3 + c] = Math.round(stops[j][c] * (1 - f) + stops[j + 1][c] * f);
  }
  cache.set(key, out);
  return out;
}

// p-th percentile (0..100) of |values|; linear interpolation between order statistics.
export function percentile(values, p) {
  const n = values.length;
  if (n === 0) return 0;
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = Math.abs(values[i]);
  a.sort();
  const pos = (Math.min(Math.max(p, 0), 100) / 100) * (n - 1);
  const lo = Math.floor(pos);
  const hi = Math.min(lo + 1, n - 1);
  return a[lo] + (a[hi] - a[lo]) * (pos - lo);
}

// maps = [absSum, signedSum] (Float32Arrays). Returns the values to draw for a sign mode.
export function select(maps, mode) {
  const [abs, signed] = maps;
  if (mode === "signed") return { values: signed, signed: true };
  if (mode === "positive" || mode === "negative") {
    const s = mode === "positive" ? 1 : -1;
    const v = new Float32Array(signed.length);
    for (let i = 0; i < v.length; i++) v[i] = Math.max(s * signed[i], 0);
    return { values: v, signed: false };
  }
  return { values: abs, signed: false };
}

// Clip limit: the clip-th percentile of |values|, falling back to the max, then 1.
export function limitOf(values, clip) {
  let lim = percentile(values, clip);
  if (!(lim > 0)) {
    lim = 0;
    for (let i = 0; i < values.length; i++) lim = Math.max(lim, Math.abs(values[i]));
  }
  return lim > 0 ? lim : 1;
}

// Values -> RGBA (Uint8ClampedArray, 4 per value). Alpha grows with |value| times opacity, so
// unimportant regions show the input underneath.
export function colorize(values, { limit, signed, cmap = "inferno", opacity = 0.65 }) {
  const table = lut(signed ? DIVERGING : cmap);
  const n = values.length;
  const out = new Uint8ClampedArray(n * 4);
  for (let i = 0; i < n; i++) {
    let t = values[i] / limit;
    let idx, a;
    if (signed) {
      t = Math.max(-1, Math.min(1, t));
      idx = Math.round(((t + 1) / 2) * 255);
      a = Math.abs(t);
    } else {
      t = Math.max(0, Math.min(1, t));
      idx = Math.round(t * 255);
      a = t;
    }
    out[i * 4] = table[idx * 3];
    out[i * 4 + 1] = table[idx * 3 + 1];
    out[i * 4 + 2] = table[idx * 3 + 2];
    out[i * 4 + 3] = Math.round(255 * Math.min(1, opacity) * Math.sqrt(a));
  }
  return out;
}

// A CSS colour for one signed value (token backgrounds, bars).
export function signedColor(v, limit, alpha = 1) {
  const table = lut(DIVERGING);
  const t = Math.max(-1, Math.min(1, limit > 0 ? v / limit : 0));
  const idx = Math.round(((t + 1) / 2) * 255);
  return `rgba(${table[idx * 3]}, ${table[idx * 3 + 1]}, ${table[idx * 3 + 2]}, ${alpha})`;
}

export function fmt(v) {
  if (v == null || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e4)) return v.toExponential(2);
  const s = v.toPrecision(4);
  return s.includes(".") && !s.includes("e") ? s.replace(/\.?0+$/, "") : s;
}
