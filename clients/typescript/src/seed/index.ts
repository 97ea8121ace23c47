/**
 * `@charai/client/seed`: the seed app's frontend API on charai's REST routes and Server-Sent
 * Events. Plain JSON tasks (status strings, `result.imageUrl` / `result.audioUrl`, `error` as the
 * message), fetch and one shared EventSource; no protobuf, no React, no zustand required.
 *
 * ```ts
 * import { characterTasksApi, configureSeed, taskStore } from "@charai/client/seed";
 *
 * configureSeed({ baseUrl: "https://charai.example.com", token: () => session.charaiToken });
 * const task = await characterTasksApi.submitImageTask({ characterId: "char_001", viewType: "front",
 *   prompt: "a young swordsman", resolution: "1024x1024" });
 * taskStore.subscribeToTask(task.id, (t) => t.status === "completed" && show(t.result!.imageUrl));
 * ```
 */
import { FetchEventSource, type EventSourceConstructor, type EventSourceLike } from "./event-source.js";
import { type HttpConfig, request, SeedApiError, type TokenSource } from "./http.js";
import { createTaskStore, filterQuery, type StoreConfig, type TaskFilter, type TaskSource, type TaskStore, type TaskStoreState } from "./store.js";
import type {
  ImageGenerationPayload,
  TTSGenerationPayload,
  Task,
  TaskPriority,
  TaskStatus,
  TaskType,
  TTSOptions,
  ViewType,
} from "./types.js";

export * from "./types.js";
export { FetchEventSource, type EventSourceConstructor, type EventSourceLike, type FetchEventSourceInit } from "./event-source.js";
export { type FieldViolation, SeedApiError, type TokenSource } from "./http.js";
export {
  type ConnectionState,
  type FilterSubscribeOptions,
  matches,
  type SubscribeOptions,
  type TaskCallback,
  type TaskFilter,
  type TaskSource,
  type TaskStore,
  type TaskStoreState,
} from "./store.js";

/** Where the gateway is and how to authenticate. Every field is optional. */
export interface SeedOptions {
  /**
   * The gateway's HTTP URL, e.g. `https://charai.example.com` (default: "", the page's own
   * origin). Required outside a browser page.
   */
  baseUrl?: string;
  /**
   * A tenant API key (backends) or an access token from `CreateAccessToken` (browsers): a string,
   * or a function asked before every request and every (re)connect (so it can hand out a fresh
   * token). Sent as `Authorization: Bearer` on fetch and as `?access_token=` on the EventSource.
   */
  token?: TokenSource;
  /** Another fetch (default: the global one). */
  fetch?: typeof globalThis.fetch;
  /**
   * The EventSource constructor (default: the global one; where there is none, as in Node 20, a
   * fetch-based one that follows the standard).
   */
  EventSource?: EventSourceConstructor;
  /** Narrows the one shared stream, e.g. `{metadata: {characterId: "char_001"}}` (an access token narrows it anyway). */
  feed?: { metadata?: Record<string, string>; type?: TaskType };
  /** Deadline of each REST request in ms (default 30000; 0: none). */
  timeoutMs?: number;
  /** Backoff of a new EventSource after one was refused (default 500 ms doubling up to 5000 ms). */
  reconnect?: { initialDelayMs?: number; maxDelayMs?: number };
  /** How long the stream stays open after the last subscriber leaves, in ms (default 0). */
  lingerMs?: number;
  /** Told about errors no subscription's `onError` took (a refused stream, an unreachable task). */
  onError?: (error: SeedApiError) => void;
}

/** `submitImageTask` parameters: the seed's four, plus optional extras. */
export interface SubmitImageParams {
  characterId: string;
  viewType: ViewType;
  prompt: string;
  resolution: string;
  characterName?: string;
  /** A costume variant (the callback becomes `character_costume`). */
  costumeId?: string;
  priority?: TaskPriority;
  metadata?: Record<string, string>;
  /** Idempotency: the same id returns the same task instead of creating a second one. */
  requestId?: string;
  /** Image quality where the model has it (README, "Using OpenAI or an OpenAI-compatible server"). */
  quality?: string;
  /** `png`, `jpeg` or `webp` where the model can produce them. */
  outputFormat?: string;
}

/** `submitTTSTask` parameters: the seed's, plus optional extras. */
export interface SubmitTTSParams {
  characterId: string;
  text: string;
  voiceStyle: string;
  options?: TTSOptions;
  characterName?: string;
  priority?: TaskPriority;
  metadata?: Record<string, string>;
  requestId?: string;
}

