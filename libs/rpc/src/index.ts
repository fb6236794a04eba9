export {
  startServer,
  defineService,
  type ServiceRegistration,
  type ServiceHooks,
  type ServerContext,
  type StartServerOptions,
  type RunningServer,
} from "./server.js";
export { HealthRegistry, ServingStatus, healthImpl, type ServingStatusLike } from "./health.js";
export { DescriptorIndex, answerReflection, reflectionV1Impl, reflectionV1alphaImpl } from "./reflection.js";
export {
  toConnectError,
  fromConnectError,
  errorMappingInterceptor,
  codeOf,
  defaultInternalErrorReporter,
  type InternalErrorReporter,
} from "./errors.js";
export {
  receiveUpload,
  validateUploadPath,
  type StagedWrite,
  type UploadMessage,
  type UploadedFile,
  type UploadResult,
  type ReceiveUploadOptions,
} from "./upload.js";
export { grpcServiceDefinition, type GrpcMethodDefinition } from "./grpc-definition.js";
