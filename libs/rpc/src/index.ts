export {
  startServer,
  defineService,
  type ServiceRegistration,
  type ServiceHooks,
  type ServerContext,
  type AuditSink,
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
export {
  HttpError,
  httpStatusOf,
  codeName,
  connectErrorBody,
  matchRoute,
  readBody,
  readJsonBody,
  sendJson,
  type HttpRoute,
  type HttpContext,
  type HttpRequest,
  type HttpResponse,
  type HttpErrorBody,
} from "./http-routes.js";
export {
  ServerMetrics,
  InferenceMetrics,
  TrainingMetrics,
  JOB_STATE_NAMES,
  parsePrometheusText,
  sampleValue,
  type PromFamily,
  type PromSample,
  type ServerMetricsOptions,
  type GenerationObservation,
  type EngineTotals,
  type TrainingStep,
} from "./metrics.js";
export {
  Authenticator,
  Principal,
  parseAuthConfig,
  loadAuthConfig,
  authInterceptor,
  hashToken,
  globMatch,
  resourcesOf,
  checkResources,
  usageTokensOf,
  requestAuthOf,
  maySee,
  callerOf,
  jobResources,
  visibleOnly,
  checkVisible,
  NotVisibleError,
  OPEN_AUTH,
  DEFAULT_PUBLIC,
  RESOURCE_RULES,
  type AuthConfig,
  type AuthenticatorOptions,
  type TokenEntry,
  type TokenQuota,
  type RequestAuth,
  type ResourceKind,
  type Resources,
} from "./auth.js";
export { AuditLog, auditInterceptor, AUDITED_RPCS, type AuditEvent } from "./audit.js";
export {
  requestInfoKey,
  currentRequest,
  runWithRequest,
  iterateWithRequest,
  propagationInterceptor,
  parseTraceparent,
  formatTraceparent,
  newTraceContext,
  requestIdFrom,
  type RequestInfo,
  type TraceContext,
} from "./context.js";
export { jsonLogger, isLogLevel, requestLogFields, safeJson, type Logger, type LogLevel, type LogFields, type JsonLoggerOptions } from "./log.js";
export { clientTlsOptions, isLoopbackHost, loadTlsPem, peerCertSubject, type TlsConfig, type TlsFiles, type TlsPem } from "./tls.js";
export { limitsInterceptor, DEFAULT_INPUT_LIMITS, type InputLimits } from "./limits.js";
export { securityOptions, type SecuritySettings, type SecurityOptions } from "./options.js";
