export * from "./runtime.js";
export * from "./nf4.js";
export * from "./engine.js";
export * from "./tensor.js";
export * from "./matmul.js";
export * from "./train.js";
export * from "./cuda.js";