/**
 * One task of `createMany`: `{image: <submitImageTask's parameters>}` or `{tts: <submitTTSTask's
 * parameters>}`. A refusal names the item's fields as in the JSON body: `requests[2].payload.prompt`.
 */
export type CreateManyItem = { image: SubmitImageParams; tts?: never } | { tts: SubmitTTSParams; image?: never };

/** `createCharacterSheet`'s tasks: a character's views and, optionally, a voice line. */
export interface CharacterSheet {
  /** One image task per view, in this order. `resolution` defaults to the sheet's. */
  views: Array<{ viewType: ViewType; prompt: string; resolution?: string; costumeId?: string }>;
  /** A voice line (a TTS task after the views). */
  voice?: { text: string; voiceStyle: string; options?: TTSOptions };
  /** Of every view without its own (default "": the model's default). */
  resolution?: string;
  characterName?: string;
  priority?: TaskPriority;
  metadata?: Record<string, string>;
  /** Idempotency of the whole sheet: the tasks get `<requestId>-0`, `<requestId>-1`, ... in order. */
  requestId?: string;
}

/** Options of `getCharacterTasks` / `listTasks`. */
export interface TaskQuery {
  category?: string;
  metadata?: Record<string, string>;
  type?: TaskType;
  status?: TaskStatus;
  /** At most this many (the route's default and cap: 1000). */
  pageSize?: number;
  pageToken?: string;
}

/** The seed's `characterTasksApi`, plus the other REST routes. */
export interface CharacterTasksApi {
  submitImageTask(params: SubmitImageParams): Promise<Task<ImageGenerationPayload>>;
  submitTTSTask(params: SubmitTTSParams): Promise<Task<TTSGenerationPayload>>;
  /**
   * `POST /api/tasks:batchCreate`: 1 to 100 tasks in one request, all or none; resolves with
   * them queued, in the order of `items`. One bad item refuses the batch (a 400 `SeedApiError`
   * whose `fieldViolations` name `requests[i].payload.…`) and nothing is created.
   */
  createMany(items: readonly CreateManyItem[]): Promise<Task[]>;
  /** A character's views and voice line in one `createMany` (all or none). */
  createCharacterSheet(
    characterId: string,
    sheet: CharacterSheet,
  ): Promise<{ views: Task<ImageGenerationPayload>[]; voice: Task<TTSGenerationPayload> | undefined }>;
  /** `GET /api/tasks?metadata.characterId=…` (newest first, up to 1000). */
  getCharacterTasks(characterId: string, query?: TaskQuery): Promise<Task[]>;
  /** Any metadata/type/status filter; `nextPageToken` when there are more. */
  listTasks(query?: TaskQuery): Promise<{ tasks: Task[]; nextPageToken: string | undefined }>;
  getTask(taskId: string): Promise<Task>;
  cancelTask(taskId: string): Promise<Task>;
  /** Ended tasks only (FAILED_PRECONDITION otherwise); removes its events and media too. */
  deleteTask(taskId: string): Promise<void>;
  /**
   * `POST /api/access-tokens` (a tenant key only; for backends): a token reaching `taskIds`
   * and/or `metadata`, able to create tasks there with `allowCreate`, for `ttl` seconds.
   */
  createAccessToken(scope: {
    taskIds?: string[];
    metadata?: Record<string, string>;
    allowCreate?: boolean;
    ttl?: number;
  }): Promise<{ token: string; expireTime: string }>;
}

export interface SeedClient {
  readonly characterTasksApi: CharacterTasksApi;
  readonly taskStore: TaskStore;
  /** Changes settings (the next request and the next connect use them; `taskStore.reconnect()` applies them now). */
  configure(options: SeedOptions): void;
}

interface MutableConfig extends StoreConfig {
  eventSourceClass: EventSourceConstructor | undefined;
}

function makeConfig(): MutableConfig {
  const config: MutableConfig = {
    baseUrl: "",
    token: undefined,
    fetch: (input, init) => globalThis.fetch(input, init),
    timeoutMs: 30_000,
    feed: undefined,
    reconnect: { initialDelayMs: 500, maxDelayMs: 5000 },
    lingerMs: 0,
    onError: undefined,
    eventSourceClass: undefined,
    eventSource: (url) => {
      const Native = config.eventSourceClass ?? (globalThis as { EventSource?: EventSourceConstructor }).EventSource;
      if (Native) return new Native(url);
      return new FetchEventSource(url, { fetch: config.fetch }) as EventSourceLike;
    },
  };
  return config;
}

