import { test } from "node:test";
import assert from "node:assert/strict";
import { decode, decodeFrames, rows, toBytes } from "../src/codec.js";

test("float32 decode honours dtype, shape and byteOffset of a DataView", () => {
  const src = new Float32Array([1.5, -2, 3.25, 4, 5, 6]);
  const buf = new ArrayBuffer(8 + src.byteLength);
  new Uint8Array(buf, 8).set(new Uint8Array(src.buffer));
  const view = new DataView(buf, 8, src.byteLength); // non-zero offset, as ipywidgets hands it over
  const a = decode({ view, dtype: "float32", shape: [2, 3] });
  assert.ok(a.data instanceof Float32Array);
  assert.deepEqual(a.shape, [2, 3]);
  assert.deepEqual(Array.from(a.data), Array.from(src));
  assert.deepEqual(rows(a).map((r) => Array.from(r)), [[1.5, -2, 3.25], [4, 5, 6]]);
});

test("an unaligned offset is copied, not misread", () => {
  const src = new Float32Array([7, 8, 9]);
  const buf = new ArrayBuffer(3 + src.byteLength);
  new Uint8Array(buf, 3).set(new Uint8Array(src.buffer));
  const a = decode({ view: new DataView(buf, 3, src.byteLength), dtype: "float32", shape: [3] });
  assert.deepEqual(Array.from(a.data), [7, 8, 9]);
});

test("uint8 and plain ArrayBuffer; too short a buffer throws; unknown dtype throws", () => {
  const a = decode({ view: new Uint8Array([1, 2, 3, 4]).buffer, dtype: "uint8", shape: [2, 2] });
  assert.deepEqual(Array.from(a.data), [1, 2, 3, 4]);
  assert.throws(() => decode({ view: new ArrayBuffer(4), dtype: "float32", shape: [2] }), RangeError);
  assert.throws(() => decode({ view: new ArrayBuffer(4), dtype: "float64", shape: [1] }), TypeError);
  assert.equal(decode({}), null);
  assert.throws(() => toBytes([1, 2]), TypeError);
});

test("frames: one uint8 buffer with per-frame scales", () => {
  // frame 0: scale 2 -> values (q-128)/127*2 ; frame 1: scale 0 -> zeros
  const q = new Uint8Array([128, 255, 1, 128, 200, 50]);
  const f = decodeFrames({ view: new DataView(q.buffer), dtype: "uint8", shape: [2, 3], scales: [2, 0] });
  assert.equal(f.count, 2);
  assert.deepEqual(f.shape, [3]);
  const f0 = Array.from(f.frame(0));
  assert.ok(Math.abs(f0[0]) < 1e-7 && Math.abs(f0[1] - 2) < 1e-6 && Math.abs(f0[2] + 2) < 1e-6);
  assert.ok(Array.from(f.frame(1)).every((v) => v === 0));
});
