import { create, isMessage } from "@bufbuild/protobuf";
import {
  type CallOptions,
  type Client,
  Code,
  ConnectError,
  createClient,
  type Interceptor,
  type Transport,
} from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { invalidFields, isResumable, WatchResumeError } from "./errors.js";
import { Attempt, backoffDelay, type ReconnectOptions, resolveReconnect, sleep } from "./retry.js";
import {
  CallbackSchema,
  ImagePayloadSchema,
  Priority,
  type Task,
  type TaskEvent,
  TaskEventType,
  TaskType,
  TtsPayloadSchema,
} from "./gen/charai/tasks/v1/task_pb.js";
import {
  type CreateTaskRequest,
  CreateTaskRequestSchema,
  GetUsageRequestSchema,
  type GetUsageResponse,
  TaskService,
  type WatchTaskResponse,
  type WatchTasksResponse,
} from "./gen/charai/tasks/v1/task_service_pb.js";
import { isTerminalEvent, isTerminalStatus } from "./format.js";

/**
 * What the watches ask for (`maxEventsPerMessage`): a stream that fell behind (a burst of events,
 * or a resume replaying the log) sends what it has queued in one message. The watches unpack it
 * and still call `onEvent` once per event, in stream order.
 */
const EVENTS_PER_MESSAGE = 256;

/** A watch stream message's events: `events` when the server packed several, else `event` (or none). */
function eventsOf(response: WatchTaskResponse | WatchTasksResponse): readonly TaskEvent[] {
  if (response.events.length > 0) return response.events;
  return response.event === undefined ? [] : [response.event];
}

/** How to reach the gateway. */
export interface CharaiClientOptions {
  /**
   * The gateway's HTTP URL (the gRPC-web port), e.g. `http://127.0.0.1:8080`. In a page served by
   * the gateway itself, `window.location.origin`.
   */
  baseUrl: string;
  /** A client token (`CHARAI_API_KEYS`), sent as `authorization: Bearer <token>`; a function is asked per call. */
  token?: string | (() => string | undefined);
  /** Deadline of each unary call in ms (default 30000). Watch streams have none. */
  timeoutMs?: number;
  /** Reconnect policy of `watchTask` / `watchCharacter`. */
  reconnect?: ReconnectOptions;
  /** Another fetch (e.g. to set `credentials`). */
  fetch?: typeof globalThis.fetch;
  /** Use this transport instead of connect-web's gRPC-web transport (baseUrl, token and fetch are then ignored). */
  transport?: Transport;
}

/** `"low" | "normal" | "high"` as in the seed, or the enum. */
export type PriorityInput = "low" | "normal" | "high" | Priority;

/** Fields every submit accepts besides the payload. */
export interface SubmitCommon {
  /** Display name of the character (also stored in the task's metadata). */
  characterName?: string;
  /** Default "normal". */
  priority?: PriorityInput;
  /** Extra labels to find the task by, e.g. `{category: "character_design"}`. */
  metadata?: Record<string, string>;
  /**
   * Idempotency key: retrying a submit with the same id returns the same task. Default: a random
   * UUID per call, so an automatic retry after a network error cannot create a second task.
   */
  requestId?: string;
}

/** `submitImageTask` parameters (the seed's, plus the optional ones). */
export interface SubmitImageParams extends SubmitCommon {
  characterId: string;
  /** e.g. "front", "side", "back". */
  viewType: string;
  prompt: string;
  /** "WxH", e.g. "1024x1024" (empty: the model's default). */
  resolution: string;
  /** A costume variant (the callback type is then `character_costume`). */
  costumeId?: string;
  /**
   * Makes the request repeatable (0 to 2^53-1): an identical request with the same seed reuses
   * the image instead of generating a new one (README, "Identical requests are reused").
   */
  seed?: number;
  /** Image quality where the model has it (OpenAI: `standard`/`hd` for DALL-E 3, `low`..`high`/`auto` for GPT image). */
  quality?: string;
  /** `png`, `jpeg` or `webp` where the model can produce them (OpenAI GPT image models). */
  outputFormat?: string;
}

/** TTS options of the seed (`TTSOptions`). */
export interface TTSOptions {
  /** 0.5 to 2 (default 1). */
  speed?: number;
  /** Greater than 0, at most 10 (default 1). */
  volume?: number;
  /** "wav" (default), "pcm" or "mp3". */
  responseFormat?: "wav" | "pcm" | "mp3";
  /**
   * `false`: call the provider even when an identical request's audio could be reused (default:
   * reused; README, "Identical requests are reused").
   */
  reuse?: boolean;
}