function applyOptions(config: MutableConfig, options: SeedOptions): void {
  if (options.baseUrl !== undefined) config.baseUrl = options.baseUrl.replace(/\/+$/, "");
  if ("token" in options) config.token = options.token;
  if (options.fetch) config.fetch = options.fetch;
  if (options.EventSource) config.eventSourceClass = options.EventSource;
  if ("feed" in options) config.feed = options.feed;
  if (options.timeoutMs !== undefined) config.timeoutMs = options.timeoutMs;
  if (options.reconnect) config.reconnect = { ...config.reconnect, ...options.reconnect };
  if (options.lingerMs !== undefined) config.lingerMs = options.lingerMs;
  if ("onError" in options) config.onError = options.onError;
}

// Exactly the seed's bodies (src/lib/api/character-tasks.ts), plus the optional extras when given.
function imageBody(params: SubmitImageParams): Record<string, unknown> {
  const callback: Record<string, string> = {
    type: params.costumeId ? "character_costume" : "character_view",
    characterId: params.characterId,
    viewType: params.viewType,
  };
  if (params.costumeId) callback["costumeId"] = params.costumeId;
  return {
    type: "image_generation",
    priority: params.priority ?? "normal",
    payload: {
      characterId: params.characterId,
      ...(params.characterName ? { characterName: params.characterName } : {}),
      viewType: params.viewType,
      prompt: params.prompt,
      resolution: params.resolution,
      ...(params.costumeId ? { costumeId: params.costumeId } : {}),
      ...(params.quality ? { quality: params.quality } : {}),
      ...(params.outputFormat ? { outputFormat: params.outputFormat } : {}),
      callback,
    },
    ...(params.metadata ? { metadata: params.metadata } : {}),
    ...(params.requestId ? { requestId: params.requestId } : {}),
  };
}

function ttsBody(params: SubmitTTSParams): Record<string, unknown> {
  return {
    type: "tts_generation",
    priority: params.priority ?? "normal",
    payload: {
      characterId: params.characterId,
      ...(params.characterName ? { characterName: params.characterName } : {}),
      text: params.text,
      voiceStyle: params.voiceStyle,
      ...params.options,
      callback: { type: "character_voice", characterId: params.characterId },
    },
    ...(params.metadata ? { metadata: params.metadata } : {}),
    ...(params.requestId ? { requestId: params.requestId } : {}),
  };
}

function createApi(config: HttpConfig, store: TaskStore): CharacterTasksApi {
  const post = async <T>(path: string, body: unknown): Promise<T> => (await request<T>(config, "POST", path, { body })).data;

  async function submit<P>(body: Record<string, unknown>): Promise<Task<P>> {
    const task = await post<Task<P>>("/api/tasks", body);
    store.ingest(task as Task);
    return task;
  }

  async function listTasks(query: TaskQuery = {}): Promise<{ tasks: Task[]; nextPageToken: string | undefined }> {
    const metadata = { ...(query.metadata ?? {}) };
    if (query.category !== undefined) metadata["category"] = query.category;
    const filter: TaskFilter = { metadata };
    if (query.type) filter.type = query.type;
    if (query.status) filter.status = query.status;
    const params = filterQuery(filter);
    if (query.pageSize) params.set("pageSize", String(query.pageSize));
    if (query.pageToken) params.set("pageToken", query.pageToken);
    const { data, headers } = await request<Task[]>(config, "GET", "/api/tasks", { query: params });
    store.ingest(data);
    return { tasks: data, nextPageToken: headers.get("X-Next-Page-Token") ?? undefined };
  }

  async function createMany(items: readonly CreateManyItem[]): Promise<Task[]> {
    const requests = items.map((item) => {
      if (item.image !== undefined) return imageBody(item.image);
      if (item.tts !== undefined) return ttsBody(item.tts);
      return item; // not typed so (plain JS): sent as it is, for the gateway to name what is wrong
    });
    const { tasks } = await post<{ tasks: Task[] }>("/api/tasks:batchCreate", { requests });
    store.ingest(tasks);
    return tasks;
  }

  return {
    submitImageTask: (params) => submit<ImageGenerationPayload>(imageBody(params)),
    submitTTSTask: (params) => submit<TTSGenerationPayload>(ttsBody(params)),
    createMany,
    async createCharacterSheet(characterId, sheet) {
      const common = {
        characterId,
        ...(sheet.characterName !== undefined ? { characterName: sheet.characterName } : {}),
        ...(sheet.priority !== undefined ? { priority: sheet.priority } : {}),
        ...(sheet.metadata !== undefined ? { metadata: sheet.metadata } : {}),
      };
      const requestId = (i: number): { requestId?: string } =>
        sheet.requestId ? { requestId: `${sheet.requestId}-${i}` } : {};
      const items: CreateManyItem[] = sheet.views.map((view, i) => ({
        image: { ...common, ...view, resolution: view.resolution ?? sheet.resolution ?? "", ...requestId(i) },
      }));
      if (sheet.voice) items.push({ tts: { ...common, ...sheet.voice, ...requestId(items.length) } });
      const tasks = await createMany(items);
      return {
        views: tasks.slice(0, sheet.views.length) as Task<ImageGenerationPayload>[],
        voice: sheet.voice ? (tasks[sheet.views.length] as Task<TTSGenerationPayload>) : undefined,
      };
    },
    async getCharacterTasks(characterId, query = {}) {
      return (await listTasks({ ...query, metadata: { ...(query.metadata ?? {}), characterId } })).tasks;
    },
    listTasks,
    async getTask(taskId) {
      const task = (await request<Task>(config, "GET", `/api/tasks/${encodeURIComponent(taskId)}`)).data;
      store.ingest(task);
      return task;
    },
    async cancelTask(taskId) {
      const task = await post<Task>(`/api/tasks/${encodeURIComponent(taskId)}/cancel`, undefined);
      store.ingest(task);
      return task;
    },
    async deleteTask(taskId) {
      await request<void>(config, "DELETE", `/api/tasks/${encodeURIComponent(taskId)}`);
      store.forget(taskId);
    },
    createAccessToken(scope) {
      return post<{ token: string; expireTime: string }>("/api/access-tokens", scope);
    },
  };
}

