export { trainerService, DEFAULT_MAX_LORA_RANK, type TrainerServiceOptions, type TrainerServiceHandle, type RunnerRef } from "./service.js";
export * from "./job-store.js";
export { SqliteJobStore, type SqliteJobStoreOptions } from "./sqlite-store.js";
export { JobManager, checkpointArtifactName, type JobManagerOptions } from "./jobs.js";
export * from "./runner-api.js";
export { withDefaults, checkAgainstStore, checkTargets, runnerOptions, fromFloat32, DEFAULTS as JOB_DEFAULTS } from "./spec.js";
export { scanDataset, datasetFormatOf, recordKind, describeDataset, datasetFile, type DatasetScan, type DatasetFormat } from "./datasets.js";
export { toJobMessage, toWatchResponse, toCheckpointMessage, toProtoState, fromProtoState } from "./convert.js";
export { PostgresJobStore, openPostgresJobStoreFromEnv, POSTGRES_SCHEMA_VERSION, type PostgresJobStoreOptions } from "./jobstore-postgres.js";
