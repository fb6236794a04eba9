/**
 * ModelConfig (config.json, typed by @qlora/formats) → the native engine's EngineConfig.
 *
 * The engine runs a fixed set of variants; anything outside them is refused here with a message
 * that names the config field, instead of producing wrong numbers later.
 */
import { FailedPrecondition } from "@qlora/core";
import type { ModelConfig } from "@qlora/formats";
import type { EngineConfig } from "@qlora/kernels";

/** hidden_act / activation_function values → the engine's activations (exact-erf GELU only). */
const ACTIVATIONS: Record<string, EngineConfig["hiddenAct"]> = {
  silu: "silu",
  swish: "silu",
  relu: "relu",
  gelu: "gelu",
};

function unsupported(cfg: ModelConfig, what: string): never {
  throw new FailedPrecondition(`${cfg.architecture} (${cfg.modelType}): ${what} is not supported by the engine`);
}

export function engineConfigFor(cfg: ModelConfig): EngineConfig {
  const act = ACTIVATIONS[cfg.hiddenAct];
  if (act === undefined) unsupported(cfg, `activation ${JSON.stringify(cfg.hiddenAct)}`);
  if (cfg.bias.q !== cfg.bias.k || cfg.bias.q !== cfg.bias.v) {
    unsupported(cfg, "biases on only some of q/k/v");
  }
  let ropeScaling: EngineConfig["ropeScaling"] = null;
  if (cfg.ropeScaling !== null) {
    if (cfg.ropeScaling.ropeType !== "llama3") unsupported(cfg, `rope_scaling type ${JSON.stringify(cfg.ropeScaling.ropeType)}`);
    ropeScaling = {
      type: "llama3",
      factor: cfg.ropeScaling.factor,
      lowFreqFactor: cfg.ropeScaling.lowFreqFactor,
      highFreqFactor: cfg.ropeScaling.highFreqFactor,
      originalMaxPositions: cfg.ropeScaling.originalMaxPositionEmbeddings,
    };
  }
  if (cfg.family === "opt") {
    if (!cfg.layerNormElementwiseAffine) unsupported(cfg, "layer_norm_elementwise_affine=false");
    if (cfg.doLayerNormBefore && !cfg.finalLayerNorm) unsupported(cfg, "_remove_final_layer_norm=true");
  }
  return {
    arch: cfg.family,
    hiddenSize: cfg.hiddenSize,
    intermediateSize: cfg.intermediateSize,
    numLayers: cfg.numLayers,
    numHeads: cfg.numHeads,
    numKvHeads: cfg.numKvHeads,
    headDim: cfg.headDim,
    vocabSize: cfg.vocabSize,
    maxPositions: cfg.maxPositionEmbeddings,
    normEps: cfg.normEps,
    ropeTheta: cfg.ropeTheta,
    ropeScaling,
    hiddenAct: act,
    tiedEmbeddings: cfg.tieWordEmbeddings,
    qkvBias: cfg.bias.q,
    oBias: cfg.bias.o,
    mlpBias: cfg.bias.mlp,
    doLayerNormBefore: cfg.doLayerNormBefore,
  };
}
