// The task store of `@charai/client/seed`: the seed's `taskStore.subscribeToTask`, a filtered
// `subscribe`, and a zustand-shaped `getState/subscribe` for React — all fed by ONE EventSource on
// `GET /api/tasks/events`, opened when the first subscriber comes and closed when the last goes.
//
// Why one connection: a gallery subscribes to dozens of tasks; browsers allow six HTTP/1.1
// connections per origin, and the gateway counts every watch stream. The multi-task route sends
// every event of every task the token may see (narrowed by `feed`), and the store routes each
// event to the subscriptions it matches.
//
// Gaps and repeats: the multi-task route starts at "now", so a new subscriber's task is fetched
// once (GET /api/tasks/{id}) after the stream is open, i.e. after the server's watcher is in
// place: whatever changes later arrives as an event. A dropped connection is resumed by the
// EventSource itself (Last-Event-ID, which the gateway's heartbeats keep at its resume point);
// when the EventSource gives up (the gateway answered an error while restarting), a new one
// resumes with `?after=` the last event id seen. Replays are deduplicated by the event sequence,
// per task, and no subscriber is ever handed a state older than one it already got.

import { type HttpConfig, joinUrl, request, resolveToken, SeedApiError, type TokenSource } from "./http.js";
import type { EventSourceLike } from "./event-source.js";
import { isTerminal, type Task, type TaskEventData, type TaskStatus, type TaskType } from "./types.js";

/** Which tasks a `subscribe(filter, ...)` wants; every given part must match. */
export interface TaskFilter {
  /** Only these tasks. */
  taskIds?: readonly string[];
  /** Exact match on each key, e.g. `{characterId: "char_001", category: "character_design"}`. */
  metadata?: Readonly<Record<string, string>>;
  type?: TaskType;
  /** One status or several. */
  status?: TaskStatus | readonly TaskStatus[];
}

/**
 * The shared connection: `idle` (nobody listens), `connecting`, `live`, `reconnecting` (dropped,
 * resuming by itself), `failed` (refused for good, e.g. an expired token: see `error`; a new
 * subscription or `reconnect()` tries again).
 */
export type ConnectionState = "idle" | "connecting" | "live" | "reconnecting" | "failed";

export type TaskCallback = (task: Task, event?: TaskEventData) => void;

export interface SubscribeOptions {
  /** Told when the task cannot be followed (NOT_FOUND, PERMISSION_DENIED, ...); the subscription then ends. */
  onError?: (error: SeedApiError) => void;
}

export interface FilterSubscribeOptions extends SubscribeOptions {
  /**
   * Also deliver the current state of every matching task (one `GET /api/tasks?…` once the
   * stream is open), then each change: a gallery in one call. Default false: changes only, like
   * the seed's WebSocket listener.
   */
  current?: boolean;
}

/** What `getState()` returns (zustand's shape: data and actions in one object). */
export interface TaskStoreState {
  /** The latest known state of every task the store has seen, by id. */
  readonly tasks: Readonly<Record<string, Task>>;
  readonly connection: ConnectionState;
  /** Why the connection is `failed` or `reconnecting` (when the store could find out); null once live. */
  readonly error: SeedApiError | null;
  readonly subscribeToTask: TaskStore["subscribeToTask"];
}

/** A `useSyncExternalStore` pair for one task (stable per id while subscribed). */
export interface TaskSource {
  subscribe(onStoreChange: () => void): () => void;
  getSnapshot(): Task | undefined;
}

export interface TaskStore {
  /**
   * Calls `callback` with the task's current state (fetched once), then with each new state,
   * until the task ends (completed, failed or cancelled); the subscription then ends by itself.
   * Returns an unsubscribe function.
   */
  subscribeToTask(taskId: string, callback: (task: Task) => void, options?: SubscribeOptions): () => void;
  /** Calls `callback` with each new state of every task that matches `filter` (until unsubscribed). */
  subscribe(filter: TaskFilter, callback: TaskCallback, options?: FilterSubscribeOptions): () => void;
  /** zustand / useSyncExternalStore: `listener` runs after every change of `getState()`. Opens no connection. */
  subscribe(listener: (state: TaskStoreState, previous: TaskStoreState) => void): () => void;
  getState(): TaskStoreState;
  getInitialState(): TaskStoreState;
  /** The latest known state of a task (undefined when the store never saw it). */
  getTask(taskId: string): Task | undefined;
  /** For React's `useSyncExternalStore`: subscribing follows the task (as `subscribeToTask`). */
  taskSource(taskId: string): TaskSource;
  /** Adds tasks the app got elsewhere (the submit and list calls do it); older states are ignored. */
  ingest(tasks: Task | readonly Task[]): void;
  /** Drops a task from `tasks` (e.g. after `deleteTask`). */
  forget(taskId: string): void;
  /** Tries the connection again now (after `failed`, or after changing the token). */
  reconnect(): void;
  /** Ends every subscription and closes the connection. */
  close(): void;
}