/** `submitTTSTask` parameters (the seed's, plus the optional ones). */
export interface SubmitTTSParams extends SubmitCommon {
  characterId: string;
  text: string;
  /** The provider's voice, e.g. "tongtong". */
  voiceStyle: string;
  options?: TTSOptions;
}

/**
 * One task of `createMany`: `{image: <submitImageTask's parameters>}`, `{tts: <submitTTSTask's
 * parameters>}`, or a `CreateTaskRequest` message (`create(CreateTaskRequestSchema, {...})`) as is.
 * The keys are the proto's, so a refusal's `requests[2].image.prompt` names `items[2].image.prompt`.
 */
export type CreateManyItem =
  | { image: SubmitImageParams; tts?: never }
  | { tts: SubmitTTSParams; image?: never }
  | CreateTaskRequest;

/** Options of `getCharacterTasks`. */
export interface CharacterTasksQuery {
  /** Only tasks whose metadata has this `category`. */
  category?: string;
  /** Any other metadata keys that must match exactly. */
  metadata?: Record<string, string>;
  /** Only this type. */
  type?: TaskType;
  /** At most this many tasks, newest first (default 500). */
  limit?: number;
  signal?: AbortSignal;
}

/** What the watch helpers pass to `onReconnect` before each reconnect. */
export interface ReconnectInfo {
  /** 1 for the first reconnect after a working stream, and so on. */
  attempt: number;
  /** How long it waits before reconnecting. */
  delayMs: number;
  /** Why the previous connection ended. */
  error: unknown;
}

/** Options of `watchTask`. */
export interface WatchOptions {
  /** Aborting it ends the watch (and the server-side stream) at once. */
  signal?: AbortSignal;
  /** Resume after this sequence (0, the default: start with a snapshot). */
  afterSequence?: bigint | number;
  /** Told about every reconnect (e.g. to show "reconnecting..."). */
  onReconnect?: (info: ReconnectInfo) => void;
  /** Told when a (re)connected stream delivers its first message. */
  onConnected?: () => void;
}

/** Options of `watchCharacter`. */
export interface WatchCharacterOptions extends WatchOptions {
  /** Only tasks whose metadata has this `category`. */
  category?: string;
  /** Any other metadata keys that must match exactly. */
  metadata?: Record<string, string>;
  /** Only this type. */
  type?: TaskType;
}

/** The client: the seed's `characterTasksApi` plus the rest of TaskService and resumable watches. */
export interface CharaiClient {
  /** Submits an image task; resolves with it QUEUED. */
  submitImageTask(params: SubmitImageParams, options?: { signal?: AbortSignal }): Promise<Task>;
  /** Submits a TTS task; resolves with it QUEUED. */
  submitTTSTask(params: SubmitTTSParams, options?: { signal?: AbortSignal }): Promise<Task>;
  /**
   * BatchCreateTasks: 1 to 100 tasks in one call (e.g. a character's views and a voice line), all
   * or none; resolves with them QUEUED, in the order of `items`. One bad item refuses the whole
   * batch and stores nothing: a `ConnectError` INVALID_ARGUMENT whose `fieldViolations(err)` name
   * `requests[i].<field>` (e.g. `requests[2].image.prompt`). A `requestId` left out is a random one
   * per item; give your own to make a retried batch return the same tasks.
   */
  createMany(items: readonly CreateManyItem[], options?: { signal?: AbortSignal }): Promise<Task[]>;
  /** Every task of a character (metadata `characterId`), newest first. */
  getCharacterTasks(characterId: string, query?: CharacterTasksQuery): Promise<Task[]>;
  /** One task by id (with `queuePosition` while queued). */
  getTask(id: string, options?: { signal?: AbortSignal }): Promise<Task>;
  /** Cancels a queued or running task; resolves with the task after the cancel. */
  cancelTask(id: string, options?: { signal?: AbortSignal }): Promise<Task>;
  /**
   * Calls `onEvent` for every event of one task (first a snapshot, then each change; no
   * heartbeats) and resolves with the final task. A dropped connection is resumed from the last
   * sequence received, so no event is lost or repeated. Rejects with the signal's reason when
   * aborted, with a `ConnectError` on a non-transient error (e.g. NOT_FOUND), and with a
   * `WatchResumeError` when reconnecting keeps failing.
   */
  watchTask(id: string, onEvent: (event: TaskEvent) => void, options?: WatchOptions): Promise<Task>;
  /**
   * Calls `onEvent` for every event of every task of a character (no heartbeats) until the signal
   * aborts; then resolves. Dropped connections are resumed without losing or repeating an event.
   * Only events after the call started are delivered (list the tasks with `getCharacterTasks`).
   */
  watchCharacter(
    characterId: string,
    onEvent: (event: TaskEvent) => void,
    options?: WatchCharacterOptions,
  ): Promise<void>;
  /**
   * Metered usage and cost by tenant, provider, model and UTC day, with the tenant's budgets
   * (GetUsage; README, "Usage and budgets"). Days are "YYYY-MM-DD"; default: this month so far.
   * A tenant sees its own; operators may name another `tenant` or ask for `allTenants`.
   */
  getUsage(query?: UsageQuery, options?: { signal?: AbortSignal }): Promise<GetUsageResponse>;
  /** The generated connect client, for anything else (e.g. paging ListTasks yourself). */
  readonly raw: Client<typeof TaskService>;
}

