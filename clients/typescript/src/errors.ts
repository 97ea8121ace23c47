import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { BadRequestSchema, ErrorInfoSchema } from "./gen/google/rpc/error_details_pb.js";

/** One bad field of a rejected request (from the `google.rpc.BadRequest` error detail). */
export interface FieldViolation {
  /** Proto field path, e.g. `image.prompt` or `tts.voice_style`. */
  field: string;
  /** What is wrong with it. */
  description: string;
}

/** A readable form of any error a call can throw. */
export interface DescribedError {
  /** The gRPC code's name in snake case as connect spells it, e.g. `invalid_argument`. */
  code: string;
  /** The numeric gRPC code (3 = INVALID_ARGUMENT, 5 = NOT_FOUND, ...). */
  grpcCode: Code;
  /** The server's message (without the `[code]` prefix). */
  message: string;
  /** Each bad field, when the server sent a `BadRequest` detail. */
  fields: FieldViolation[];
  /**
   * The `google.rpc.ErrorInfo` reason, when the server sent one (e.g. `ACCESS_TOKEN_EXPIRED`,
   * `ACCESS_TOKEN_SCOPE`, `LIMIT_EXCEEDED`); "" otherwise.
   */
  reason: string;
}

/** The bad fields a rejected call named (empty for any other error). */
export function fieldViolations(error: unknown): FieldViolation[] {
  const err = ConnectError.from(error);
  return err
    .findDetails(BadRequestSchema)
    .flatMap((bad) => bad.fieldViolations.map((v) => ({ field: v.field, description: v.description })));
}

/** Turns an error from any call into `{code, message, fields}` for display or logs. */
export function describeError(error: unknown): DescribedError {
  const err = ConnectError.from(error);
  return {
    code: Code[err.code] ? snake(Code[err.code]) : String(err.code),
    grpcCode: err.code,
    message: err.rawMessage,
    fields: fieldViolations(err),
    reason: err.findDetails(ErrorInfoSchema)[0]?.reason ?? "",
  };
}

/** `"image.prompt: must not be empty; image.resolution: ..."` or the message itself. */
export function errorText(error: unknown): string {
  const d = describeError(error);
  const detail = d.fields.map((f) => `${f.field}: ${f.description}`).join("; ");
  return `${d.code}: ${detail || d.message}`;
}

/**
 * A request refused before it was sent, as the gateway would refuse it: INVALID_ARGUMENT with a
 * `BadRequest` detail, so `fieldViolations` and `describeError` read it like a server's refusal.
 */
export function invalidFields(fields: FieldViolation[]): ConnectError {
  const message = fields.map((f) => `${f.field}: ${f.description}`).join("; ");
  return new ConnectError(message, Code.InvalidArgument, undefined, [
    { desc: BadRequestSchema, value: create(BadRequestSchema, { fieldViolations: fields }) },
  ]);
}

function snake(name: string): string {
  return name.replace(/([a-z])([A-Z])/g, "$1_$2").toLowerCase();
}

/** Raised by a watch that could not reconnect within its budget. */
export class WatchResumeError extends Error {
  override readonly name = "WatchResumeError";
  constructor(
    message: string,
    /** The error of the last attempt. */
    override readonly cause: unknown,
  ) {
    super(message);
  }
}

/** Codes after which a watch reconnects and resumes instead of failing. */
const RESUMABLE = new Set<Code>([
  Code.Unavailable,
  Code.Unknown,
  Code.Internal,
  Code.Canceled,
  Code.Aborted,
  Code.DeadlineExceeded,
]);

export function isResumable(error: unknown): boolean {
  return RESUMABLE.has(ConnectError.from(error).code);
}
