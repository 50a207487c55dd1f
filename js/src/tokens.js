// Text and tabular views. Every token, name and label goes in with textContent: never as HTML.
import { signedColor, fmt } from "./colormap.js";

export function renderTokens(box, tokens, values, limit) {
  box.replaceChildren();
  const row = document.createElement("div");
  row.className = "nbattr-tokens";
  const maxBar = 28;
  tokens.forEach((tok, i) => {
    const v = values[i] ?? 0;
    const cell = document.createElement("span");
    cell.className = "nbattr-token";
    const bar = document.createElement("span");
    bar.className = "nbattr-token-bar";
    bar.style.height = `${Math.round((Math.min(Math.abs(v) / limit, 1)) * maxBar)}px`;
    bar.style.background = signedColor(v, limit, 0.9);
    const text = document.createElement("span");
    text.className = "nbattr-token-text";
    text.textContent = tok;
    text.style.background = signedColor(v, limit, 0.85);
    cell.title = `${tok}: ${v}`; // attribute, not markup
    cell.dataset.value = String(v);
    cell.append(bar, text);
    row.appendChild(cell);
  });
  box.appendChild(row);
}

export function renderBars(box, names, values) {
  box.replaceChildren();
  const order = Array.from(values, (v, i) => i).sort((a, b) => Math.abs(values[b]) - Math.abs(values[a]));
  let max = 0;
  for (const v of values) max = Math.max(max, Math.abs(v));
  max = max || 1;
  const table = document.createElement("div");
  table.className = "nbattr-bars";
  for (const i of order) {
    const v = values[i];
    const row = document.createElement("div");
    row.className = "nbattr-bar-row";
    row.title = `${names[i] ?? i}: ${v}`;
    const name = document.createElement("span");
    name.className = "nbattr-bar-name";
    name.textContent = names[i] ?? String(i);
    const track = document.createElement("span");
    track.className = "nbattr-bar-track";
    const bar = document.createElement("span");
    bar.className = "nbattr-bar " + (v >= 0 ? "pos" : "neg");
    const pct = (Math.abs(v) / max) * 50;
    bar.style.width = `${pct}%`;
    bar.style.left = v >= 0 ? "50%" : `${50 - pct}%`;
    track.appendChild(bar);
    const num = document.createElement("span");
    num.className = "nbattr-bar-value";
    num.textContent = fmt(v);
    row.append(name, track, num);
    table.appendChild(row);
  }
  box.appendChild(table);
}
