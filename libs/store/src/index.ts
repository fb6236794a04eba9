export * from "./names.js";
export * from "./manifest.js";
export * from "./store.js";
export { S3Store, IntegrityError, normalizeS3Prefix, type S3StoreOptions, type S3Location } from "./s3-store.js";
export { createStoreFromEnv, s3OptionsFromEnv, type Env } from "./s3-config.js";
