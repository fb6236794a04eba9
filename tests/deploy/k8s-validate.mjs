// Offline validation of rendered Kubernetes manifests against the Kubernetes API types.
//
// Two checks, because neither catches everything alone:
//  1. kubernetes-models' `.validate()` (JSON schema compiled from the Kubernetes OpenAPI spec):
//     wrong types, bad enum values, missing required fields, formats. Its schemas do NOT forbid
//     unknown properties, so a misspelt field (`runAsNonroot`) would pass silently.
//  2. The TypeScript compiler against kubernetes-models' declarations: every manifest becomes an
//     object literal typed as the kind's interface (IDeployment, IService, ...), and TypeScript's
//     excess-property check rejects any field the API type does not declare, at any depth.
// Used by k8s.test.mjs; plain ESM so it runs without a build step.
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);

/** "apps/v1" + "Deployment" -> "kubernetes-models/apps/v1/Deployment"; core "v1" -> "kubernetes-models/v1/X". */
export function modelModule(apiVersion, kind) {
  if (typeof apiVersion !== "string" || typeof kind !== "string" || !/^[A-Za-z0-9]+$/.test(kind)) {
    throw new Error(`object without a valid apiVersion/kind: ${apiVersion}/${kind}`);
  }
  return `kubernetes-models/${apiVersion}/${kind}`;
}

export const describeObject = (o) =>
  `${o?.kind ?? "?"} ${o?.metadata?.namespace ? o.metadata.namespace + "/" : ""}${o?.metadata?.name ?? "?"}`;

/** Schema validation with kubernetes-models. Returns a list of error strings (empty: valid). */
export async function schemaErrors(obj) {
  let mod;
  try {
    mod = await import(modelModule(obj.apiVersion, obj.kind));
  } catch (e) {
    return [`${describeObject(obj)}: no Kubernetes API type for ${obj.apiVersion}/${obj.kind} (${e.code ?? e.message})`];
  }
  const Model = mod[obj.kind];
  if (typeof Model !== "function") return [`${describeObject(obj)}: kubernetes-models has no class ${obj.kind}`];
  const copy = structuredClone(obj);
  // kustomize wraps long base64 Secret values over several lines; the API server's decoder (Go's
  // encoding/base64) skips \r and \n, the schema's "byte" format does not. Mirror the server.
  if (copy.kind === "Secret" && copy.data && typeof copy.data === "object") {
    for (const [k, v] of Object.entries(copy.data)) if (typeof v === "string") copy.data[k] = v.replace(/[\r\n]/g, "");
  }
  try {
    new Model(copy).validate();
    return [];
  } catch (e) {
    return [`${describeObject(obj)}: ${e.message}`];
  }
}

/**
 * Unknown-field (and static type) check with the TypeScript compiler. All objects are checked in
 * one program (loading the declarations dominates the cost). Returns one list of errors per object.
 */
export function typeErrors(objects) {
  const ts = require("typescript");
  const lines = [];
  const spans = []; // [firstLine, lastLine] (0-based) of each object's literal
  objects.forEach((obj, i) => {
    let spec;
    try {
      spec = modelModule(obj.apiVersion, obj.kind);
    } catch (e) {
      spans.push(null);
      return;
    }
    lines.push(`import type { I${obj.kind} as T${i} } from ${JSON.stringify(spec)};`);
    const first = lines.length;
    lines.push(...`const o${i}: T${i} = ${JSON.stringify(obj, null, 1)};`.split("\n"));
    spans.push([first, lines.length - 1]);
  });
  // A virtual module next to this file, so node_modules resolution finds kubernetes-models.
  const fileName = join(here, "__rendered_manifests__.mts");
  const text = lines.join("\n") + "\nexport {};\n";
  const options = {
    strict: true,
    noEmit: true,
    skipLibCheck: true,
    module: ts.ModuleKind.NodeNext,
    moduleResolution: ts.ModuleResolutionKind.NodeNext,
    target: ts.ScriptTarget.ES2022,
    lib: ["lib.es2022.d.ts"],
    types: [],
  };
  const host = ts.createCompilerHost(options);
  const { getSourceFile, fileExists, readFile } = host;
  host.getSourceFile = (f, lang, ...rest) =>
    f === fileName ? ts.createSourceFile(f, text, lang, true) : getSourceFile.call(host, f, lang, ...rest);
  host.fileExists = (f) => f === fileName || fileExists.call(host, f);
  host.readFile = (f) => (f === fileName ? text : readFile.call(host, f));
  const program = ts.createProgram([fileName], options, host);
  const result = objects.map((obj, i) => (spans[i] ? [] : [`${describeObject(obj)}: no apiVersion/kind`]));
  const diagnostics = [...program.getSyntacticDiagnostics(), ...program.getSemanticDiagnostics()];
  for (const d of diagnostics) {
    const msg = ts.flattenDiagnosticMessageText(d.messageText, "\n");
    if (!d.file || d.file.fileName !== fileName || d.start === undefined) {
      throw new Error(`TypeScript check could not run: ${msg}`);
    }
    const line = d.file.getLineAndCharacterOfPosition(d.start).line;
    const i = spans.findIndex((s) => s && line >= s[0] - 1 && line <= s[1]);
    if (i < 0) throw new Error(`TypeScript check: ${msg} (line ${line + 1})`);
    // The first line of a message names the offending property and the expected type.
    result[i].push(`${describeObject(objects[i])}: ${msg.split("\n")[0]}`);
  }
  return result;
}

/** Both checks; returns all errors for all objects (empty: every object is valid). */
export async function validateObjects(objects) {
  const errors = [];
  for (const o of objects) errors.push(...(await schemaErrors(o)));
  for (const list of typeErrors(objects)) errors.push(...list);
  return errors;
}
