import { test } from "node:test";
import assert from "node:assert/strict";
import { JsonSyntaxError, parseJson, PyFloat, PyIntLiteral, pyFloatRepr, pyJsonDumps } from "../src/index.js";

test("pyFloatRepr matches CPython repr(float)", () => {
  // Expected strings are what CPython 3 prints for repr(x).
  const cases: [number, string][] = [
    [0, "0.0"],
    [-0, "-0.0"],
    [1, "1.0"],
    [6, "6.0"],
    [0.1, "0.1"],
    [1e-5, "1e-05"],
    [0.0001, "0.0001"],
    [0.00012, "0.00012"],
    [1.5e-7, "1.5e-07"],
    [1e16, "1e+16"],
    [1234567890123456, "1234567890123456.0"],
    [12345678901234567, "1.2345678901234568e+16"],
    [-2.5e20, "-2.5e+20"],
    [123.456, "123.456"],
    [1e22, "1e+22"],
    [5e-324, "5e-324"],
    [1.7976931348623157e308, "1.7976931348623157e+308"],
    [Math.fround(0.1), "0.10000000149011612"],
    [Math.fround(1e-5), "9.999999747378752e-06"],
    [0.5005340576171875, "0.5005340576171875"],
    [Infinity, "Infinity"],
    [NaN, "NaN"],
  ];
  for (const [x, s] of cases) assert.equal(pyFloatRepr(x), s, `repr(${x})`);
});

test("pyJsonDumps uses Python's separators, ensure_ascii and int/float distinction", () => {
  assert.equal(
    pyJsonDumps({ quant_type: "nf4", blocksize: 64, shape: [2, 3], off: new PyFloat(2), x: null, t: true }),
    '{"quant_type": "nf4", "blocksize": 64, "shape": [2, 3], "off": 2.0, "x": null, "t": true}',
  );
  assert.equal(pyJsonDumps({ b: 1, a: [] }, { sortKeys: true }), '{"a": [], "b": 1}');
  assert.equal(pyJsonDumps("é\u0001\"\\\n\u007f😀"), '"\\u00e9\\u0001\\"\\\\\\n\\u007f\\ud83d\\ude00"');
  assert.equal(
    pyJsonDumps({ z: { y: [1, { }], x: {} }, a: 0.5 }, { indent: 2, sortKeys: true }),
    '{\n  "a": 0.5,\n  "z": {\n    "x": {},\n    "y": [\n      1,\n      {}\n    ]\n  }\n}',
  );
  assert.equal(pyJsonDumps(new PyIntLiteral("123456789012345678901234567890")), "123456789012345678901234567890");
});

test("parseJson: strict, duplicate keys, lossless numbers", () => {
  assert.deepEqual(parseJson('{"a": [1, 2.5, "x"], "b": null}'), { a: [1, 2.5, "x"], b: null });
  assert.throws(() => parseJson('{"a": 1, "a": 2}', { rejectDuplicateKeys: true }), JsonSyntaxError);
  assert.deepEqual(parseJson('{"a": 1, "a": 2}'), { a: 2 });
  for (const bad of ["", "{", '{"a":}', "[1,]", '{"a":1}x', "01", "'a'", '"\u0001"', "nul"]) {
    assert.throws(() => parseJson(bad), JsonSyntaxError, bad);
  }
  const v = parseJson('{"theta": 10000.0, "eps": 1e-05, "n": 5, "big": 123456789012345678901}', { lossless: true }) as Record<string, unknown>;
  assert.ok(v.theta instanceof PyFloat && v.theta.value === 10000);
  assert.ok(v.eps instanceof PyFloat);
  assert.equal(v.n, 5);
  assert.ok(v.big instanceof PyIntLiteral);
  // Round trip as Python would re-dump a config it loaded.
  assert.equal(pyJsonDumps(v as never), '{"theta": 10000.0, "eps": 1e-05, "n": 5, "big": 123456789012345678901}');
  const proto = parseJson('{"__proto__": {"x": 1}}') as Record<string, unknown>;
  assert.deepEqual(Object.keys(proto), ["__proto__"]);
  assert.equal(({} as Record<string, unknown>).x, undefined);
});
