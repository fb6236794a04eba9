/**
 * JSON the way Python's `json` module writes it, and a strict JSON parser.
 *
 * Why: the files we write are read by Python tools (transformers, PEFT, bitsandbytes), and some are
 * compared byte for byte: bitsandbytes stores `json.dumps(dict)` of the quant state as a uint8 tensor,
 * transformers writes config.json with `json.dumps(indent=2, sort_keys=True)`. JavaScript's
 * `JSON.stringify` differs (separators, `6` vs `6.0`, `1e-05` vs `0.00001`, no ASCII escaping), and
 * `JSON.parse` forgets whether a literal was an int or a float and silently drops duplicate keys.
 */

/** A number that Python holds as a float (printed `6.0`, not `6`). */
export class PyFloat {
  constructor(readonly value: number) {}
}

/**
 * A number literal whose exact text must survive a round trip (ints beyond 2^53).
 * `text` must be a valid JSON integer literal.
 */
export class PyIntLiteral {
  constructor(readonly text: string) {}
}

export type PyJsonValue =
  | null
  | boolean
  | number
  | string
  | PyFloat
  | PyIntLiteral
  | PyJsonValue[]
  | { [key: string]: PyJsonValue | undefined };

/**
 * Python's `repr(float)` (what `json.dumps` prints for a float): the shortest digit string that
 * round-trips, in fixed notation when the decimal exponent is in [-4, 16), else `d.ddde±XX`.
 */
export function pyFloatRepr(x: number): string {
  if (Number.isNaN(x)) return "NaN";
  if (x === Infinity) return "Infinity";
  if (x === -Infinity) return "-Infinity";
  if (x === 0) return Object.is(x, -0) ? "-0.0" : "0.0";
  const sign = x < 0 ? "-" : "";
  // toExponential() without an argument yields the shortest round-trip digits (ECMA-262 Number::toString).
  const m = /^(\d)(?:\.(\d+))?e([+-]\d+)$/.exec(Math.abs(x).toExponential());
  if (!m) throw new Error(`pyFloatRepr: unexpected form for ${x}`);
  const digits = (m[1]! + (m[2] ?? "")).replace(/0+$/, "") || "0";
  const exp10 = Number(m[3]); // value = d.ddd × 10^exp10
  const decpt = exp10 + 1; // value = 0.ddd × 10^decpt (CPython's convention)
  if (decpt > -4 && decpt <= 16) {
    if (decpt <= 0) return `${sign}0.${"0".repeat(-decpt)}${digits}`;
    if (decpt >= digits.length) return `${sign}${digits}${"0".repeat(decpt - digits.length)}.0`;
    return `${sign}${digits.slice(0, decpt)}.${digits.slice(decpt)}`;
  }
  const mant = digits.length > 1 ? `${digits[0]}.${digits.slice(1)}` : digits;
  const e = exp10 < 0 ? `-${String(-exp10).padStart(2, "0")}` : `+${String(exp10).padStart(2, "0")}`;
  return `${sign}${mant}e${e}`;
}

/** Python `json.dumps` string escaping with ensure_ascii=True. */
export function pyJsonString(s: string): string {
  let out = '"';
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c === 0x22) out += '\\"';
    else if (c === 0x5c) out += "\\\\";
    else if (c === 0x0a) out += "\\n";
    else if (c === 0x0d) out += "\\r";
    else if (c === 0x09) out += "\\t";
    else if (c === 0x08) out += "\\b";
    else if (c === 0x0c) out += "\\f";
    else if (c < 0x20 || c > 0x7e) out += "\\u" + c.toString(16).padStart(4, "0");
    else out += s[i];
  }
  return out + '"';
}

export interface PyDumpsOptions {
  /** Like Python's indent: pretty-print with this many spaces (item separator then becomes ","). */
  indent?: number;
  sortKeys?: boolean;
}

/** `json.dumps(value, indent=..., sort_keys=...)` with Python's default separators. */
export function pyJsonDumps(value: PyJsonValue, opts: PyDumpsOptions = {}): string {
  const indent = opts.indent;
  const itemSep = indent === undefined ? ", " : ",";
  const keySep = ": ";
  const enc = (v: PyJsonValue, level: number): string => {
    if (v === null) return "null";
    if (v === true) return "true";
    if (v === false) return "false";
    if (typeof v === "string") return pyJsonString(v);
    if (typeof v === "number") {
      // Plain JS numbers that are integral are Python ints; wrap in PyFloat to force a float.
      if (Number.isInteger(v) && !Object.is(v, -0)) {
        if (!Number.isSafeInteger(v)) return BigInt(v).toString();
        return String(v);
      }
      return pyFloatRepr(v);
    }
    if (v instanceof PyFloat) return pyFloatRepr(v.value);
    if (v instanceof PyIntLiteral) return v.text;
    const nl = indent === undefined ? "" : "\n" + " ".repeat(indent * (level + 1));
    const nlEnd = indent === undefined ? "" : "\n" + " ".repeat(indent * level);
    if (Array.isArray(v)) {
      if (v.length === 0) return "[]";
      return "[" + nl + v.map((x) => enc(x, level + 1)).join(itemSep + nl) + nlEnd + "]";
    }
    const keys = Object.keys(v).filter((k) => v[k] !== undefined);
    if (opts.sortKeys) keys.sort(comparePyStrings);
    if (keys.length === 0) return "{}";
    return (
      "{" +
      nl +
      keys.map((k) => pyJsonString(k) + keySep + enc(v[k] as PyJsonValue, level + 1)).join(itemSep + nl) +
      nlEnd +
      "}"
    );
  };
  return enc(value, 0);
}

