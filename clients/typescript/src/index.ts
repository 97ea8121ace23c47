/**
 * `@charai/client`: charai's TaskService for frontends and Node, over gRPC-web.
 *
 * ```ts
 * const charai = createCharaiClient({ baseUrl: "http://127.0.0.1:8080" });
 * const task = await charai.submitImageTask({ characterId: "char_001", viewType: "front",
 *   prompt: "a young swordsman", resolution: "1024x1024" });
 * const done = await charai.watchTask(task.id, (e) => console.log(e.task?.progress, e.task?.stage));
 * const [front, side, voice] = await charai.createMany([{ image: {...} }, { image: {...} }, { tts: {...} }]);
 * ```
 */
export {
  type CharacterTasksQuery,
  type CharaiClient,
  type CharaiClientOptions,
  createCharaiClient,
  type CreateManyItem,
  type PriorityInput,
  type ReconnectInfo,
  type SubmitCommon,
  type SubmitImageParams,
  type SubmitTTSParams,
  type TTSOptions,
  type UsageQuery,
  type WatchCharacterOptions,
  type WatchOptions,
} from "./client.js";
export {
  type DescribedError,
  describeError,
  errorText,
  type FieldViolation,
  fieldViolations,
  isResumable,
  WatchResumeError,
} from "./errors.js";
export {
  createdAt,
  errorCodeName,
  eventTypeName,
  isTerminal,
  isTerminalEvent,
  isTerminalStatus,
  resultUrl,
  statusName,
  type TaskStatusName,
  typeName,
  updatedAtMs,
} from "./format.js";
export type { ReconnectOptions } from "./retry.js";
export { toSeedTask } from "./seed-json.js";
export * from "./gen/charai/tasks/v1/task_pb.js";
export * from "./gen/charai/tasks/v1/task_service_pb.js";
export { BadRequestSchema, type BadRequest, ErrorInfoSchema, type ErrorInfo } from "./gen/google/rpc/error_details_pb.js";
export { StatusSchema, type Status } from "./gen/google/rpc/status_pb.js";
export { Code, ConnectError } from "@connectrpc/connect";
