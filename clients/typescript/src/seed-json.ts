import { type JsonObject, toJson } from "@bufbuild/protobuf";
import { type Timestamp, TimestampSchema } from "@bufbuild/protobuf/wkt";
import {
  ImagePayloadSchema,
  ImageResultSchema,
  Priority,
  type Task,
  TtsPayloadSchema,
  TtsResultSchema,
} from "./gen/charai/tasks/v1/task_pb.js";
import { errorCodeName, statusName, typeName } from "./format.js";
import type * as seed from "./seed/types.js";

const PRIORITY_NAMES: Record<number, seed.TaskPriority> = {
  [Priority.LOW]: "low",
  [Priority.NORMAL]: "normal",
  [Priority.HIGH]: "high",
};

function time(ts: Timestamp | undefined): string | null {
  return ts && (ts.seconds !== 0n || ts.nanos !== 0) ? (toJson(TimestampSchema, ts) as string) : null;
}

/**
 * A TaskService `Task` (gRPC-web) in the seed's plain JSON shape, exactly as the gateway's REST
 * routes and `@charai/client/seed` hand it out: status strings, `result.imageUrl` /
 * `result.audioUrl`, `error` as the message and `errorDetail` as the structure. For an app that
 * calls over gRPC-web and renders what `@charai/client/seed`'s store delivers (the console does).
 */
export function toSeedTask(task: Task): seed.Task {
  let payload: JsonObject | null = null;
  if (task.payload.case === "image") payload = toJson(ImagePayloadSchema, task.payload.value) as JsonObject;
  else if (task.payload.case === "tts") payload = toJson(TtsPayloadSchema, task.payload.value) as JsonObject;
  let result: JsonObject | null = null;
  if (task.result.case === "imageResult") result = toJson(ImageResultSchema, task.result.value) as JsonObject;
  else if (task.result.case === "ttsResult") {
    result = toJson(TtsResultSchema, task.result.value) as JsonObject;
    if (result["durationSeconds"] !== undefined) result["duration"] = result["durationSeconds"]; // the seed's name
  }
  if (result && typeof result["sizeBytes"] === "string") result["sizeBytes"] = Number(result["sizeBytes"]);
  if (result) result["reused"] = result["reused"] === true; // always said, as the REST routes do
  if (payload && typeof payload["seed"] === "string") payload["seed"] = Number(payload["seed"]);
  const error = task.error;
  let errorDetail: seed.TaskErrorDetail | null = null;
  if (error) {
    errorDetail = { code: errorCodeName(error.code), message: error.message, retryable: error.retryable };
    if (error.providerStatus) errorDetail.providerStatus = error.providerStatus;
    if (error.providerCode) errorDetail.providerCode = error.providerCode;
  }
  const u = task.usage;
  const usage: seed.TaskUsage | null = u
    ? {
        provider: u.provider,
        model: u.model,
        calls: u.calls,
        images: u.images,
        imageSize: u.imageSize,
        imageQuality: u.imageQuality,
        speechCharacters: Number(u.speechCharacters),
        audioSeconds: u.audioSeconds,
        costUsd: u.costUsd,
        reused: u.reused,
      }
    : null;
  const type = typeName(task.type);
  const status = statusName(task.status);
  return {
    id: task.id,
    type: (type === "unspecified" ? "image_generation" : type) satisfies seed.TaskType,
    priority: PRIORITY_NAMES[task.priority] ?? "normal",
    status: (status === "unspecified" ? "queued" : status) satisfies seed.TaskStatus,
    progress: task.progress,
    stage: task.stage,
    metadata: { ...task.metadata },
    payload: payload as unknown as seed.ImageGenerationPayload | seed.TTSGenerationPayload,
    result: result as unknown as seed.ImageGenerationResult | seed.TTSGenerationResult | null,
    error: error ? error.message : null,
    errorDetail,
    attempt: task.attempt,
    maxAttempts: task.maxAttempts,
    createdAt: time(task.createTime),
    startedAt: time(task.startTime),
    completedAt: time(task.endTime),
    updatedAt: time(task.updateTime),
    nextAttemptAt: time(task.nextAttemptTime),
    queuePosition: task.queuePosition,
    estimatedStartAt: time(task.estimatedStartTime),
    estimatedEndAt: time(task.estimatedEndTime),
    requestId: task.requestId || null,
    webhook: task.webhook ? { url: task.webhook.url, events: [...task.webhook.events] } : null,
    usage,
  };
}
