/**
 * A @grpc/grpc-js service definition built from a protobuf-es descriptor, for plain gRPC clients
 * (and tests proving interop) without generated grpc-js stubs:
 *
 *   const Client = grpc.makeGenericClientConstructor(grpcServiceDefinition(QuantizerService), "QuantizerService");
 *
 * It is a plain object of the shape grpc-js expects, so this package does not depend on grpc-js.
 */
import { fromBinary, toBinary, type DescMessage, type DescService, type MessageShape } from "@bufbuild/protobuf";

export interface GrpcMethodDefinition<I extends DescMessage = DescMessage, O extends DescMessage = DescMessage> {
  path: string;
  requestStream: boolean;
  responseStream: boolean;
  requestSerialize: (value: MessageShape<I>) => Buffer;
  requestDeserialize: (bytes: Buffer) => MessageShape<I>;
  responseSerialize: (value: MessageShape<O>) => Buffer;
  responseDeserialize: (bytes: Buffer) => MessageShape<O>;
  originalName: string;
}

/** Keys are the proto method names (e.g. "GetModel"), as grpc-js clients call them. */
export function grpcServiceDefinition(service: DescService): Record<string, GrpcMethodDefinition> {
  const def: Record<string, GrpcMethodDefinition> = {};
  for (const m of service.methods) {
    const ser = <D extends DescMessage>(schema: D) => (value: MessageShape<D>) =>
      Buffer.from(toBinary(schema, value));
    const de = <D extends DescMessage>(schema: D) => (bytes: Buffer) => fromBinary(schema, bytes);
    def[m.name] = {
      path: `/${service.typeName}/${m.name}`,
      requestStream: m.methodKind === "client_streaming" || m.methodKind === "bidi_streaming",
      responseStream: m.methodKind === "server_streaming" || m.methodKind === "bidi_streaming",
      requestSerialize: ser(m.input),
      requestDeserialize: de(m.input),
      responseSerialize: ser(m.output),
      responseDeserialize: de(m.output),
      originalName: m.localName,
    };
  }
  return def;
}