/** Settings the store reads on every (re)connect. */
export interface StoreConfig extends HttpConfig {
  /** Narrows the shared stream (`metadata.<k>=v`, `type`): less traffic with a tenant key. */
  feed: { metadata?: Readonly<Record<string, string>>; type?: TaskType } | undefined;
  /** Makes the EventSource for a URL. */
  eventSource: (url: string) => EventSourceLike;
  /** First and longest delay before a new EventSource after one was refused. */
  reconnect: { initialDelayMs: number; maxDelayMs: number };
  /** How long the connection stays open after the last subscriber left (default 0: closed at once). */
  lingerMs: number;
  /** Told about errors no subscription took (a refused stream, a task that cannot be fetched). */
  onError: ((error: SeedApiError) => void) | undefined;
}

interface Mark {
  seq: number;
  updated: number;
  progress: number;
  terminal: boolean;
}

interface Sub {
  readonly filter: TaskFilter | undefined;
  readonly taskId: string | undefined;
  readonly callback: TaskCallback;
  readonly onError: ((error: SeedApiError) => void) | undefined;
  readonly current: boolean;
  readonly last: Map<string, Mark>;
  /** The epoch whose current state this subscription got (or is getting). */
  primedEpoch: number;
  active: boolean;
}

const EVENT_NAMES = ["task:progress", "task:completed", "task:failed", "task:cancelled", "message"] as const;
const CLOSED = 2;

/** `2024-05-01T10:00:00.123456Z` → ms since the epoch, with the sub-millisecond digits kept. */
export function timeMs(value: string | null | undefined): number {
  if (!value) return 0;
  const match = /^(.*?)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$/.exec(value);
  if (!match) return Date.parse(value) || 0;
  const base = Date.parse(`${match[1]}${match[3]}`);
  if (Number.isNaN(base)) return 0;
  return base + (match[2] ? Number(`0.${match[2]}`) * 1000 : 0);
}

function markOf(task: Task, seq: number): Mark {
  return { seq, updated: timeMs(task.updatedAt), progress: task.progress, terminal: isTerminal(task) };
}

/** Whether `candidate` (seen with sequence `seq`, 0: fetched) is a later state than `mark`. */
function isNewer(candidate: Task, seq: number, mark: Mark | undefined): boolean {
  if (mark === undefined) return true;
  // Sequences order everything, an end and a RetryTask's new life after it included (checking
  // "ended" first froze a retried task at its failure).
  if (seq > 0 && mark.seq > 0) return seq > mark.seq;
  const updated = timeMs(candidate.updatedAt);
  if (mark.terminal) return updated > mark.updated; // only a later life replaces an end
  if (isTerminal(candidate)) return true;
  if (updated !== mark.updated) return updated > mark.updated;
  return candidate.progress > mark.progress;
}

/** Whether `task` matches `filter`. */
export function matches(filter: TaskFilter, task: Task): boolean {
  if (filter.taskIds && !filter.taskIds.includes(task.id)) return false;
  if (filter.type && filter.type !== task.type) return false;
  if (filter.status) {
    const wanted = typeof filter.status === "string" ? [filter.status] : filter.status;
    if (!wanted.includes(task.status)) return false;
  }
  for (const [key, value] of Object.entries(filter.metadata ?? {})) {
    if (task.metadata?.[key] !== value) return false;
  }
  return true;
}

function asError(err: unknown): SeedApiError {
  if (err instanceof SeedApiError) return err;
  return new SeedApiError(String(err), { status: 0, code: "UNKNOWN", cause: err });
}

