// Generated from proto/ by `npm run gen` (buf + protoc-gen-es). Never edit src/gen by hand.
export * from "./gen/qlora/v1/common_pb.js";
export * from "./gen/qlora/v1/quantizer_pb.js";
export * from "./gen/qlora/v1/trainer_pb.js";
export * from "./gen/qlora/v1/inference_pb.js";
export * as health from "./gen/grpc/health/v1/health_pb.js";
export * as reflectionV1 from "./gen/grpc/reflection/v1/reflection_pb.js";
export * as reflectionV1alpha from "./gen/grpc/reflection/v1alpha/reflection_pb.js";
export * as kserve from "./gen/inference/v2/grpc_predict_v2_pb.js";
