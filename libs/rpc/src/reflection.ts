/**
 * gRPC server reflection (grpc.reflection.v1 and the older v1alpha that many tools still
 * ask first), so grpcurl, Postman and friends can discover and call the services without the
 * .proto files.
 *
 * Answers come from @bufbuild/protobuf's runtime descriptors of the registered services: each
 * file is serialized as a google.protobuf.FileDescriptorProto, together with its transitive
 * imports (e.g. google/protobuf/timestamp.proto), which clients need to build their own registry.
 */
import { toBinary, type DescFile, type DescMessage, type DescService } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import { Code, type ServiceImpl } from "@connectrpc/connect";
import { reflectionV1, reflectionV1alpha } from "@qlora/proto";

/** Index of every file, symbol and extension reachable from a set of services. */
export class DescriptorIndex {
  private readonly files = new Map<string, DescFile>();
  private readonly symbols = new Map<string, DescFile>();
  /** extendee type name → field number → declaring file */
  private readonly extensions = new Map<string, Map<number, DescFile>>();
  private readonly messageTypes = new Set<string>();
  readonly serviceNames: string[];

  constructor(services: readonly DescService[]) {
    for (const s of services) this.addFile(s.file);
    this.serviceNames = [...new Set(services.map((s) => s.typeName))].sort();
  }

  private addFile(file: DescFile): void {
    const name = file.proto.name;
    if (this.files.has(name)) return;
    this.files.set(name, file);
    for (const dep of file.dependencies) this.addFile(dep);
    for (const m of file.messages) this.addMessage(file, m);
    for (const e of file.enums) this.addEnum(file, e, parentScope(file, undefined));
    for (const x of file.extensions) this.addExtension(file, x);
    for (const s of file.services) {
      this.symbols.set(s.typeName, file);
      for (const m of s.methods) this.symbols.set(`${s.typeName}.${m.name}`, file);
    }
  }

  private addMessage(file: DescFile, m: DescMessage): void {
    this.symbols.set(m.typeName, file);
    this.messageTypes.add(m.typeName);
    for (const f of m.fields) this.symbols.set(`${m.typeName}.${f.name}`, file);
    for (const o of m.oneofs) this.symbols.set(`${m.typeName}.${o.name}`, file);
    for (const n of m.nestedMessages) this.addMessage(file, n);
    for (const e of m.nestedEnums) this.addEnum(file, e, m.typeName);
    for (const x of m.nestedExtensions) this.addExtension(file, x);
  }

  private addEnum(file: DescFile, e: { typeName: string; values: { name: string }[] }, scope: string): void {
    this.symbols.set(e.typeName, file);
    // Enum values are scoped as siblings of their enum (C++ scoping rules of protobuf).
    for (const v of e.values) this.symbols.set(scope ? `${scope}.${v.name}` : v.name, file);
  }

  private addExtension(file: DescFile, x: { typeName: string; number: number; extendee: DescMessage }): void {
    this.symbols.set(x.typeName, file);
    let byNumber = this.extensions.get(x.extendee.typeName);
    if (!byNumber) this.extensions.set(x.extendee.typeName, (byNumber = new Map()));
    byNumber.set(x.number, file);
  }

  fileByName(name: string): DescFile | undefined {
    return this.files.get(name);
  }

  fileContainingSymbol(symbol: string): DescFile | undefined {
    // Tools sometimes send a leading dot (a fully-qualified reference).
    return this.symbols.get(symbol.startsWith(".") ? symbol.slice(1) : symbol);
  }

  fileContainingExtension(type: string, number: number): DescFile | undefined {
    return this.extensions.get(type)?.get(number);
  }

  /** Extension numbers of a message type, or undefined when the type is unknown. */
  extensionNumbers(type: string): number[] | undefined {
    if (!this.messageTypes.has(type)) return undefined;
    return [...(this.extensions.get(type)?.keys() ?? [])].sort((a, b) => a - b);
  }

  /** The file first, then every transitive import once, serialized. */
  serializeWithDeps(file: DescFile): Uint8Array[] {
    const out: Uint8Array[] = [];
    const seen = new Set<string>();
    const visit = (f: DescFile) => {
      if (seen.has(f.proto.name)) return;
      seen.add(f.proto.name);
      out.push(toBinary(FileDescriptorProtoSchema, f.proto));
      for (const d of f.dependencies) visit(d);
    };
    visit(file);
    return out;
  }
}

function parentScope(file: DescFile, parent: DescMessage | undefined): string {
  return parent ? parent.typeName : (file.proto.package ?? "");
}

/**
 * The response body shared by v1 and v1alpha (their messages differ only in package), built as
 * an init object that either version's `create` accepts.
 */
type Answer =
  | { case: "fileDescriptorResponse"; value: { fileDescriptorProto: Uint8Array[] } }
  | { case: "allExtensionNumbersResponse"; value: { baseTypeName: string; extensionNumber: number[] } }
  | { case: "listServicesResponse"; value: { service: { name: string }[] } }
  | { case: "errorResponse"; value: { errorCode: number; errorMessage: string } };

type RequestCase =
  | { case: "fileByFilename"; value: string }
  | { case: "fileContainingSymbol"; value: string }
  | { case: "fileContainingExtension"; value: { containingType: string; extensionNumber: number } }
  | { case: "allExtensionNumbersOfType"; value: string }
  | { case: "listServices"; value: string }
  | { case: undefined; value?: undefined };

function error(code: Code, message: string): Answer {
  return { case: "errorResponse", value: { errorCode: code, errorMessage: message } };
}

export function answerReflection(index: DescriptorIndex, req: RequestCase): Answer {
  const files = (f: DescFile | undefined, what: string): Answer =>
    f
      ? { case: "fileDescriptorResponse", value: { fileDescriptorProto: index.serializeWithDeps(f) } }
      : error(Code.NotFound, `${what} not found`);
  switch (req.case) {
    case "listServices":
      return { case: "listServicesResponse", value: { service: index.serviceNames.map((name) => ({ name })) } };
    case "fileByFilename":
      return files(index.fileByName(req.value), `file "${req.value}"`);
    case "fileContainingSymbol":
      return files(index.fileContainingSymbol(req.value), `symbol "${req.value}"`);
    case "fileContainingExtension": {
      const { containingType, extensionNumber } = req.value;
      return files(
        index.fileContainingExtension(containingType, extensionNumber),
        `extension ${extensionNumber} of "${containingType}"`,
      );
    }
    case "allExtensionNumbersOfType": {
      const numbers = index.extensionNumbers(req.value);
      return numbers
        ? { case: "allExtensionNumbersResponse", value: { baseTypeName: req.value, extensionNumber: numbers } }
        : error(Code.NotFound, `type "${req.value}" not found`);
    }
    default:
      return error(Code.InvalidArgument, "empty reflection request");
  }
}

export function reflectionV1Impl(index: DescriptorIndex): ServiceImpl<typeof reflectionV1.ServerReflection> {
  return {
    async *serverReflectionInfo(requests) {
      for await (const req of requests) {
        yield { validHost: req.host, originalRequest: req, messageResponse: answerReflection(index, req.messageRequest) };
      }
    },
  };
}

export function reflectionV1alphaImpl(
  index: DescriptorIndex,
): ServiceImpl<typeof reflectionV1alpha.ServerReflection> {
  return {
    async *serverReflectionInfo(requests) {
      for await (const req of requests) {
        yield { validHost: req.host, originalRequest: req, messageResponse: answerReflection(index, req.messageRequest) };
      }
    },
  };
}