/** Creates a task store (`createSeedClient` makes one; so does the module's default `taskStore`). */
export function createTaskStore(config: StoreConfig): TaskStore {
  const listeners = new Set<(state: TaskStoreState, previous: TaskStoreState) => void>();
  const subs = new Set<Sub>();
  const entries = new Map<string, { task: Task; mark: Mark }>();
  /** The last event sequence handled per task (replays after a resume are dropped). */
  const seqSeen = new Map<string, number>();
  /** Tasks whose state the store has followed without a gap since the current epoch went live. */
  const tracked = new Set<string>();
  const fetching = new Map<string, Promise<void>>();
  const sources = new Map<string, { source: TaskSource; users: number }>();

  let es: EventSourceLike | undefined;
  /** A new epoch starts when a stream opens at "now" (not resuming): every subscriber is primed again. */
  let epoch = 0;
  let liveEpoch = -1;
  /** The last event id dispatched on this epoch's streams (the resume point of a new EventSource). */
  let cursor = "";
  let failures = 0;
  let timer: ReturnType<typeof setTimeout> | undefined;
  let lingerTimer: ReturnType<typeof setTimeout> | undefined;
  /** The ticket of the open() in progress (0: none); a close or a newer open() voids it. */
  let opening = 0;
  let tickets = 0;

  const initial: TaskStoreState = { tasks: {}, connection: "idle", error: null, subscribeToTask };
  let state: TaskStoreState = initial;

  function setState(partial: Partial<Omit<TaskStoreState, "subscribeToTask">>): void {
    const previous = state;
    state = { ...state, ...partial };
    for (const listener of [...listeners]) listener(state, previous);
  }

  function reportError(error: SeedApiError, sub?: Sub): void {
    const handler = sub?.onError ?? config.onError;
    if (handler) handler(error);
  }

  // -- states in --------------------------------------------------------------------------------

  /**
   * One state of a task, from an event (`seq` > 0) or a fetch (0). Stores it; a state from an
   * event (or handed in with `ingest`) is told to every matching subscriber. A fetched state is
   * not: the subscriber that asked for it is handed it by its caller, and the others keep getting
   * the task's events from the stream (a fetch racing the stream must not swallow the event of
   * the same state for them).
   */
  function apply(task: Task, seq: number, event?: TaskEventData, force = false, tell = seq > 0): boolean {
    const entry = entries.get(task.id);
    const wanted = force || entry !== undefined || [...subs].some((s) => wants(s, task));
    if (!wanted) return false;
    if (isNewer(task, seq, entry?.mark)) {
      entries.set(task.id, { task, mark: markOf(task, seq) });
      setState({ tasks: { ...state.tasks, [task.id]: task } });
    } else if (seq === 0) {
      return true; // a fetched state the store already has (or has a newer one of): nothing new to tell
    } else if (entry && entry.mark.seq < seq && !entry.mark.terminal) {
      entry.mark.seq = seq; // same state, now with its sequence
    }
    if (tell) {
      for (const sub of [...subs]) {
        if (sub.active && wants(sub, task)) deliver(sub, task, seq, event);
      }
    }
    return true;
  }

  function wants(sub: Sub, task: Task): boolean {
    return sub.taskId !== undefined ? sub.taskId === task.id : matches(sub.filter ?? {}, task);
  }

  function deliver(sub: Sub, task: Task, seq: number, event?: TaskEventData): void {
    if (!isNewer(task, seq, sub.last.get(task.id))) return;
    sub.last.set(task.id, markOf(task, seq));
    if (sub.taskId !== undefined && isTerminal(task)) end(sub);
    sub.callback(task, event);
  }

  function onMessage(ev: Event): void {
    const message = ev as MessageEvent;
    if (typeof message.data !== "string") return;
    let data: TaskEventData;
    try {
      data = JSON.parse(message.data) as TaskEventData;
    } catch {
      return;
    }
    if (message.lastEventId) cursor = message.lastEventId;
    const task = data.task;
    if (!task || typeof task.id !== "string") return;
    const seq = Number(data.sequence) || 0;
    if (seq > 0) {
      if (seq <= (seqSeen.get(task.id) ?? 0)) return; // a replay after a resume: already handled
      seqSeen.set(task.id, seq);
    }
    // Followed without a gap only if the store kept this event: one it dropped (nobody wanted the
    // task yet, e.g. it ended before the app read submit's answer) must be fetched by whoever
    // subscribes to the task later.
    if (apply(task, seq, data) && liveEpoch === epoch) tracked.add(task.id);
  }

  // -- current states (after the stream is open) ----------------------------------------------

  function prime(sub: Sub): void {
    if (!sub.active || liveEpoch !== epoch || sub.primedEpoch === epoch) return;
    sub.primedEpoch = epoch;
    if (sub.taskId !== undefined) void primeTask(sub, sub.taskId, 0);
    else if (sub.current) void primeList(sub, 0);
  }

  async function primeTask(sub: Sub, taskId: string, attempt: number): Promise<void> {
    const mine = epoch;
    if (!tracked.has(taskId)) {
      try {
        await fetchTask(taskId);
      } catch (err) {
        const error = asError(err);
        if (!sub.active || mine !== epoch) return;
        if (error.transient && attempt < 8) {
          setTimeout(() => void primeTask(sub, taskId, attempt + 1), backoff(attempt + 1));
          return;
        }
        end(sub);
        reportError(error, sub);
        return;
      }
    }
    const entry = entries.get(taskId);
    if (sub.active && mine === epoch && entry) deliver(sub, entry.task, entry.mark.seq);
  }

  function fetchTask(taskId: string): Promise<void> {
    const running = fetching.get(taskId);
    if (running) return running;
    const mine = epoch;
    const live = liveEpoch === epoch;
    const promise = request<Task>(config, "GET", `/api/tasks/${encodeURIComponent(taskId)}`)
      .then(({ data }) => {
        if (live && mine === epoch) tracked.add(taskId);
        apply(data, 0);
      })
      .finally(() => fetching.delete(taskId));
    fetching.set(taskId, promise);
    return promise;
  }

  async function primeList(sub: Sub, attempt: number): Promise<void> {
    const mine = epoch;
    const live = liveEpoch === epoch;
    let tasks: Task[];
    try {
      tasks = (await request<Task[]>(config, "GET", "/api/tasks", { query: filterQuery(sub.filter ?? {}) })).data;
    } catch (err) {
      const error = asError(err);
      if (!sub.active || mine !== epoch) return;
      if (error.transient && attempt < 8) {
        setTimeout(() => void primeList(sub, attempt + 1), backoff(attempt + 1));
        return;
      }
      reportError(error, sub);
      return;
    }
    if (!sub.active || mine !== epoch) return;
    for (const task of tasks) {
      if (live) tracked.add(task.id);
      apply(task, 0, undefined, true);
    }
    // Newest first is how the list comes; hand over what is newer than what the subscriber has.
    for (const task of tasks) {
      const entry = entries.get(task.id);
      if (sub.active && entry && wants(sub, entry.task)) deliver(sub, entry.task, entry.mark.seq);
    }
  }

  // -- the connection -------------------------------------------------------------------------

  function backoff(n: number): number {
    const { initialDelayMs, maxDelayMs } = config.reconnect;
    const exp = Math.min(maxDelayMs, initialDelayMs * 2 ** Math.max(0, n - 1));
    return Math.round(exp / 2 + Math.random() * (exp / 2));
  }

  function streamUrl(token: string | undefined, after: string): string {
    const query = filterQuery({ ...(config.feed ?? {}) });
    if (after) query.set("after", after);
    if (token) query.set("access_token", token);
    return joinUrl(config.baseUrl, "/api/tasks/events", query);
  }

  function ensureOpen(): void {
    clearTimeout(lingerTimer);
    lingerTimer = undefined;
    if (subs.size === 0 || es !== undefined || timer !== undefined || opening) return;
    if (state.connection === "failed") return;
    void open();
  }

  async function open(): Promise<void> {
    const ticket = ++tickets;
    opening = ticket;
    const after = cursor;
    let token: string | undefined;
    try {
      token = await resolveToken(config.token);
    } catch (err) {
      if (ticket !== opening) return;
      opening = 0;
      refused(asError(err));
      return;
    }
    if (ticket !== opening || subs.size === 0) {
      if (ticket === opening) opening = 0;
      return;
    }
    opening = 0;
    if (!after) {
      // A stream at "now": nothing before it is known to have been seen.
      epoch += 1;
      tracked.clear();
    }
    setState({ connection: state.connection === "idle" || state.connection === "connecting" ? "connecting" : "reconnecting" });
    const source = config.eventSource(streamUrl(token, after));
    es = source;
    source.addEventListener("open", () => {
      if (es !== source) return;
      failures = 0;
      liveEpoch = epoch;
      setState({ connection: "live", error: null });
      for (const sub of [...subs]) prime(sub);
    });
    source.addEventListener("error", (ev) => {
      if (es !== source) return;
      if (ev instanceof MessageEvent && typeof ev.data === "string") {
        // The gateway's `event: error` before it ends a stream (e.g. task_store went away).
        try {
          const body = JSON.parse(ev.data) as { error?: { code?: string; message?: string } };
          setState({
            error: new SeedApiError(body.error?.message ?? "the stream failed", {
              status: 0,
              code: body.error?.code ?? "UNAVAILABLE",
            }),
          });
        } catch {
          // ignore
        }
        return;
      }
      if (source.readyState === CLOSED) {
        es = undefined;
        if (source.lastEventId) cursor = source.lastEventId;
        void afterRefusal();
      } else {
        setState({ connection: "reconnecting" }); // it resumes by itself (Last-Event-ID)
      }
    });
    for (const name of EVENT_NAMES) source.addEventListener(name, (ev) => es === source && onMessage(ev));
    // The stream's resume point: a feed of many tasks carries it on heartbeats only (an event's own
    // sequence is no safe place to resume a stream of many tasks from).
    source.addEventListener("heartbeat", (ev) => {
      const id = (ev as MessageEvent).lastEventId;
      if (es === source && id) cursor = id;
    });
  }

  /** The EventSource gave up: find out why, then try again later (or fail for good on 4xx). */
  async function afterRefusal(): Promise<void> {
    failures += 1;
    setState({ connection: "reconnecting" });
    const mine = epoch;
    const probe = await probeStream();
    if (subs.size === 0 || es !== undefined || mine !== epoch) return;
    if (probe && !probe.transient) {
      refused(probe);
      return;
    }
    if (probe) setState({ error: probe });
    timer = setTimeout(() => {
      timer = undefined;
      ensureOpen();
    }, backoff(failures));
  }

  /** Asks the stream's URL once, to learn why it was refused (an EventSource never tells). */
  async function probeStream(): Promise<SeedApiError | undefined> {
    const controller = new AbortController();
    try {
      const token = await resolveToken(config.token);
      const headers: Record<string, string> = { Accept: "text/event-stream" };
      if (token) headers["Authorization"] = `Bearer ${token}`;
      const query = filterQuery({ ...(config.feed ?? {}) });
      query.set("after", cursor || "0");
      const response = await config.fetch(joinUrl(config.baseUrl, "/api/tasks/events", query), {
        headers,
        signal: controller.signal,
      });
      if (response.status === 200) return undefined;
      const text = await response.text().catch(() => "");
      try {
        const error = (JSON.parse(text) as { error?: { code?: string; message?: string; reason?: string } }).error;
        return new SeedApiError(error?.message ?? `HTTP ${response.status}`, {
          status: response.status,
          code: error?.code ?? `HTTP_${response.status}`,
          reason: error?.reason,
        });
      } catch {
        return new SeedApiError(`HTTP ${response.status}`, { status: response.status, code: `HTTP_${response.status}` });
      }
    } catch (err) {
      return new SeedApiError(`the gateway did not answer (${String(err)})`, { status: 0, code: "UNAVAILABLE", cause: err });
    } finally {
      controller.abort();
    }
  }

  function refused(error: SeedApiError): void {
    setState({ connection: "failed", error });
    if (config.onError) config.onError(error);
    for (const sub of [...subs]) if (sub.onError) sub.onError(error);
  }

  function closeConnection(): void {
    clearTimeout(timer);
    clearTimeout(lingerTimer);
    timer = undefined;
    lingerTimer = undefined;
    opening = 0;
    es?.close();
    es = undefined;
    cursor = "";
    failures = 0;
    liveEpoch = -1;
    epoch += 1;
    tracked.clear();
    if (state.connection !== "idle") setState({ connection: "idle" });
  }

  function end(sub: Sub): void {
    if (!sub.active) return;
    sub.active = false;
    subs.delete(sub);
    if (subs.size === 0 && lingerTimer === undefined) {
      lingerTimer = setTimeout(() => {
        lingerTimer = undefined;
        if (subs.size === 0) closeConnection();
      }, config.lingerMs);
    }
  }

  function add(sub: Sub): () => void {
    subs.add(sub);
    if (state.connection === "failed") setState({ connection: "idle" }); // a new subscriber tries again
    ensureOpen();
    // Already live: prime on the next tick, so the caller has its unsubscribe first.
    queueMicrotask(() => prime(sub));
    return () => end(sub);
  }

  // -- the public API ---------------------------------------------------------------------------

  function subscribeToTask(
    taskId: string,
    callback: (task: Task) => void,
    options: SubscribeOptions = {},
  ): () => void {
    return add({
      taskId,
      filter: undefined,
      callback: (task) => callback(task),
      onError: options.onError,
      current: true,
      last: new Map(),
      primedEpoch: -1,
      active: true,
    });
  }

  function subscribe(
    filterOrListener: TaskFilter | ((state: TaskStoreState, previous: TaskStoreState) => void),
    callback?: TaskCallback,
    options: FilterSubscribeOptions = {},
  ): () => void {
    if (typeof filterOrListener === "function") {
      const listener = filterOrListener;
      listeners.add(listener);
      return () => {
        listeners.delete(listener);
      };
    }
    if (typeof callback !== "function") throw new TypeError("subscribe(filter, callback): callback must be a function");
    return add({
      taskId: undefined,
      filter: { ...filterOrListener },
      callback,
      onError: options.onError,
      current: options.current ?? false,
      last: new Map(),
      primedEpoch: -1,
      active: true,
    });
  }

  function taskSource(taskId: string): TaskSource {
    const known = sources.get(taskId);
    if (known) return known.source;
    const holder = { users: 0, source: undefined as unknown as TaskSource };
    holder.source = {
      subscribe(onStoreChange) {
        holder.users += 1;
        const stopTask = subscribeToTask(taskId, () => {});
        const stopListen = subscribe((next, previous) => {
          if (next.tasks[taskId] !== previous.tasks[taskId]) onStoreChange();
        });
        return () => {
          stopTask();
          stopListen();
          holder.users -= 1;
          if (holder.users === 0) sources.delete(taskId);
        };
      },
      getSnapshot: () => state.tasks[taskId],
    };
    sources.set(taskId, holder);
    return holder.source;
  }

  return {
    subscribeToTask,
    subscribe: subscribe as TaskStore["subscribe"],
    getState: () => state,
    getInitialState: () => initial,
    getTask: (taskId) => state.tasks[taskId],
    taskSource,
    ingest(tasks) {
      for (const task of Array.isArray(tasks) ? (tasks as readonly Task[]) : [tasks as Task]) {
        apply(task, 0, undefined, true, true); // what the app itself hands in is news for everyone
      }
    },
    forget(taskId) {
      tracked.delete(taskId); // later events are dropped until someone wants the task again
      if (!entries.delete(taskId)) return;
      const { [taskId]: _gone, ...rest } = state.tasks;
      setState({ tasks: rest });
    },
    reconnect() {
      if (es !== undefined) {
        es.close();
        es = undefined;
      }
      clearTimeout(timer);
      timer = undefined;
      if (state.connection === "failed") setState({ connection: subs.size ? "connecting" : "idle", error: null });
      ensureOpen();
    },
    close() {
      for (const sub of [...subs]) sub.active = false;
      subs.clear();
      closeConnection();
    },
  };
}

/** A filter as the list and stream routes' query (`metadata.<k>=v`, `type`, one `status`). */
export function filterQuery(filter: TaskFilter): URLSearchParams {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(filter.metadata ?? {})) query.set(`metadata.${key}`, value);
  if (filter.type) query.set("type", filter.type);
  if (typeof filter.status === "string") query.set("status", filter.status);
  else if (filter.status && filter.status.length === 1 && filter.status[0]) query.set("status", filter.status[0]);
  return query;
}