/** Python compares str by code point; JS `<` compares UTF-16 units (differs above U+FFFF). */
export function comparePyStrings(a: string, b: string): number {
  const ia = a[Symbol.iterator]();
  const ib = b[Symbol.iterator]();
  for (;;) {
    const x = ia.next();
    const y = ib.next();
    if (x.done || y.done) return x.done && y.done ? 0 : x.done ? -1 : 1;
    const cx = x.value.codePointAt(0)!;
    const cy = y.value.codePointAt(0)!;
    if (cx !== cy) return cx < cy ? -1 : 1;
  }
}

export class JsonSyntaxError extends Error {}

export interface ParseJsonOptions {
  /** Keep Python's int/float distinction: floats become PyFloat, big ints PyIntLiteral. */
  lossless?: boolean;
  /** Reject objects with a repeated key (safetensors headers must not have them). */
  rejectDuplicateKeys?: boolean;
}

/**
 * A strict RFC 8259 parser. Used where JSON.parse is not enough: duplicate-key detection for
 * safetensors headers, and int/float-preserving parsing of config.json before we rewrite it.
 */
export function parseJson(text: string, opts: ParseJsonOptions = {}): unknown {
  let i = 0;
  const n = text.length;
  const fail = (what: string): never => {
    throw new JsonSyntaxError(`${what} at offset ${i}`);
  };
  const ws = () => {
    while (i < n) {
      const c = text.charCodeAt(i);
      if (c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09) i++;
      else break;
    }
  };
  const str = (): string => {
    // Fast path: find the closing quote; fall back to JSON.parse of the literal when escapes appear.
    const start = i;
    i++;
    let escaped = false;
    while (i < n) {
      const c = text.charCodeAt(i);
      if (c === 0x22) break;
      if (c === 0x5c) {
        escaped = true;
        i += 2;
        continue;
      }
      if (c < 0x20) fail("control character in string");
      i++;
    }
    if (i >= n) fail("unterminated string");
    i++;
    const lit = text.slice(start, i);
    if (!escaped) return lit.slice(1, -1);
    try {
      return JSON.parse(lit) as string;
    } catch {
      return fail("bad string escape");
    }
  };
  const num = (): unknown => {
    const m = /^-?(?:0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?/.exec(text.slice(i, i + 400));
    if (!m) return fail("bad number");
    i += m[0].length;
    const isFloat = m[1] !== undefined || m[2] !== undefined;
    const v = Number(m[0]);
    if (!opts.lossless) return v;
    if (isFloat) return new PyFloat(v);
    return Number.isSafeInteger(v) ? v : new PyIntLiteral(m[0]);
  };
  const value = (depth: number): unknown => {
    if (depth > 512) fail("nesting too deep");
    ws();
    if (i >= n) fail("unexpected end");
    const c = text[i];
    if (c === "{") {
      i++;
      const obj: Record<string, unknown> = Object.create(null);
      const out: Record<string, unknown> = {};
      ws();
      if (text[i] === "}") {
        i++;
        return out;
      }
      for (;;) {
        ws();
        if (text[i] !== '"') fail("expected a key");
        const k = str();
        ws();
        if (text[i] !== ":") fail("expected ':'");
        i++;
        const v = value(depth + 1);
        if (opts.rejectDuplicateKeys && Object.prototype.hasOwnProperty.call(obj, k)) {
          throw new JsonSyntaxError(`duplicate key ${JSON.stringify(k)}`);
        }
        obj[k] = true;
        // defineProperty: a key named "__proto__" must become a plain own property.
        Object.defineProperty(out, k, { value: v, enumerable: true, writable: true, configurable: true });
        ws();
        if (text[i] === ",") {
          i++;
          continue;
        }
        if (text[i] === "}") {
          i++;
          return out;
        }
        fail("expected ',' or '}'");
      }
    }
    if (c === "[") {
      i++;
      const arr: unknown[] = [];
      ws();
      if (text[i] === "]") {
        i++;
        return arr;
      }
      for (;;) {
        arr.push(value(depth + 1));
        ws();
        if (text[i] === ",") {
          i++;
          continue;
        }
        if (text[i] === "]") {
          i++;
          return arr;
        }
        fail("expected ',' or ']'");
      }
    }
    if (c === '"') return str();
    if (c === "t" && text.startsWith("true", i)) {
      i += 4;
      return true;
    }
    if (c === "f" && text.startsWith("false", i)) {
      i += 5;
      return false;
    }
    if (c === "n" && text.startsWith("null", i)) {
      i += 4;
      return null;
    }
    if (c === "-" || (c !== undefined && c >= "0" && c <= "9")) return num();
    return fail(`unexpected character ${JSON.stringify(c)}`);
  };
  const v = value(0);
  ws();
  if (i !== n) fail("trailing characters");
  return v;
}