/** `getUsage` filters (all optional). */
export interface UsageQuery {
  tenant?: string;
  allTenants?: boolean;
  startDay?: string;
  endDay?: string;
  pageSize?: number;
  pageToken?: string;
}

const PRIORITIES: Record<string, Priority> = {
  low: Priority.LOW,
  normal: Priority.NORMAL,
  high: Priority.HIGH,
};

function priorityOf(value: PriorityInput | undefined, field = "priority"): Priority {
  if (value === undefined) return Priority.NORMAL;
  if (typeof value === "number") return value;
  const known = PRIORITIES[value];
  if (known === undefined) {
    throw invalidFields([{ field, description: `unknown value ${String(value)}: low, normal or high` }]);
  }
  return known;
}

function randomId(): string {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === "function") return c.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

function required(task: Task | undefined, rpc: string): Task {
  if (task === undefined) throw new ConnectError(`${rpc}: the response carried no task`, Code.Internal);
  return task;
}

/** The CreateTask request of `submitImageTask` (the callback filled as the seed does). */
function imageRequest(params: SubmitImageParams, priorityField?: string): CreateTaskRequest {
  const costumeId = params.costumeId ?? "";
  return create(CreateTaskRequestSchema, {
    type: TaskType.IMAGE_GENERATION,
    priority: priorityOf(params.priority, priorityField),
    metadata: params.metadata ?? {},
    requestId: params.requestId ?? randomId(),
    payload: {
      case: "image",
      value: create(ImagePayloadSchema, {
        characterId: params.characterId,
        characterName: params.characterName ?? "",
        prompt: params.prompt,
        resolution: params.resolution,
        viewType: params.viewType,
        costumeId,
        ...(params.seed !== undefined ? { seed: BigInt(params.seed) } : {}),
        quality: params.quality ?? "",
        outputFormat: params.outputFormat ?? "",
        callback: create(CallbackSchema, {
          type: costumeId ? "character_costume" : "character_view",
          characterId: params.characterId,
          viewType: params.viewType,
          costumeId,
        }),
      }),
    },
  });
}

/** The CreateTask request of `submitTTSTask`. */
function ttsRequest(params: SubmitTTSParams, priorityField?: string): CreateTaskRequest {
  const o = params.options ?? {};
  return create(CreateTaskRequestSchema, {
    type: TaskType.TTS_GENERATION,
    priority: priorityOf(params.priority, priorityField),
    metadata: params.metadata ?? {},
    requestId: params.requestId ?? randomId(),
    payload: {
      case: "tts",
      value: create(TtsPayloadSchema, {
        characterId: params.characterId,
        characterName: params.characterName ?? "",
        text: params.text,
        voiceStyle: params.voiceStyle,
        ...(o.speed !== undefined ? { speed: o.speed } : {}),
        ...(o.volume !== undefined ? { volume: o.volume } : {}),
        responseFormat: o.responseFormat ?? "",
        ...(o.reuse !== undefined ? { reuse: o.reuse } : {}),
        callback: create(CallbackSchema, { type: "character_voice", characterId: params.characterId }),
      }),
    },
  });
}

