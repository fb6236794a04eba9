/**
 * CRC-32C (Castagnoli; TFRecord framing) and CRC-32 (ISO-HDLC; PNG chunks), table-driven. Both are
 * the reflected forms: init ~0, final xor ~0.
 */

function makeTable(poly: number): Uint32Array {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ poly : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
}

const TABLE_C = makeTable(0x82f63b78);
const TABLE_32 = makeTable(0xedb88320);

function crc(table: Uint32Array, data: Uint8Array, init = 0): number {
  let c = ~init;
  for (let i = 0; i < data.length; i++) c = table[(c ^ data[i]!) & 0xff]! ^ (c >>> 8);
  return ~c >>> 0;
}

export function crc32c(data: Uint8Array): number {
  return crc(TABLE_C, data);
}

/** CRC-32; `init` continues a previous CRC (PNG: over chunk type then data). */
export function crc32(data: Uint8Array, init = 0): number {
  return crc(TABLE_32, data, init);
}

/** TFRecord's masked CRC: rotate right by 15 and add a constant (so CRCs of CRCs are not trivial). */
export function maskedCrc32c(data: Uint8Array): number {
  const c = crc32c(data);
  return ((((c >>> 15) | (c << 17)) >>> 0) + 0xa282ead8) >>> 0;
}
