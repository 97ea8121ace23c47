// The seed's plain JSON shapes, as the gateway's REST routes and Server-Sent Events send them
// (services/gateway/src/charai/gateway/rest/views.py). No protobuf here: `@charai/client/seed`
// is fetch + EventSource only.

/** The seed's task types. */
export type TaskType = "image_generation" | "tts_generation";

/** The seed's status strings. */
export type TaskStatus = "queued" | "running" | "completed" | "failed" | "cancelled";

/** The seed's priorities. */
export type TaskPriority = "low" | "normal" | "high";

/** A view of a character, e.g. "front", "side", "back" (free text on the wire). */
export type ViewType = string;

/** Where the result goes in the seed's app (`payload.callback`). */
export interface TaskCallback {
  type: "character_view" | "character_costume" | "character_voice" | (string & {});
  characterId: string;
  viewType?: ViewType;
  costumeId?: string;
}

export interface ImageGenerationPayload {
  characterId: string;
  characterName?: string;
  prompt: string;
  resolution: string;
  viewType: ViewType;
  costumeId?: string;
  callback?: TaskCallback;
  /** Makes the request repeatable: an identical request with the same seed reuses the image. */
  seed?: number;
}

export interface ImageGenerationResult {
  /** charai's own signed media URL: `<img src>` loads it without a token; it survives restarts. */
  imageUrl: string;
  prompt: string;
  resolution: string;
  generatedAt: string;
  contentType?: string;
  width?: number;
  height?: number;
  sizeBytes?: number;
  /** True when no provider call was made: the image of an identical earlier request (same URL object). */
  reused: boolean;
  /** When reused: the task whose provider call made the image. */
  reusedFromTaskId?: string;
}

/** The seed's `TTSOptions`. */
export interface TTSOptions {
  /** 0.5 to 2 (default 1). */
  speed?: number;
  /** More than 0, at most 10 (default 1). */
  volume?: number;
  /** "wav" (default), "pcm" or "mp3". */
  responseFormat?: "wav" | "pcm" | "mp3";
  /** `false`: call the provider even when an identical request's audio could be reused. */
  reuse?: boolean;
}

export interface TTSGenerationPayload extends TTSOptions {
  characterId: string;
  characterName?: string;
  text: string;
  voiceStyle: string;
  callback?: TaskCallback;
}

export interface TTSGenerationResult {
  /** charai's own signed media URL (`<audio src>` needs no token). */
  audioUrl: string;
  text: string;
  voiceStyle: string;
  /** Seconds (the seed's field; `durationSeconds` is the same number). */
  duration?: number;
  durationSeconds?: number;
  generatedAt: string;
  contentType?: string;
  sizeBytes?: number;
  /** True when no provider call was made: the audio of an identical earlier request (same media object). */
  reused: boolean;
  /** When reused: the task whose provider call made the audio. */
  reusedFromTaskId?: string;
}

/** The structured error of a failed task (`error` is its message). */
export interface TaskErrorDetail {
  /** e.g. "CONTENT_REJECTED", "PROVIDER_AUTH", "QUOTA_EXHAUSTED". */
  code: string;
  message: string;
  retryable: boolean;
  providerStatus?: number;
  providerCode?: string;
}

/** charai's addition (README, "Webhooks"): where a task's events are POSTed. */
export interface TaskWebhook {
  url: string;
  /** The events delivered; empty: the terminal ones. */
  events: string[];
}

/** charai's addition (README, "Usage and budgets"): what a task's provider calls used and cost, over its attempts. */
export interface TaskUsage {
  provider: string;
  model: string;
  calls: number;
  images: number;
  imageSize: string;
  imageQuality: string;
  speechCharacters: number;
  audioSeconds: number;
  costUsd: number;
  /** The result was reused from another task: no call, no cost. */
  reused: boolean;
}

/** A task as the seed's frontend reads it. */
export interface Task<
  P = ImageGenerationPayload | TTSGenerationPayload,
  R = ImageGenerationResult | TTSGenerationResult,
> {
  id: string;
  type: TaskType;
  priority: TaskPriority;
  status: TaskStatus;
  /** 0 to 100; never decreases over the task's life. */
  progress: number;
  /** A short word for the current step ("queued", "generating", "waiting_retry", ...). */
  stage: string;
  metadata: Record<string, string>;
  payload: P;
  /** Set once completed. */
  result: R | null;
  /** The failure's message once failed (the seed prints `${task.error}`); null otherwise. */
  error: string | null;
  errorDetail: TaskErrorDetail | null;
  attempt: number;
  maxAttempts: number;
  createdAt: string | null;
  startedAt: string | null;
  completedAt: string | null;
  updatedAt: string | null;
  nextAttemptAt?: string | null;
  /** 1-based position while queued, 0 otherwise. */
  queuePosition: number;
  /** charai's addition: when a queued task should start (from its lane's live start rate); null when unknown. */
  estimatedStartAt?: string | null;
  /** charai's addition: when a running task should end (its lane's run time, its own progress); null when unknown. */
  estimatedEndAt?: string | null;
  requestId: string | null;
  /** charai's addition: where the task's events are delivered by webhook; null when nowhere. */
  webhook?: TaskWebhook | null;
  /** charai's addition: what its provider calls used and cost; null before anything was metered. */
  usage?: TaskUsage | null;
}

/** The seed's WebSocket event names (the SSE `event:` field). */
export type TaskEventName = "task:progress" | "task:completed" | "task:failed" | "task:cancelled";

/** The data of one event: the seed's fields plus the sequence, charai's event type and the whole task. */
export interface TaskEventData {
  taskId: string;
  progress: number;
  status: TaskStatus;
  stage: string;
  metadata: Record<string, string>;
  result?: ImageGenerationResult | TTSGenerationResult;
  error?: string;
  errorDetail?: TaskErrorDetail;
  /** Monotonic over the whole event log: the resume cursor (the SSE `id:`). */
  sequence: number;
  /** "queued", "started", "progress", "retry_scheduled", "completed", "failed", "cancelled", "snapshot". */
  eventType: string;
  task: Task;
}

/** One event as the seed's WebSocket listener saw it: `{event, data}`. */
export interface TaskEvent {
  event: TaskEventName;
  data: TaskEventData;
}

export const TERMINAL_STATUSES: ReadonlySet<TaskStatus> = new Set<TaskStatus>(["completed", "failed", "cancelled"]);

/** Whether the task has ended (completed, failed or cancelled). */
export function isTerminal(task: Pick<Task, "status">): boolean {
  return TERMINAL_STATUSES.has(task.status);
}
