// Decoding of the binary wire format made by nbattr/widget/codec.py.
// A buffer arrives as a DataView (ipywidgets), an ArrayBuffer or a TypedArray; its byteOffset is
// honoured. An offset not aligned to the element size is copied once (TypedArrays require it).

const CTORS = { float32: Float32Array, uint8: Uint8Array };

export function toBytes(view) {
  if (view instanceof ArrayBuffer) return new Uint8Array(view);
  if (ArrayBuffer.isView(view)) return new Uint8Array(view.buffer, view.byteOffset, view.byteLength);
  throw new TypeError("nbattr: expected a binary buffer, got " + Object.prototype.toString.call(view));
}

export function decode(wire) {
  if (!wire || wire.view == null) return null;
  const Ctor = CTORS[wire.dtype];
  if (!Ctor) throw new TypeError(`nbattr: unsupported dtype ${wire.dtype}`);
  const shape = (wire.shape || []).map(Number);
  const n = shape.reduce((a, b) => a * b, 1);
  const bytes = toBytes(wire.view);
  const need = n * Ctor.BYTES_PER_ELEMENT;
  if (bytes.byteLength < need) throw new RangeError(`nbattr: buffer has ${bytes.byteLength} bytes, shape needs ${need}`);
  let data;
  if (bytes.byteOffset % Ctor.BYTES_PER_ELEMENT === 0) {
    data = new Ctor(bytes.buffer, bytes.byteOffset, n);
  } else {
    data = new Ctor(bytes.slice(0, need).buffer, 0, n);
  }
  return { data, shape, dtype: wire.dtype };
}

// Rows of a decoded (R, ...) array as subarray views (no copy).
export function rows(arr) {
  const r = arr.shape[0];
  const size = arr.data.length / r;
  const out = [];
  for (let i = 0; i < r; i++) out.push(arr.data.subarray(i * size, (i + 1) * size));
  return out;
}

// Animation frames: one uint8 buffer (F, ...) and F scales; value = (q - 128) / 127 * scale.
export function decodeFrames(wire) {
  const arr = decode(wire);
  if (!arr) return null;
  const count = arr.shape[0];
  const size = arr.data.length / count;
  const scales = (wire.scales || []).map(Number);
  return {
    count,
    shape: arr.shape.slice(1),
    scales,
    frame(k) {
      const q = arr.data.subarray(k * size, (k + 1) * size);
      const s = scales[k] || 0;
      const out = new Float32Array(size);
      for (let i = 0; i < size; i++) out[i] = ((q[i] - 128) / 127) * s;
      return out;
    },
  };
}
