/** Job store records ↔ the wire messages of qlora.v1.TrainerService. */
import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { InvalidArgument } from "@qlora/core";
import {
  CheckpointSchema,
  Device,
  JobMetricsSchema,
  JobSchema,
  JobState,
  WatchJobResponseSchema,
  type Checkpoint,
  type Job,
  type JobMetrics,
  type WatchJobResponse,
} from "@qlora/proto";
import type { CheckpointRecord, JobEvent, JobRecord, JobStateName, MetricsRecord } from "./job-store.js";
import { requestFromJson } from "./spec.js";

const TO_PROTO_STATE: Record<JobStateName, JobState> = {
  queued: JobState.QUEUED,
  running: JobState.RUNNING,
  succeeded: JobState.SUCCEEDED,
  failed: JobState.FAILED,
  cancelled: JobState.CANCELLED,
};

export function toProtoState(s: JobStateName): JobState {
  return TO_PROTO_STATE[s];
}

/** ListJobs' filter: UNSPECIFIED → all; an unknown number is the caller's mistake. */
export function fromProtoState(s: JobState): JobStateName | undefined {
  if (s === JobState.UNSPECIFIED) return undefined;
  const name = (Object.keys(TO_PROTO_STATE) as JobStateName[]).find((k) => TO_PROTO_STATE[k] === s);
  if (!name) throw new InvalidArgument(`state: unknown value ${s}`);
  return name;
}

export function toMetricsMessage(m: MetricsRecord): JobMetrics {
  return create(JobMetricsSchema, {
    step: m.step,
    totalSteps: m.totalSteps,
    epoch: m.epoch,
    loss: m.loss,
    learningRate: m.learningRate,
    gradNorm: m.gradNorm,
    tokensPerSecond: m.tokensPerSecond,
    ...(m.evalLoss !== undefined ? { evalLoss: m.evalLoss } : {}),
  });
}

export function toJobMessage(j: JobRecord): Job {
  return create(JobSchema, {
    id: j.id,
    state: toProtoState(j.state),
    request: requestFromJson(j.request),
    createdAt: timestampFromMs(j.createdAt),
    ...(j.startedAt !== null ? { startedAt: timestampFromMs(j.startedAt) } : {}),
    ...(j.finishedAt !== null ? { finishedAt: timestampFromMs(j.finishedAt) } : {}),
    error: j.error,
    ...(j.metrics ? { lastMetrics: toMetricsMessage(j.metrics) } : {}),
    outputAdapter: j.outputAdapter,
    device: j.device === "cuda" ? Device.CUDA : Device.CPU,
    resumedFromStep: j.resumedFromStep,
    attempts: j.attempts,
  });
}

export function toCheckpointMessage(c: Omit<CheckpointRecord, "jobId">): Checkpoint {
  return create(CheckpointSchema, {
    step: c.step,
    name: c.name,
    createdAt: timestampFromMs(c.createdAt),
    sizeBytes: BigInt(c.sizeBytes),
  });
}

export function toWatchResponse(e: JobEvent): WatchJobResponse {
  const time = timestampFromMs(e.time);
  switch (e.kind) {
    case "state":
      return create(WatchJobResponseSchema, { time, event: { case: "state", value: { state: toProtoState(e.state), message: e.message } } });
    case "metrics":
      return create(WatchJobResponseSchema, { time, event: { case: "metrics", value: toMetricsMessage(e.metrics) } });
    case "checkpoint":
      return create(WatchJobResponseSchema, { time, event: { case: "checkpoint", value: toCheckpointMessage(e.checkpoint) } });
  }
}
