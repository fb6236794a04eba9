export { train, planSteps, evalLossOf } from "./trainer.js";
export type { TrainHooks, TrainModel, ModelLoader, TrainResult } from "./trainer.js";
export type { TrainEvent, StartEvent, StepEvent, LogEvent, EvalEvent, CheckpointEvent, EndEvent } from "./events.js";
export { resolveOptions, trajectoryArgs, DEFAULTS as TRAIN_DEFAULTS } from "./options.js";
export type { TrainOptions, ResolvedOptions } from "./options.js";
export { resolveTargets, parseTargetList } from "./targets.js";
export type { ResolvedTargets } from "./targets.js";
export { lrLambda, learningRateAt, parseScheduler, SCHEDULERS } from "./schedule.js";
export type { SchedulerName, ScheduleSpec } from "./schedule.js";
export { asTrainingEngine } from "./engine.js";
export type { TrainingEngine, LoraTrainSpec, LoraState, LoraModuleState, AdamWParams, TrainBatchInput } from "./engine.js";
export {
  listCheckpoints,
  readCheckpoint,
  writeCheckpoint,
  rotateCheckpoints,
  removeStaleStaging,
  TRAINER_STATE,
  OPTIMIZER_STATE,
} from "./checkpoint.js";
export type { TrainerState, LogEntry, CheckpointInfo } from "./checkpoint.js";
export { METRICS_FILE, RUNS_DIR, LOSS_PNG } from "./outputs.js";
export { EventFileWriter, encodeEvent, decodeEvent, frameRecord, readRecords, readEventFile } from "./tfevents.js";
export type { TfEvent, ScalarValue } from "./tfevents.js";
export { crc32, crc32c, maskedCrc32c } from "./crc.js";
export { encodePng, lossChartPng, renderLossChart, niceTicks, Raster } from "./png.js";
export { trainInWorker } from "./worker-client.js";
export type { WorkerHooks } from "./worker-client.js";
export { loadTrainModel } from "./model.js";
export type { OwnedTrainModel } from "./model.js";
