// Renders every kustomize overlay in deploy/k8s with `kubectl kustomize` (offline) and checks
//  - each object against the Kubernetes API types (k8s-validate.mjs: schema + unknown fields),
//  - the deployment invariants the design relies on (security, probes, limits, GPU placement,
//    references that resolve, network isolation),
//  - that the validator itself rejects broken manifests (negative tests), so a green run means
//    something.
// Run: node --test tests/deploy/   (skips, saying why, when kubectl is not installed)
import { test, describe, before } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { cpSync, mkdtempSync, readFileSync, writeFileSync, rmSync, readdirSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";
import { parseAllDocuments } from "yaml";
import { validateObjects, schemaErrors, typeErrors, describeObject } from "./k8s-validate.mjs";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const k8sDir = join(root, "deploy", "k8s");
const NAMESPACE = "qlora";
const SERVICES = { quantizer: "QuantizerService", trainer: "TrainerService", inference: "InferenceService" };
// Secrets the base only references: an operator creates them in production (see docs/deploy.md).
const EXTERNAL_SECRETS = new Set(["qlora-postgres", "qlora-s3"]);

const kubectl = spawnSync("kubectl", ["version", "--client"], { encoding: "utf8" });
const noKubectl =
  kubectl.error || kubectl.status !== 0
    ? `kubectl is not installed (${kubectl.error?.code ?? kubectl.stderr.trim()}); it renders the kustomize overlays`
    : false;

function kustomize(dir) {
  const r = spawnSync("kubectl", ["kustomize", dir], { encoding: "utf8", maxBuffer: 64 << 20 });
  if (r.status !== 0) throw new Error(`kubectl kustomize ${relative(root, dir)} failed:\n${r.stderr}`);
  const docs = parseAllDocuments(r.stdout);
  for (const d of docs) if (d.errors.length) throw new Error(`unparsable YAML from kustomize: ${d.errors[0].message}`);
  return docs.map((d) => d.toJS()).filter((o) => o !== null);
}

/**
 * Renders an overlay after an edit, on a copy of deploy/k8s (kustomize resolves paths relative to
 * the kustomization and refuses absolute ones, so the whole tree is copied).
 */
function kustomizeEdited(overlay, edit) {
  const dir = mkdtempSync(join(tmpdir(), "qlora-kustomize-"));
  try {
    cpSync(k8sDir, join(dir, "k8s"), { recursive: true });
    const file = join(dir, "k8s", "overlays", overlay, "kustomization.yaml");
    const before = readFileSync(file, "utf8");
    const after = edit(before);
    assert.notEqual(after, before, `the edit of overlays/${overlay}/kustomization.yaml changed nothing`);
    writeFileSync(file, after);
    return kustomize(join(dir, "k8s", "overlays", overlay));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const WORKLOADS = new Set(["Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"]);
const podSpec = (o) => (o.kind === "CronJob" ? o.spec.jobTemplate.spec.template.spec : o.spec.template.spec);
const workloads = (objs) => objs.filter((o) => WORKLOADS.has(o.kind) || o.kind === "CronJob");
const find = (objs, kind, name) => objs.find((o) => o.kind === kind && o.metadata.name === name);
const serviceDeployment = (objs, name) => {
  const d = find(objs, "Deployment", name);
  assert.ok(d, `Deployment ${name} is missing`);
  return d;
};
const serverContainer = (d) => {
  const c = d.spec.template.spec.containers.find((c) => c.name === "server");
  assert.ok(c, `${describeObject(d)} has no container "server"`);
  return c;
};
const matches = (selector, labels) =>
  Object.entries(selector ?? {}).every(([k, v]) => labels?.[k] === v) && Object.keys(selector ?? {}).length > 0;

/**
 * The invariants every overlay must keep. `writableRoot`: names of Deployments whose service
 * container may have a writable root filesystem (only the Tilt overlay, for live update).
 */
function checkInvariants(objs, { writableRoot = [], selfContained = false, requireTags = true } = {}) {
  const problems = [];
  const fail = (o, msg) => problems.push(`${describeObject(o)}: ${msg}`);

  // Namespaces: everything namespaced lands in qlora, which enforces "restricted" pod security.
  const ns = find(objs, "Namespace", NAMESPACE);
  if (!ns) problems.push(`Namespace ${NAMESPACE} missing`);
  else if (ns.metadata.labels?.["pod-security.kubernetes.io/enforce"] !== "restricted")
    fail(ns, "does not enforce the restricted pod security standard");
  for (const o of objs) {
    if (o.kind === "Namespace") continue;
    if (o.metadata.namespace !== NAMESPACE) fail(o, `namespace is ${o.metadata.namespace ?? "(none)"}, not ${NAMESPACE}`);
  }

  const configMaps = new Set(objs.filter((o) => o.kind === "ConfigMap").map((o) => o.metadata.name));
  const secrets = new Set(objs.filter((o) => o.kind === "Secret").map((o) => o.metadata.name));
  const checkSecret = (o, name, optional) => {
    if (secrets.has(name)) return;
    if (optional) return;
    if (selfContained || !EXTERNAL_SECRETS.has(name)) fail(o, `references Secret ${name}, which does not exist`);
  };

  for (const w of workloads(objs)) {
    const spec = podSpec(w);
    const podSc = spec.securityContext ?? {};
    if (spec.automountServiceAccountToken !== false) fail(w, "mounts a service account token");
    for (const c of [...(spec.initContainers ?? []), ...spec.containers]) {
      const where = `container ${c.name}`;
      const sc = c.securityContext ?? {};
      const lim = c.resources?.limits ?? {};
      const req = c.resources?.requests ?? {};
      if (lim.cpu === undefined || lim.memory === undefined) fail(w, `${where} has no cpu/memory limits`);
      if (req.cpu === undefined || req.memory === undefined) fail(w, `${where} has no cpu/memory requests`);
      if (!spec.initContainers?.includes(c)) {
        if (!c.readinessProbe || !c.livenessProbe || !c.startupProbe) fail(w, `${where} lacks startup/readiness/liveness probes`);
      }
      const nonRoot = sc.runAsNonRoot ?? podSc.runAsNonRoot;
      const uid = sc.runAsUser ?? podSc.runAsUser;
      if (nonRoot !== true) fail(w, `${where} is not runAsNonRoot`);
      if (uid === undefined || uid === 0) fail(w, `${where} has no non-zero runAsUser`);
      const writableOk = writableRoot.includes(w.metadata.name) && c.name === "server";
      if (sc.readOnlyRootFilesystem !== true && !writableOk) fail(w, `${where} root filesystem is not read-only`);
      if (sc.allowPrivilegeEscalation !== false) fail(w, `${where} allows privilege escalation`);
      if (sc.privileged) fail(w, `${where} is privileged`);
      if (!(sc.capabilities?.drop ?? []).includes("ALL")) fail(w, `${where} does not drop ALL capabilities`);
      if (sc.capabilities?.add?.length) fail(w, `${where} adds capabilities`);
      if ((sc.seccompProfile ?? podSc.seccompProfile)?.type !== "RuntimeDefault") fail(w, `${where} has no RuntimeDefault seccomp profile`);
      if (!c.image) fail(w, `${where} has no image`);
      else if (requireTags && (c.image.endsWith(":latest") || !/:[^/]+$/.test(c.image))) fail(w, `${where} image ${c.image} has no fixed tag`);
      for (const e of c.envFrom ?? []) {
        if (e.configMapRef && !configMaps.has(e.configMapRef.name)) fail(w, `${where} envFrom ConfigMap ${e.configMapRef.name} does not exist`);
        if (e.secretRef) checkSecret(w, e.secretRef.name, e.secretRef.optional);
      }
      for (const e of c.env ?? []) {
        const cm = e.valueFrom?.configMapKeyRef;
        if (cm && !configMaps.has(cm.name) && !cm.optional) fail(w, `${where} env ${e.name}: ConfigMap ${cm.name} does not exist`);
        const s = e.valueFrom?.secretKeyRef;
        if (s) checkSecret(w, s.name, s.optional);
      }
    }
    for (const v of spec.volumes ?? []) {
      if (v.configMap && !configMaps.has(v.configMap.name)) fail(w, `volume ${v.name}: ConfigMap ${v.configMap.name} does not exist`);
      if (v.secret) checkSecret(w, v.secret.secretName, v.secret.optional);
      if (v.hostPath) fail(w, `volume ${v.name} is a hostPath`);
    }
  }

  // The three services: gRPC port, native gRPC probes for their own health service name, /tmp.
  for (const [name, svc] of Object.entries(SERVICES)) {
    const d = find(objs, "Deployment", name);
    if (!d) {
      problems.push(`Deployment ${name} missing`);
      continue;
    }
    const c = serverContainer(d);
    const want = { port: 8080, service: `qlora.v1.${svc}` };
    for (const p of ["startupProbe", "readinessProbe", "livenessProbe"]) {
      if (JSON.stringify(c[p]?.grpc) !== JSON.stringify(want)) fail(d, `${p} is not grpc ${JSON.stringify(want)}`);
    }
    if (!c.ports?.some((p) => p.name === "grpc" && p.containerPort === 8080)) fail(d, "no container port grpc/8080");
    if (!c.args?.includes(name) || c.args?.[c.args.indexOf("--services") + 1] !== name) fail(d, `args do not select --services ${name}`);
    // `qlora serve` binds 127.0.0.1 unless told otherwise: unreachable for probes and the Service.
    if (c.args?.[c.args.indexOf("--host") + 1] !== "0.0.0.0") fail(d, "args do not bind --host 0.0.0.0");
    if (c.args?.[c.args.indexOf("--port") + 1] !== "8080") fail(d, "args do not set --port 8080");
    if (!c.volumeMounts?.some((m) => m.mountPath === "/tmp")) fail(d, "no writable /tmp mount");
    if (!c.volumeMounts?.some((m) => m.mountPath === "/data")) fail(d, "no /data mount");
    const s = find(objs, "Service", name);
    const port = s?.spec.ports?.find((p) => p.name === "grpc");
    if (!port || port.port !== 8080 || port.appProtocol !== "kubernetes.io/h2c" || port.targetPort !== "grpc")
      problems.push(`Service ${name}: needs port grpc 8080 -> grpc with appProtocol kubernetes.io/h2c`);
    if (!objs.some((o) => o.kind === "PodDisruptionBudget" && matches(o.spec.selector?.matchLabels, d.spec.template.metadata.labels)))
      fail(d, "no PodDisruptionBudget selects its pods");
  }

  // Selectors and targets resolve to something in the same render.
  const podLabels = workloads(objs).map((w) => (w.kind === "CronJob" ? w.spec.jobTemplate.spec.template : w.spec.template).metadata.labels);
  for (const o of objs) {
    if (o.kind === "Service" && !podLabels.some((l) => matches(o.spec.selector, l))) fail(o, "selects no pods");
    if (o.kind === "PodDisruptionBudget" && !podLabels.some((l) => matches(o.spec.selector?.matchLabels, l))) fail(o, "selects no pods");
    if (o.kind === "HorizontalPodAutoscaler" && !find(objs, o.spec.scaleTargetRef.kind, o.spec.scaleTargetRef.name))
      fail(o, `scale target ${o.spec.scaleTargetRef.kind}/${o.spec.scaleTargetRef.name} does not exist`);
    if (WORKLOADS.has(o.kind) && !matches(o.spec.selector?.matchLabels, o.spec.template.metadata.labels))
      fail(o, "selector does not match its pod template");
  }

  // Network isolation: default deny for the namespace; ingress to the services only from the
  // gateway namespaces and from the services themselves.
  const policies = objs.filter((o) => o.kind === "NetworkPolicy");
  const deny = policies.find((p) => Object.keys(p.spec.podSelector ?? {}).length === 0 && !p.spec.ingress && !p.spec.egress);
  if (!deny || !["Ingress", "Egress"].every((t) => deny.spec.policyTypes?.includes(t))) problems.push("no default-deny NetworkPolicy (ingress + egress)");
  const qloraLabels = { "app.kubernetes.io/part-of": "qlora" };
  const ingressPeers = policies
    .filter((p) => matches(p.spec.podSelector?.matchLabels, qloraLabels) && p.spec.policyTypes?.includes("Ingress"))
    .flatMap((p) => (p.spec.ingress ?? []).flatMap((r) => r.from ?? [{ any: true }]));
  for (const peer of ingressPeers) {
    const fromGateway = peer.namespaceSelector?.matchLabels?.["qlora.dev/gateway"] === "true" && !peer.podSelector;
    const fromServices = !peer.namespaceSelector && !peer.ipBlock && peer.podSelector?.matchLabels?.["app.kubernetes.io/part-of"] === "qlora";
    if (!fromGateway && !fromServices) problems.push(`NetworkPolicy lets ${JSON.stringify(peer)} reach the services`);
  }
  if (!ingressPeers.some((p) => p.namespaceSelector?.matchLabels?.["qlora.dev/gateway"] === "true")) problems.push("no ingress from the gateway namespace");
  const egress = policies.filter((p) => matches(p.spec.podSelector?.matchLabels, qloraLabels)).flatMap((p) => p.spec.egress ?? []);
  if (!egress.some((r) => r.ports?.some((p) => p.port === 53 && p.protocol === "UDP"))) problems.push("services have no DNS egress");
  return problems;
}

const gpuRequest = (c) => [c.resources?.limits?.["nvidia.com/gpu"], c.resources?.requests?.["nvidia.com/gpu"]];
// device: what --device must say (the trainer runs "auto" until training on CUDA exists; docs/cuda.md).
function assertOnGpu(objs, name, device) {
  const d = serviceDeployment(objs, name);
  const c = serverContainer(d);
  const spec = d.spec.template.spec;
  assert.deepEqual(gpuRequest(c).map(String), ["1", "1"], `${name}: nvidia.com/gpu limit and request must be 1`);
  assert.match(c.image, /qlora-cuda:/, `${name}: must run the CUDA image`);
  assert.equal(c.args[c.args.indexOf("--device") + 1], device, `${name}: must run with --device ${device}`);
  assert.ok(Object.keys(spec.nodeSelector ?? {}).some((k) => k.startsWith("nvidia.com/")), `${name}: no GPU nodeSelector`);
  assert.ok(
    spec.tolerations?.some((t) => t.key === "nvidia.com/gpu" && t.effect === "NoSchedule"),
    `${name}: does not tolerate the nvidia.com/gpu taint`,
  );
  assert.equal(d.spec.strategy.rollingUpdate.maxSurge, 0, `${name}: a GPU rollout must not need a spare GPU`);
}
function assertOnCpu(objs, name) {
  const c = serverContainer(serviceDeployment(objs, name));
  assert.deepEqual(gpuRequest(c), [undefined, undefined], `${name} must not request GPUs`);
  assert.doesNotMatch(c.image, /cuda/, `${name} must run the CPU image`);
}

describe("deploy/k8s overlays", { skip: noKubectl }, () => {
  const rendered = {};
  before(() => {
    const overlays = readdirSync(join(k8sDir, "overlays"));
    for (const o of overlays) rendered[o] = kustomize(join(k8sDir, "overlays", o));
    rendered.base = kustomize(join(k8sDir, "base"));
    // Exactly what docs/deploy.md tells an operator to do: uncomment the component in overlays/gpu.
    rendered["gpu+inference-gpu"] = kustomizeEdited("gpu", (text) =>
      text.replace("# components:\n#   - ../../components/inference-gpu", "components:\n  - ../../components/inference-gpu"),
    );
  });

  test("the expected overlays exist and render", () => {
    for (const o of ["local", "gpu", "tilt"]) assert.ok(existsSync(join(k8sDir, "overlays", o, "kustomization.yaml")), o);
    for (const [name, objs] of Object.entries(rendered)) assert.ok(objs.length > 10, `${name} rendered ${objs.length} objects`);
  });

  test("every object of every overlay validates against the Kubernetes API types", async () => {
    // All renders in one TypeScript program: loading the declarations is the expensive part.
    const all = Object.entries(rendered).flatMap(([name, objs]) => objs.map((o) => [name, o]));
    const errors = [];
    for (const [name, o] of all) errors.push(...(await schemaErrors(o)).map((e) => `${name}: ${e}`));
    typeErrors(all.map(([, o]) => o)).forEach((list, i) => errors.push(...list.map((e) => `${all[i][0]}: ${e}`)));
    assert.deepEqual(errors, []);
  });

  test("base and production-style overlays keep the invariants", () => {
    // The base names the image without a tag on purpose: overlays pin it.
    assert.deepEqual(checkInvariants(rendered.base, { requireTags: false }), [], "base");
    for (const name of ["gpu", "gpu+inference-gpu"]) {
      assert.deepEqual(checkInvariants(rendered[name]), [], name);
    }
  });

  test("local overlay: invariants, one replica each on CPU, in-cluster stores wired up", () => {
    const objs = rendered.local;
    assert.deepEqual(checkInvariants(objs, { selfContained: true }), []);
    for (const name of Object.keys(SERVICES)) {
      assert.equal(serviceDeployment(objs, name).spec.replicas, 1, name);
      assertOnCpu(objs, name);
    }
    assert.equal(objs.filter((o) => o.kind === "HorizontalPodAutoscaler").length, 0, "no autoscaler locally");
    assert.ok(find(objs, "StatefulSet", "postgres"), "in-cluster PostgreSQL");
    assert.ok(find(objs, "StatefulSet", "s3"), "in-cluster S3-compatible store");
    const config = objs.find((o) => o.kind === "ConfigMap" && o.metadata.name.startsWith("qlora-config")).data;
    assert.equal(config.QLORA_STORE, "s3");
    assert.equal(config.QLORA_JOB_STORE, "postgres");
    const endpoint = new URL(config.QLORA_S3_ENDPOINT);
    const s3 = find(objs, "Service", endpoint.hostname);
    assert.ok(s3?.spec.ports.some((p) => p.port === Number(endpoint.port)), `QLORA_S3_ENDPOINT ${endpoint} is no Service port`);
    const db = objs.find((o) => o.kind === "Secret" && o.metadata.name.startsWith("qlora-postgres"));
    const url = new URL(Buffer.from(db.data["database-url"], "base64").toString());
    const pg = find(objs, "Service", url.hostname);
    assert.ok(pg?.spec.ports.some((p) => p.port === Number(url.port)), `database-url ${url.host} is no Service port`);
  });

  test("tilt overlay differs from local only by the services' writable root filesystem", () => {
    const objs = rendered.tilt;
    assert.deepEqual(checkInvariants(objs, { writableRoot: Object.keys(SERVICES), selfContained: true }), []);
    const normalized = structuredClone(objs);
    for (const name of Object.keys(SERVICES)) {
      const c = serverContainer(serviceDeployment(normalized, name));
      assert.equal(c.securityContext.readOnlyRootFilesystem, false, `${name} must be writable for live update`);
      c.securityContext.readOnlyRootFilesystem = true;
    }
    assert.deepEqual(normalized, rendered.local);
  });

  test("gpu overlay: the trainer runs on the GPU pool, the others on CPU", () => {
    const objs = rendered.gpu;
    assertOnGpu(objs, "trainer", "auto");
    assertOnCpu(objs, "quantizer");
    assertOnCpu(objs, "inference");
    assert.ok(find(objs, "HorizontalPodAutoscaler", "inference"));
    // The base leaves the Secrets to the operator: none may be rendered with values.
    assert.equal(objs.filter((o) => o.kind === "Secret").length, 0, "no Secret values in the gpu overlay");
  });

  test("inference-gpu component moves inference to the GPU pool", () => {
    const objs = rendered["gpu+inference-gpu"];
    assertOnGpu(objs, "trainer", "auto");
    assertOnGpu(objs, "inference", "cuda");
    assertOnCpu(objs, "quantizer");
  });

  test("base: HPA-managed inference has no fixed replica count; autoscaler is autoscaling/v2", () => {
    const d = serviceDeployment(rendered.base, "inference");
    assert.equal(d.spec.replicas, undefined);
    const hpa = find(rendered.base, "HorizontalPodAutoscaler", "inference");
    assert.equal(hpa.apiVersion, "autoscaling/v2");
    assert.ok(hpa.spec.minReplicas >= 2, "at least two inference replicas in production");
  });
});

// The validator must reject what the API server would reject; otherwise the test above proves nothing.
describe("manifest validator rejects broken manifests", { skip: noKubectl }, () => {
  let deployment;
  before(() => {
    deployment = find(kustomize(join(k8sDir, "overlays", "local")), "Deployment", "inference");
  });
  const mutate = (fn) => {
    const d = structuredClone(deployment);
    fn(d);
    return d;
  };

  test("control: the unmodified Deployment is valid", async () => {
    assert.deepEqual(await validateObjects([deployment]), []);
  });

  test("unknown field deep in a pod spec (misspelt runAsNonRoot)", async () => {
    const d = mutate((d) => (d.spec.template.spec.containers[0].securityContext.runAsNonroot = true));
    assert.deepEqual(await schemaErrors(d), [], "kubernetes-models' schemas allow unknown fields; the type check must catch it");
    const [errors] = typeErrors([d]);
    assert.equal(errors.length, 1, errors.join("\n"));
    assert.match(errors[0], /runAsNonroot/);
  });

  test("unknown field at the top of a spec", async () => {
    const errors = await validateObjects([mutate((d) => (d.spec.replica = 1))]);
    assert.ok(errors.some((e) => /'"?replica"?' does not exist/.test(e)), errors.join("\n"));
  });

  test("wrong type (replicas as a string)", async () => {
    const errors = await schemaErrors(mutate((d) => (d.spec.replicas = "2")));
    assert.match(errors.join("\n"), /replicas must be integer/);
  });

  test("bad enum value (port protocol)", async () => {
    const errors = await schemaErrors(mutate((d) => (d.spec.template.spec.containers[0].ports[0].protocol = "TPC")));
    assert.match(errors.join("\n"), /protocol must be equal to one of the allowed values/);
  });

  test("missing required field (container name)", async () => {
    const errors = await schemaErrors(mutate((d) => delete d.spec.template.spec.containers[0].name));
    assert.match(errors.join("\n"), /must have required property '?name'?/);
  });

  test("unknown kind", async () => {
    const errors = await validateObjects([{ apiVersion: "apps/v1", kind: "Deploymnet", metadata: { name: "x" } }]);
    assert.ok(errors.length >= 1 && errors.every((e) => /Deploymnet/.test(e)), errors.join("\n"));
  });

  test("a broken overlay rendered by kubectl fails validation and the invariants", async () => {
    // A kustomization on disk, rendered like the real ones: typo'd field, bad enum, no limits,
    // root user, writable root filesystem.
    const dir = mkdtempSync(join(tmpdir(), "qlora-broken-"));
    try {
      writeFileSync(join(dir, "kustomization.yaml"), "resources:\n  - deployment.yaml\nnamespace: qlora\n");
      writeFileSync(
        join(dir, "deployment.yaml"),
        `apiVersion: apps/v1
kind: Deployment
metadata:
  name: broken
spec:
  selector:
    matchLabels: {app: broken}
  template:
    metadata:
      labels: {app: broken}
    spec:
      restartPolicy: Sometimes
      containers:
        - name: server
          image: qlora:dev
          imagePullPolicy: Alwayz
          securityContext:
            runAsUser: 0
          livenessProbe:
            grpcc: {port: 8080}
`,
      );
      const objs = kustomize(dir);
      const errors = await validateObjects(objs);
      const text = errors.join("\n");
      assert.match(text, /imagePullPolicy must be equal to one of the allowed values/);
      assert.match(text, /restartPolicy must be equal to one of the allowed values/);
      assert.match(text, /grpcc/);
      const problems = checkInvariants(objs).join("\n");
      for (const re of [/no cpu\/memory limits/, /not runAsNonRoot/, /root filesystem is not read-only/, /lacks startup\/readiness\/liveness/])
        assert.match(problems, re);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