/** A client of its own (its own settings, store and connection). */
export function createSeedClient(options: SeedOptions = {}): SeedClient {
  const config = makeConfig();
  applyOptions(config, options);
  const taskStore = createTaskStore(config);
  const characterTasksApi = createApi(config, taskStore);
  return { characterTasksApi, taskStore, configure: (next) => applyOptions(config, next) };
}

const defaultClient = createSeedClient();

/** The seed's `characterTasksApi` (the default client: configure it with `configureSeed`). */
export const characterTasksApi: CharacterTasksApi = defaultClient.characterTasksApi;
/** The seed's `taskStore` (the default client's): `subscribeToTask`, `subscribe`, `getState`. */
export const taskStore: TaskStore = defaultClient.taskStore;
/** Sets the default client's `baseUrl`, `token`, ... (call once at start-up). */
export function configureSeed(options: SeedOptions): void {
  defaultClient.configure(options);
}

/** The one React hook these helpers need (pass React itself: `createUseTask(React)`). */
export interface UseSyncExternalStore {
  useSyncExternalStore<T>(subscribe: (onStoreChange: () => void) => () => void, getSnapshot: () => T, getServerSnapshot?: () => T): T;
}

const noSubscription = (): (() => void) => () => {};
const nothing = (): undefined => undefined;

/**
 * `const useTask = createUseTask(React)`; then in a component `const task = useTask(taskId)`:
 * the task's latest state (undefined until fetched), re-rendering on every change until it ends.
 * No React import here: the hook is React's own `useSyncExternalStore` over `store.taskSource(id)`.
 */
export function createUseTask(react: UseSyncExternalStore, store: TaskStore = taskStore): (taskId: string | null | undefined) => Task | undefined {
  return (taskId) => {
    const source: TaskSource | undefined = taskId ? store.taskSource(taskId) : undefined;
    return react.useSyncExternalStore(source?.subscribe ?? noSubscription, source?.getSnapshot ?? nothing, nothing);
  };
}

/**
 * zustand's `useStore` without zustand: `const useTaskStore = createUseTaskStore(React)`, then
 * `useTaskStore((s) => s.tasks[id])` or `useTaskStore((s) => s.connection)`. The selector must
 * return a stable value (a task or a field, not a new array).
 */
export function createUseTaskStore(
  react: UseSyncExternalStore,
  store: TaskStore = taskStore,
): <T>(selector: (state: TaskStoreState) => T) => T {
  const subscribe = (onStoreChange: () => void): (() => void) => store.subscribe(() => onStoreChange());
  return (selector) =>
    react.useSyncExternalStore(subscribe, () => selector(store.getState()), () => selector(store.getInitialState()));
}