/** Creates a client. `createCharaiClient({baseUrl: "http://127.0.0.1:8080"})`. */
export function createCharaiClient(options: CharaiClientOptions): CharaiClient {
  const auth: Interceptor = (next) => async (req) => {
    const token = typeof options.token === "function" ? options.token() : options.token;
    if (token) req.header.set("authorization", `Bearer ${token}`);
    return next(req);
  };
  const transport =
    options.transport ??
    createGrpcWebTransport({
      baseUrl: options.baseUrl,
      interceptors: [auth],
      ...(options.fetch ? { fetch: options.fetch } : {}),
    });
  const raw = createClient(TaskService, transport);
  const timeoutMs = options.timeoutMs ?? 30_000;
  const policy = resolveReconnect(options.reconnect);
  const unary = (signal?: AbortSignal): CallOptions => (signal ? { timeoutMs, signal } : { timeoutMs });

  async function submitImageTask(params: SubmitImageParams, opts?: { signal?: AbortSignal }): Promise<Task> {
    return required((await raw.createTask(imageRequest(params), unary(opts?.signal))).task, "CreateTask");
  }

  async function submitTTSTask(params: SubmitTTSParams, opts?: { signal?: AbortSignal }): Promise<Task> {
    return required((await raw.createTask(ttsRequest(params), unary(opts?.signal))).task, "CreateTask");
  }

  async function createMany(items: readonly CreateManyItem[], opts?: { signal?: AbortSignal }): Promise<Task[]> {
    const requests = items.map((item, i) => {
      if (isMessage(item, CreateTaskRequestSchema)) return item;
      if (item.image !== undefined) return imageRequest(item.image, `requests[${i}].priority`);
      if (item.tts !== undefined) return ttsRequest(item.tts, `requests[${i}].priority`);
      throw invalidFields([{ field: `requests[${i}]`, description: "must be {image}, {tts} or a CreateTaskRequest" }]);
    });
    const response = await raw.batchCreateTasks({ requests }, unary(opts?.signal));
    if (response.tasks.length !== requests.length) {
      throw new ConnectError(
        `BatchCreateTasks: ${response.tasks.length} tasks for ${requests.length} requests`,
        Code.Internal,
      );
    }
    return response.tasks;
  }

  async function getCharacterTasks(characterId: string, query: CharacterTasksQuery = {}): Promise<Task[]> {
    const metadata: Record<string, string> = { ...(query.metadata ?? {}), characterId };
    if (query.category !== undefined) metadata["category"] = query.category;
    const limit = query.limit ?? 500;
    const tasks: Task[] = [];
    let pageToken = "";
    do {
      const page = await raw.listTasks(
        {
          metadata,
          type: query.type ?? TaskType.UNSPECIFIED,
          pageSize: Math.min(500, limit - tasks.length),
          pageToken,
        },
        unary(query.signal),
      );
      tasks.push(...page.tasks);
      pageToken = page.nextPageToken;
    } while (pageToken && tasks.length < limit);
    return tasks.slice(0, limit);
  }

  async function getTask(id: string, opts?: { signal?: AbortSignal }): Promise<Task> {
    return required((await raw.getTask({ id }, unary(opts?.signal))).task, "GetTask");
  }

  async function cancelTask(id: string, opts?: { signal?: AbortSignal }): Promise<Task> {
    return required((await raw.cancelTask({ id }, unary(opts?.signal))).task, "CancelTask");
  }

  /**
   * The reconnect loop shared by both watches. `open(attemptSignal)` runs one connection and
   * returns `{done: value}` when the watch is over, or `undefined` when the stream ended early.
   */
  async function resumeLoop<T>(
    opts: WatchOptions,
    open: (attempt: Attempt, delivered: () => void) => Promise<{ done: T } | undefined>,
  ): Promise<T> {
    let failures = 0;
    for (;;) {
      opts.signal?.throwIfAborted();
      const attempt = new Attempt(opts.signal, policy.idleTimeoutMs);
      let first = true;
      const delivered = (): void => {
        attempt.touch();
        failures = 0;
        if (first) {
          first = false;
          opts.onConnected?.();
        }
      };
      let error: unknown;
      try {
        const result = await open(attempt, delivered);
        if (result !== undefined) return result.done;
        error = new ConnectError("the stream ended early (e.g. the gateway is restarting)", Code.Unavailable);
      } catch (err) {
        if (opts.signal?.aborted) throw opts.signal.reason;
        if (!attempt.idle && !isResumable(err)) throw ConnectError.from(err);
        error = err;
      } finally {
        attempt.close();
      }
      failures += 1;
      if (failures > policy.maxAttempts) {
        throw new WatchResumeError(`gave up reconnecting after ${failures - 1} attempts`, error);
      }
      const delayMs = backoffDelay(failures, policy);
      opts.onReconnect?.({ attempt: failures, delayMs, error });
      await sleep(delayMs, opts.signal);
    }
  }

  async function watchTask(
    id: string,
    onEvent: (event: TaskEvent) => void,
    opts: WatchOptions = {},
  ): Promise<Task> {
    let last = BigInt(opts.afterSequence ?? 0);
    /** One stream from `last`: the final task if it ended, and whether anything came at all. */
    const follow = async (attempt: Attempt, delivered: () => void): Promise<[Task | undefined, boolean]> => {
      const stream = raw.watchTask(
        { id, afterSequence: last, maxEventsPerMessage: EVENTS_PER_MESSAGE },
        { signal: attempt.signal },
      );
      let received = false;
      for await (const response of stream) {
        received = true;
        delivered();
        for (const event of eventsOf(response)) {
          if (event.type === TaskEventType.HEARTBEAT) continue;
          if (event.sequence !== 0n && event.sequence <= last) continue; // never hand out an event twice
          // Aborted by an earlier onEvent of the same message: deliver nothing more, as before.
          opts.signal?.throwIfAborted();
          if (event.sequence > last) last = event.sequence;
          onEvent(event);
          const task = event.task;
          if (
            task !== undefined &&
            (isTerminalEvent(event.type) || (event.type === TaskEventType.SNAPSHOT && isTerminalStatus(task.status)))
          ) {
            return [task, true];
          }
        }
      }
      return [undefined, received];
    };
    return resumeLoop(opts, async (attempt, delivered) => {
      const [ended, received] = await follow(attempt, delivered);
      if (ended !== undefined) return { done: ended };
      if (!received) {
        // An empty stream: the task may have ended at or before the cursor (a resume after its
        // last event), which the server answers with nothing; reconnecting would never end. If
        // it has ended, a stream opened now sends whatever came after the cursor, then ends.
        const task = await getTask(id, { signal: attempt.signal });
        if (isTerminalStatus(task.status)) {
          const [final] = await follow(attempt, delivered);
          return { done: final ?? task };
        }
      }
      return undefined;
    });
  }

  async function watchCharacter(
    characterId: string,
    onEvent: (event: TaskEvent) => void,
    opts: WatchCharacterOptions = {},
  ): Promise<void> {
    const metadata: Record<string, string> = { ...(opts.metadata ?? {}), characterId };
    if (opts.category !== undefined) metadata["category"] = opts.category;
    // The stream is ordered per task, not across tasks (a late event of one task can follow a
    // newer event of another). So the resume cursor is a floor below which everything was
    // delivered (heartbeats carry the server's floor), plus the last sequence delivered per task
    // above it: exactly what the server keeps, so a resume neither loses nor repeats an event.
    let floor = BigInt(opts.afterSequence ?? 0);
    const seen = new Map<string, bigint>();
    const cursor = (): bigint => {
      if (floor > 0n || seen.size === 0) return floor;
      // No floor yet (a fresh watch that dropped before its first heartbeat): resume just below
      // the oldest event delivered.
      let min = -1n;
      for (const s of seen.values()) if (min < 0n || s < min) min = s;
      return min - 1n;
    };
    try {
      await resumeLoop(opts, async (attempt, delivered) => {
        const stream = raw.watchTasks(
          {
            metadata,
            type: opts.type ?? TaskType.UNSPECIFIED,
            afterSequence: cursor(),
            maxEventsPerMessage: EVENTS_PER_MESSAGE,
          },
          { signal: attempt.signal },
        );
        for await (const response of stream) {
          delivered();
          for (const event of eventsOf(response)) {
            if (event.type === TaskEventType.HEARTBEAT) {
              if (event.sequence > floor) {
                floor = event.sequence;
                for (const [taskId, s] of seen) if (s <= floor) seen.delete(taskId);
              }
              continue;
            }
            const taskId = event.task?.id ?? "";
            if (event.sequence <= (seen.get(taskId) ?? floor)) continue; // already delivered
            // Aborted by an earlier onEvent of the same message: deliver nothing more, as before.
            opts.signal?.throwIfAborted();
            seen.set(taskId, event.sequence);
            onEvent(event);
          }
        }
        return undefined;
      });
    } catch (err) {
      if (opts.signal?.aborted) return;
      throw err;
    }
  }

  async function getUsage(query: UsageQuery = {}, opts?: { signal?: AbortSignal }): Promise<GetUsageResponse> {
    return raw.getUsage(create(GetUsageRequestSchema, query), unary(opts?.signal));
  }

  return {
    submitImageTask,
    submitTTSTask,
    createMany,
    getCharacterTasks,
    getTask,
    cancelTask,
    watchTask,
    watchCharacter,
    getUsage,
    raw,
  };
}
