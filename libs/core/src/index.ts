export * from "./errors.js";
export * from "./fsutil.js";
