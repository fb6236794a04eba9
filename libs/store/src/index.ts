export * from "./names.js";
export * from "./manifest.js";
export * from "./store.js";
