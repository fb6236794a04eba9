export type {
  Batch,
  DataTokenizer,
  DatasetOptions,
  DatasetStats,
  Example,
  RecordKind,
  Row,
  TrainDataset,
} from "./types.js";
export { buildDataset, datasetFormat, loadDataset } from "./dataset.js";
export { chatExample, promptCompletionExample, specialWrap, textBlocks, textExample } from "./examples.js";
export type { SpecialWrap, TextBlocks } from "./examples.js";
export { alpacaPrompt } from "./prompts.js";
export { collate, packRows, rowTargetCount, unpackedRows } from "./rows.js";
export { epochOrder, evalBatches, microBatch, microBatchesPerEpoch } from "./loader.js";
export { deriveSeed, epochPermutation, splitmix64, Stream, Xoshiro128 } from "./rng.js";
export { dataTokenizer } from "./tokenizer.js";
