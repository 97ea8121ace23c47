import { timestampDate } from "@bufbuild/protobuf/wkt";
import { ErrorCode, type Task, TaskEventType, TaskStatus, TaskType } from "./gen/charai/tasks/v1/task_pb.js";

/** The seed's status strings. */
export type TaskStatusName = "queued" | "running" | "completed" | "failed" | "cancelled" | "unspecified";

const STATUS_NAMES: Record<TaskStatus, TaskStatusName> = {
  [TaskStatus.UNSPECIFIED]: "unspecified",
  [TaskStatus.QUEUED]: "queued",
  [TaskStatus.RUNNING]: "running",
  [TaskStatus.COMPLETED]: "completed",
  [TaskStatus.FAILED]: "failed",
  [TaskStatus.CANCELLED]: "cancelled",
};

/** `TaskStatus.RUNNING` → `"running"` (the seed's strings). */
export function statusName(status: TaskStatus): TaskStatusName {
  return STATUS_NAMES[status] ?? "unspecified";
}

/** `TaskType.IMAGE_GENERATION` → `"image_generation"` (the seed's strings). */
export function typeName(type: TaskType): "image_generation" | "tts_generation" | "unspecified" {
  if (type === TaskType.IMAGE_GENERATION) return "image_generation";
  if (type === TaskType.TTS_GENERATION) return "tts_generation";
  return "unspecified";
}

/** `TaskEventType.RETRY_SCHEDULED` → `"retry_scheduled"`. */
export function eventTypeName(type: TaskEventType): string {
  return (TaskEventType[type] ?? "UNSPECIFIED").toLowerCase();
}

/** `ErrorCode.CONTENT_REJECTED` → `"CONTENT_REJECTED"`. */
export function errorCodeName(code: ErrorCode): string {
  return ErrorCode[code] ?? "UNSPECIFIED";
}

export function isTerminalStatus(status: TaskStatus): boolean {
  return status === TaskStatus.COMPLETED || status === TaskStatus.FAILED || status === TaskStatus.CANCELLED;
}

export function isTerminalEvent(type: TaskEventType): boolean {
  return (
    type === TaskEventType.COMPLETED || type === TaskEventType.FAILED || type === TaskEventType.CANCELLED
  );
}

/** Whether the task has ended (completed, failed or cancelled). */
export function isTerminal(task: Task): boolean {
  return isTerminalStatus(task.status);
}

/** The image or audio URL of a completed task (signed: `<img>`/`<audio>` load it without a token). */
export function resultUrl(task: Task): string | undefined {
  if (task.result.case === "imageResult") return task.result.value.imageUrl;
  if (task.result.case === "ttsResult") return task.result.value.audioUrl;
  return undefined;
}

/** The task's `updateTime` in ms since the epoch (0 if unset). */
export function updatedAtMs(task: Task): number {
  return task.updateTime ? timestampDate(task.updateTime).getTime() : 0;
}

/** The task's `createTime` as a Date, if set. */
export function createdAt(task: Task): Date | undefined {
  return task.createTime ? timestampDate(task.createTime) : undefined;
}
