import { test } from "node:test";
import assert from "node:assert/strict";
import { lut, percentile, select, limitOf, colorize, signedColor, fmt, SEQUENTIAL } from "../src/colormap.js";

test("lookup tables run from the first to the last stop", () => {
  for (const name of [...SEQUENTIAL, "RdBu"]) {
    const t = lut(name);
    assert.equal(t.length, 256 * 3);
  }
  const g = lut("gray");
  assert.deepEqual(Array.from(g.slice(0, 3)), [0, 0, 0]);
  assert.deepEqual(Array.from(g.slice(255 * 3)), [255, 255, 255]);
  assert.equal(lut("no-such-map"), lut("inferno"));
});

test("percentile of |values| interpolates; clipping limit falls back to the max", () => {
  const v = Float32Array.from([0, -1, 2, -3, 4]);
  assert.equal(percentile(v, 100), 4);
  assert.equal(percentile(v, 0), 0);
  assert.equal(percentile(v, 50), 2);
  assert.equal(percentile(v, 87.5), 3.5);
  assert.equal(limitOf(Float32Array.from([0, 0, 0, 5]), 50), 5);
  assert.equal(limitOf(new Float32Array(3), 99), 1);
});

test("sign modes pick and clamp the right map", () => {
  const maps = [Float32Array.from([1, 2, 3]), Float32Array.from([1, -2, 0.5])];
  assert.deepEqual(Array.from(select(maps, "absolute").values), [1, 2, 3]);
  assert.equal(select(maps, "signed").signed, true);
  assert.deepEqual(Array.from(select(maps, "positive").values), [1, 0, 0.5]);
  assert.deepEqual(Array.from(select(maps, "negative").values), [0, 2, 0]);
});

test("colorize: zero is transparent, the limit is opaque at full opacity; signed uses the diverging map", () => {
  const rgba = colorize(Float32Array.from([0, 1, 5]), { limit: 1, signed: false, cmap: "gray", opacity: 1 });
  assert.equal(rgba[3], 0);
  assert.deepEqual(Array.from(rgba.slice(4, 8)), [255, 255, 255, 255]);
  assert.deepEqual(Array.from(rgba.slice(8, 12)), [255, 255, 255, 255]); // clipped
  const s = colorize(Float32Array.from([-1, 0, 1]), { limit: 1, signed: true, opacity: 0.5 });
  assert.ok(s[2] > s[0], "negative is blue");
  assert.ok(s[8] > s[10], "positive is red");
  assert.equal(s[7], 0);
  assert.equal(s[3], Math.round(255 * 0.5));
  assert.match(signedColor(1, 1), /^rgba\(103, 0, 31, 1\)$/);
});

test("number formatting", () => {
  assert.equal(fmt(1000), "1000");
  assert.equal(fmt(0.5), "0.5");
  assert.equal(fmt(1.23456e-5), "1.23e-5");
  assert.equal(fmt(null), "–");
});
