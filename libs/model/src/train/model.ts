/** Loading the base model for training: the runtime's loader, with the native engine as the trainer's engine. */
import { loadModel, type LoadedModel } from "../loader.js";
import type { TrainModel } from "./trainer.js";

/** A model loaded by the trainer itself (it is disposed when training ends). */
export interface OwnedTrainModel extends TrainModel {
  loaded: LoadedModel;
}

/**
 * prepare_model_for_kbit_training semantics come from the engine: the base stays frozen (NF4 with
 * quant "nf4"; norms, embeddings and LoRA in fp32), only LoRA A/B train, and activations are
 * recomputed in backward when gradient checkpointing is on. No KV cache is used for training, so
 * one sequence slot is enough. On device "cuda" the trainer runs on the GPU (engine::CudaLoraTrainer).
 */
export async function loadTrainModel(dir: string, quant: "nf4" | "none", device: "cpu" | "cuda" = "cpu"): Promise<OwnedTrainModel> {
  const loaded = await loadModel(dir, { quant, maxSequences: 1, device });
  return { engine: loaded.native, tokenizer: loaded.tokenizer, config: loaded.config, loaded };
}
