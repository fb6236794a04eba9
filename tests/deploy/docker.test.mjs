// Static checks of the container build files (no image is built here; that is the integration
// tests' job): the properties the Kubernetes manifests and Tilt rely on. When a Docker engine with
// BuildKit is reachable, BuildKit's own parser also checks both Dockerfiles (instructions, flags,
// stage graph), which covers Dockerfile.cuda although its base images cannot be pulled here.
import { test, describe } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const dockerfiles = ["deploy/docker/Dockerfile", "deploy/docker/Dockerfile.cuda"];

/** Instructions of a Dockerfile grouped by stage: [{from, name, instructions: [{op, args}]}]. */
function parseDockerfile(text) {
  const logical = [];
  let current = "";
  for (const raw of text.split("\n")) {
    if (!current && /^\s*#/.test(raw)) continue; // comments (a continuation may not start one)
    if (current && /^\s*#/.test(raw)) continue; // comment lines inside a continued instruction
    const line = raw.replace(/\s+$/, "");
    if (line.endsWith("\\")) {
      current += line.slice(0, -1) + " ";
      continue;
    }
    current += line;
    if (current.trim()) logical.push(current.trim());
    current = "";
  }
  const stages = [];
  const args = {};
  for (const l of logical) {
    const [, op, rest] = l.match(/^(\S+)\s*(.*)$/);
    const OP = op.toUpperCase();
    if (OP === "FROM") {
      const m = rest.match(/^(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?$/i);
      assert.ok(m, `bad FROM: ${l}`);
      const from = m[1].replace(/\$\{(\w+)\}/g, (_, k) => args[k] ?? `\${${k}}`);
      stages.push({ from, name: m[2], instructions: [] });
    } else if (OP === "ARG" && stages.length === 0) {
      const [k, v] = rest.split("=");
      args[k] = v;
    } else {
      assert.ok(stages.length, `instruction before FROM: ${l}`);
      stages.at(-1).instructions.push({ op: OP, args: rest });
    }
  }
  return stages;
}
const last = (stage, op) => stage.instructions.filter((i) => i.op === op).at(-1)?.args;
/** Follows FROM <stage> links so a stage inherits USER/ENTRYPOINT/... from its parent stage. */
function effective(stages, name, op) {
  for (let s = stages.find((x) => x.name === name); s; s = stages.find((x) => x.name === s.from)) {
    const v = last(s, op);
    if (v !== undefined) return v;
  }
  return undefined;
}

for (const file of dockerfiles) {
  describe(file, () => {
    const text = readFileSync(join(root, file), "utf8");
    const stages = parseDockerfile(text);

    test("no '# syntax=' directive (it would pull a frontend image; there is no registry)", () => {
      assert.doesNotMatch(text, /^#\s*syntax\s*=/im);
    });

    test("the default (last) stage is the production runtime; a dev stage exists for Tilt", () => {
      assert.equal(stages.at(-1).name, "runtime");
      assert.ok(stages.some((s) => s.name === "dev"));
      assert.ok(stages.some((s) => s.name === "build"));
    });

    test("runtime: non-root numeric user, entrypoint, SIGTERM, /data volume, TMPDIR", () => {
      assert.equal(effective(stages, "runtime", "USER"), "10001:10001");
      assert.equal(effective(stages, "runtime", "ENTRYPOINT"), '["node", "cli/dist/src/main.js", "serve"]');
      assert.equal(effective(stages, "runtime", "STOPSIGNAL"), "SIGTERM");
      assert.equal(effective(stages, "runtime", "VOLUME"), '["/data"]');
      assert.equal(effective(stages, "runtime", "EXPOSE"), "8080");
      assert.match(effective(stages, "runtime", "ENV"), /TMPDIR=\/tmp/);
      // The CLI binds 127.0.0.1 by default, unreachable from outside the container.
      assert.match(effective(stages, "runtime", "CMD"), /"--host", "0\.0\.0\.0"/);
      assert.equal(effective(stages, "dev", "USER"), "10001:10001", "the dev image runs as the same user");
    });

    test("runtime stages contain no toolchain and only collected runtime files", () => {
      const app = stages.find((s) => s.name === "app");
      for (const i of app.instructions) {
        if (i.op === "RUN") assert.doesNotMatch(i.args, /apt-get install|npm (ci|install)/, "no installs in the runtime image");
        if (i.op === "COPY" && /--from=build/.test(i.args)) assert.match(i.args, /^--from=build \/out\/ \/app\/$/);
      }
      const build = stages.find((s) => s.name === "build");
      const runs = build.instructions.filter((i) => i.op === "RUN").map((i) => i.args).join("\n");
      for (const step of ["npm ci --ignore-scripts", "npm rebuild", "npm run build", "npm prune --omit=dev", "collect-runtime.mjs /out"])
        assert.ok(runs.includes(step), `build stage runs ${step}`);
      // Dependencies (and their slow install scripts) are installed before the sources are copied,
      // so a source change does not reinstall or recompile them.
      const ops = build.instructions.map((i) => `${i.op} ${i.args}`);
      const deps = ops.findIndex((o) => o.includes("npm ci"));
      const sources = ops.indexOf("COPY . .");
      assert.ok(deps >= 0 && sources > deps && ops[deps].includes("npm rebuild"), "npm ci + npm rebuild <deps> come before COPY . .");
      assert.ok(ops.slice(0, deps).every((o) => !o.startsWith("COPY . ")), "only manifests are copied before npm ci");
      assert.ok(runs.includes("rm -rf libs/*/dist services/*/dist cli/dist"), "host dist/ output is dropped before building");
    });

    test("base images", () => {
      if (file.endsWith(".cuda")) {
        assert.match(stages.find((s) => s.name === "build").from, /^nvidia\/cuda:.*-devel-/);
        assert.match(stages.find((s) => s.name === "app").from, /^nvidia\/cuda:/);
        assert.match(effective(stages, "runtime", "CMD"), /"--device", "auto"/);  // the trainer: auto until CUDA training exists
      } else {
        for (const s of stages.filter((s) => !["dev", "runtime"].includes(s.name))) assert.equal(s.from, "node:20-bookworm-slim", s.name);
      }
    });
  });
}

describe(".dockerignore", () => {
  const lines = readFileSync(join(root, ".dockerignore"), "utf8")
    .split("\n")
    .map((l) => l.trim())
    .filter((l) => l && !l.startsWith("#"));
  const { workspaces } = JSON.parse(readFileSync(join(root, "package.json"), "utf8"));

  test("is an allow-list that lets in every workspace and the build inputs", () => {
    assert.equal(lines[0], "*");
    const allowed = lines.filter((l) => l.startsWith("!")).map((l) => l.slice(1).replace(/\/$/, ""));
    const needed = ["package.json", "package-lock.json", ".npmrc", "tsconfig.json", "tsconfig.base.json", "deploy/docker"];
    for (const w of workspaces) needed.push(w.split("/")[0]);
    for (const n of new Set(needed)) assert.ok(allowed.includes(n), `.dockerignore must allow ${n}`);
  });

  test("keeps host build outputs out, but not dist/ (Tilt live update syncs it)", () => {
    assert.ok(lines.includes("**/node_modules"));
    assert.ok(lines.includes("**/build"));
    assert.ok(!lines.some((l) => /(^|\/)dist\/?$/.test(l)), "dist/ must stay in the context for Tilt");
  });
});

// BuildKit's parser, when an engine is reachable (CI installs one for the integration tests).
const docker = ["/usr/bin/docker", "docker"].find((d) => spawnSync(d, ["info"], { stdio: "ignore" }).status === 0);
describe("BuildKit parses the Dockerfiles", { skip: docker ? false : "no reachable Docker engine" }, () => {
  for (const file of dockerfiles) {
    test(file, () => {
      // A target that does not exist: BuildKit parses the whole file and resolves the stage graph,
      // then stops before building (or pulling) anything.
      const r = spawnSync(docker, ["build", "-f", file, "--target", "__parse_only__", "."], {
        cwd: root,
        encoding: "utf8",
        env: { ...process.env, DOCKER_BUILDKIT: "1" },
      });
      assert.match(r.stderr + r.stdout, /target stage __parse_only__ could not be found/, r.stderr);
    });
  }
});
