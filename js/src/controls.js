// Controls: native <select>s and inputs, each bound to one synced trait.

export function labelled(text, input) {
  const l = document.createElement("label");
  l.className = "nbattr-control";
  const s = document.createElement("span");
  s.textContent = text;
  l.append(s, input);
  return l;
}

// A <select> whose options follow a list trait and whose value follows a value trait.
export function bindSelect(model, trait, optionsTrait, { className, titles } = {}) {
  const sel = document.createElement("select");
  sel.className = className || `nbattr-${trait}`;
  sel.setAttribute("aria-label", trait);
  const fill = () => {
    const opts = optionsTrait ? [...(Array.isArray(optionsTrait) ? optionsTrait : model.get(optionsTrait))] : [];
    const cur = String(model.get(trait));
    if (!opts.includes(cur)) opts.push(cur);
    sel.replaceChildren(
      ...opts.map((o) => {
        const op = document.createElement("option");
        op.value = o;
        op.textContent = o;
        const t = titles && titles()[o];
        if (t) op.title = t;
        return op;
      }),
    );
    sel.value = cur;
  };
  fill();
  sel.addEventListener("change", () => {
    model.set(trait, sel.value);
    model.save_changes();
  });
  const listeners = [[`change:${trait}`, fill]];
  if (typeof optionsTrait === "string") listeners.push([`change:${optionsTrait}`, fill]);
  return { el: sel, listeners };
}

export function bindNumber(model, trait, { min, max, step, type = "number", cast = Number, live = false }) {
  const input = document.createElement("input");
  input.type = type;
  input.className = `nbattr-${trait}`;
  input.setAttribute("aria-label", trait);
  if (min != null) input.min = String(min);
  if (max != null) input.max = String(max);
  if (step != null) input.step = String(step);
  const sync = () => { input.value = String(model.get(trait)); };
  sync();
  const commit = () => {
    const v = cast(input.value);
    if (Number.isFinite(v)) {
      model.set(trait, v);
      model.save_changes();
    }
  };
  input.addEventListener(live ? "input" : "change", commit);
  return { el: input, listeners: [[`change:${trait}`, sync]] };
}

// The `steps` trait: "auto" (the engine picks the count) or an int. A number input and an "auto"
// checkbox; while auto is on the number is disabled and keeps the count that unticking restores.
export function bindSteps(model, { min = 2, max = 512, fallback = 32 } = {}) {
  const box = document.createElement("span");
  box.className = "nbattr-steps-box";
  const input = document.createElement("input");
  input.type = "number";
  input.className = "nbattr-steps";
  input.setAttribute("aria-label", "steps");
  input.min = String(min);
  input.max = String(max);
  input.step = "1";
  const auto = document.createElement("input");
  auto.type = "checkbox";
  auto.className = "nbattr-steps-auto";
  auto.setAttribute("aria-label", "auto steps");
  auto.title = "let integrated gradients choose its steps (|delta| within 1%)";
  const autoLabel = document.createElement("label");
  autoLabel.className = "nbattr-steps-auto-label";
  const autoText = document.createElement("span");
  autoText.textContent = "auto";
  autoLabel.append(auto, autoText);
  box.append(input, autoLabel);
  let fixed = fallback;
  const sync = () => {
    const v = model.get("steps");
    const isAuto = v === "auto";
    if (!isAuto && Number.isFinite(Number(v))) fixed = Number(v);
    auto.checked = isAuto;
    input.disabled = isAuto;
    input.value = String(fixed);
  };
  sync();
  const set = (v) => { model.set("steps", v); model.save_changes(); };
  input.addEventListener("change", () => {
    const v = Math.round(Number(input.value));
    if (Number.isFinite(v) && v >= min && v <= max) set(v);
    else sync(); // keep the last valid value
  });
  auto.addEventListener("change", () => set(auto.checked ? "auto" : fixed));
  // laid out like labelled() but as a <div>: a <label> may not hold the checkbox's own label
  const control = document.createElement("div");
  control.className = "nbattr-control";
  const name = document.createElement("span");
  name.textContent = "steps";
  control.append(name, box);
  return { el: box, control, listeners: [["change:steps", sync]] };
}

// Top-k predictions as buttons; clicking one sets `target`.
export function renderTopk(box, model) {
  box.replaceChildren();
  const cur = model.get("target");
  for (const p of model.get("topk")) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "nbattr-class" + (p.index === cur ? " active" : "");
    b.dataset.index = String(p.index);
    const name = document.createElement("span");
    name.className = "nbattr-class-name";
    name.textContent = p.label;
    const prob = document.createElement("span");
    prob.className = "nbattr-class-prob";
    prob.textContent = p.prob == null ? `score ${p.score.toFixed(3)}` : `${(100 * p.prob).toFixed(1)}%`;
    const bar = document.createElement("span");
    bar.className = "nbattr-class-bar";
    bar.style.width = `${Math.round(100 * (p.prob ?? 0))}%`;
    b.append(bar, name, prob);
    b.addEventListener("click", () => {
      model.set("target", p.index);
      model.save_changes();
    });
    box.appendChild(b);
  }
}
