// @charai/client/seed against a running gateway (CHARAI_HTTP_URL): the seed's characterTasksApi
// over REST, and the task store over ONE EventSource of GET /api/tasks/events (in Node: the
// package's fetch-based EventSource, which follows the standard's reconnect rules).
import assert from "node:assert/strict";
import { test } from "node:test";
import { createSeedClient, createUseTask, FetchEventSource, SeedApiError } from "../dist/seed/index.js";
import { baseUrl, health, startProxy, uniqueCharacter, until, waitForHealth } from "./helpers.js";

/** Resolves with every state `subscribeToTask` hands over, once the task has ended. */
function follow(store, taskId) {
  const states = [];
  const done = new Promise((resolve) => {
    store.subscribeToTask(taskId, (task) => {
      states.push(task);
      if (["completed", "failed", "cancelled"].includes(task.status)) resolve(states);
    });
  });
  return { states, done };
}

function assertForward(states, what) {
  for (let i = 1; i < states.length; i++) {
    assert.ok(states[i].progress >= states[i - 1].progress, `${what}: progress went back at ${i}`);
    assert.ok(
      Date.parse(states[i].updatedAt) >= Date.parse(states[i - 1].updatedAt),
      `${what}: an older state after a newer one at ${i}`,
    );
  }
  const ends = states.filter((s) => ["completed", "failed", "cancelled"].includes(s.status));
  assert.equal(ends.length, 1, `${what}: ${ends.length} terminal states`);
  assert.equal(ends[0], states.at(-1), `${what}: a state after the end`);
}

/** Every event of an ended task, straight from the single-task SSE route (the ground truth). */
async function eventLog(taskId) {
  const response = await fetch(new URL(`/api/tasks/${taskId}/events?after=1`, baseUrl));
  assert.equal(response.status, 200);
  const blocks = (await response.text()).split("\n\n");
  return blocks
    .map((block) => block.split("\n").find((line) => line.startsWith("data: ")))
    .filter(Boolean)
    .map((line) => JSON.parse(line.slice(6)));
}

test("the seed's characterTasksApi over REST: plain JSON tasks, followed to the end, errors as strings", async () => {
  const { characterTasksApi, taskStore } = createSeedClient({ baseUrl });
  const characterId = uniqueCharacter("seed");
  // The seed's own parameters, nothing more.
  const image = await characterTasksApi.submitImageTask({
    characterId,
    viewType: "front",
    prompt: "a young swordsman, front view [[latency:0.5]]",
    resolution: "1024x1024",
  });
  assert.match(image.id, /^task_[0-9a-f]{32}$/);
  assert.equal(image.status, "queued");
  assert.equal(image.type, "image_generation");
  assert.equal(image.priority, "normal");
  assert.deepEqual(image.payload.callback, { type: "character_view", characterId, viewType: "front" });
  assert.equal(image.metadata.characterId, characterId);
  assert.equal(image.metadata.category, "character_design"); // filled for a character callback
  assert.equal(image.result, null);
  assert.equal(image.error, null);
  const voice = await characterTasksApi.submitTTSTask({
    characterId,
    text: "你好，我是李明。",
    voiceStyle: "tongtong",
    options: { responseFormat: "mp3", speed: 1.1 },
  });
  assert.equal(voice.type, "tts_generation");
  assert.deepEqual(voice.payload.callback, { type: "character_voice", characterId });
  const rejected = await characterTasksApi.submitImageTask({
    characterId,
    viewType: "side",
    prompt: "something the provider refuses [[content]]",
    resolution: "1024x1024",
  });
  // The submitted tasks are in the store at once.
  assert.equal(taskStore.getTask(image.id).status, "queued");

  const [imageStates, voiceStates, rejectedStates] = await Promise.all(
    [image, voice, rejected].map((t) => follow(taskStore, t.id).done),
  );
  assertForward(imageStates, "image");
  assertForward(voiceStates, "voice");
  assertForward(rejectedStates, "rejected");

  const doneImage = imageStates.at(-1);
  assert.equal(doneImage.status, "completed");
  assert.equal(doneImage.progress, 100);
  assert.equal(doneImage.result.prompt, image.payload.prompt);
  assert.equal(doneImage.result.resolution, "1024x1024");
  assert.ok(doneImage.result.generatedAt);
  const png = await fetch(doneImage.result.imageUrl); // signed: no token, no header
  assert.equal(png.status, 200);
  assert.equal(png.headers.get("content-type"), "image/png");
  const doneVoice = voiceStates.at(-1);
  assert.equal(doneVoice.status, "completed");
  assert.ok(doneVoice.result.duration > 0);
  assert.equal((await fetch(doneVoice.result.audioUrl)).headers.get("content-type"), "audio/mpeg");

  // The seed prints `${task.error}`: the message itself, the structure beside it.
  const failed = rejectedStates.at(-1);
  assert.equal(failed.status, "failed");
  assert.equal(typeof failed.error, "string");
  assert.equal(failed.error, failed.errorDetail.message);
  assert.equal(failed.errorDetail.code, "CONTENT_REJECTED");
  assert.match(`图片生成失败: ${failed.error}`, /^图片生成失败: System detected potentially unsafe/);

  // Every subscription ended with its task, so the shared stream is closed.
  await until(() => taskStore.getState().connection === "idle", 2000, "the stream to close");
  await waitForHealth((h) => h.open_watch_streams === 0, 3000);

  const listed = await characterTasksApi.getCharacterTasks(characterId);
  assert.deepEqual(
    listed.map((t) => t.id),
    [rejected.id, voice.id, image.id],
    "newest first",
  );
  const design = await characterTasksApi.getCharacterTasks(characterId, { category: "character_design" });
  assert.equal(design.length, 3);
  assert.equal((await characterTasksApi.getTask(voice.id)).status, "completed");

  await characterTasksApi.deleteTask(rejected.id);
  assert.equal(taskStore.getTask(rejected.id), undefined);
  await assert.rejects(characterTasksApi.getTask(rejected.id), (err) => {
    assert.ok(err instanceof SeedApiError);
    assert.equal(err.status, 404);
    assert.equal(err.code, "NOT_FOUND");
    return true;
  });
  await assert.rejects(
    characterTasksApi.submitImageTask({ characterId, viewType: "front", prompt: "", resolution: "1024x1024" }),
    (err) => {
      assert.equal(err.status, 400);
      assert.equal(err.code, "INVALID_ARGUMENT");
      assert.ok(err.fieldViolations.some((v) => v.field === "payload.prompt"), JSON.stringify(err.fieldViolations));
      return true;
    },
  );
  taskStore.close();
});

test("one EventSource for every subscription, opened lazily and closed when nobody listens; late subscribers get the current state", async () => {
  await waitForHealth((h) => h.open_watch_streams === 0);
  const { characterTasksApi, taskStore } = createSeedClient({ baseUrl });
  const characterId = uniqueCharacter("shared");
  const quick = await characterTasksApi.submitTTSTask({ characterId, text: "quick", voiceStyle: "tongtong" });
  assert.equal(taskStore.getState().connection, "idle");
  assert.equal((await health()).open_watch_streams, 0, "nothing opened before the first subscriber");
  await follow(taskStore, quick.id).done;

  // A task that has already ended: one call with its final state, and the subscription is over.
  const late = [];
  taskStore.subscribeToTask(quick.id, (t) => late.push(t));
  await until(() => late.length === 1, 5000, "the ended task's state");
  assert.equal(late[0].status, "completed");

  const slow = await characterTasksApi.submitImageTask({
    characterId,
    viewType: "back",
    prompt: "a slow one [[latency:2]]",
    resolution: "1024x1024",
  });
  const first = follow(taskStore, slow.id);
  const gallery = [];
  const stopGallery = taskStore.subscribe({ metadata: { characterId } }, (task, event) => gallery.push({ task, event }));
  const other = [];
  const stopOther = taskStore.subscribe({ metadata: { characterId: uniqueCharacter("nobody") } }, (t) => other.push(t));
  await until(() => taskStore.getState().connection === "live", 5000, "the stream to be live");
  await until(() => first.states.some((t) => t.status === "running" && t.progress >= 20), 10_000, "progress");
  assert.equal((await health()).open_watch_streams, 1, "one stream for three subscriptions");

  // A subscriber that comes in the middle starts with the task's current state.
  const second = follow(taskStore, slow.id);
  await until(() => second.states.length > 0, 5000, "the current state");
  assert.equal(second.states[0].status, "running");
  assert.ok(second.states[0].progress >= 20, `current progress ${second.states[0].progress}`);
  assert.equal((await health()).open_watch_streams, 1);

  const [a, b] = await Promise.all([first.done, second.done]);
  assertForward(a, "first");
  assertForward(b, "second");
  assert.equal(a.at(-1).status, "completed");
  assert.ok(gallery.length >= 3 && gallery.every((g) => g.task.id === slow.id));
  assert.equal(gallery.at(-1).event.eventType, "completed");
  assert.deepEqual(other, []);
  // The task subscriptions ended with the task; the stream stays for the two filters.
  assert.equal(taskStore.getState().connection, "live");
  stopGallery();
  stopOther();
  await until(() => taskStore.getState().connection === "idle", 2000, "the stream to close");
  await waitForHealth((h) => h.open_watch_streams === 0, 3000);

  // `current: true`: a gallery in one call (the list once the stream is open, then changes).
  const listed = [];
  const stop = taskStore.subscribe({ metadata: { characterId } }, (t) => listed.push(t), { current: true });
  await until(() => listed.length === 2, 5000, "the character's two tasks");
  assert.deepEqual(new Set(listed.map((t) => t.id)), new Set([quick.id, slow.id]));
  stop();
  taskStore.close();
  await waitForHealth((h) => h.open_watch_streams === 0, 3000);
});

test("the stream resumes after drops and a restarting gateway: every event once, none lost, none twice", async () => {
  const proxy = await startProxy();
  const { characterTasksApi, taskStore } = createSeedClient({
    baseUrl: proxy.url,
    reconnect: { initialDelayMs: 50, maxDelayMs: 200 },
  });
  const direct = createSeedClient({ baseUrl });
  const connections = [];
  taskStore.subscribe((s, prev) => s.connection !== prev.connection && connections.push(s.connection));
  try {
    const characterId = uniqueCharacter("resume");
    const events = [];
    taskStore.subscribe({ metadata: { characterId } }, (task, event) => events.push(event));
    await until(() => taskStore.getState().connection === "live", 5000, "the stream to be live");
    const tasks = await Promise.all(
      ["resume me [[latency:4]]", "and me [[latency:4.5]]"].map((prompt) =>
        direct.characterTasksApi.submitImageTask({ characterId, viewType: "front", prompt, resolution: "1024x1024" }),
      ),
    );
    const followed = tasks.map((t) => follow(taskStore, t.id));
    const progress = () => events.filter((e) => e.eventType === "progress").length;

    // 1. A network drop: the EventSource reconnects by itself with Last-Event-ID.
    await until(() => progress() >= 4, 10_000, "4 progress events");
    proxy.cut();
    // 2. The gateway goes away (connections refused), then answers 503 while it starts: the
    // EventSource gives up (CLOSED), the store finds out why and opens a new one with ?after=.
    await until(() => progress() >= 8, 10_000, "8 progress events");
    const before = proxy.connections;
    proxy.mode = "refuse";
    proxy.cut();
    await until(() => proxy.connections >= before + 2, 10_000, "two refused reconnects");
    proxy.mode = "unavailable";
    await until(() => taskStore.getState().error?.code === "UNAVAILABLE", 10_000, "the 503 to be seen");
    proxy.mode = "pass";

    const finals = await Promise.all(followed.map((f) => f.done));
    for (const [i, states] of finals.entries()) {
      assert.equal(states.at(-1).status, "completed");
      assertForward(states, `task ${i}`);
    }
    await until(() => events.filter((e) => e.eventType === "completed").length === 2, 5000, "both completions");
    assert.ok(connections.includes("reconnecting"), JSON.stringify(connections));

    for (const task of tasks) {
      const log = await eventLog(task.id);
      const seen = events.filter((e) => e.taskId === task.id);
      assert.equal(log[0].eventType, "queued");
      assert.deepEqual(
        seen.map((e) => e.sequence),
        log.map((e) => e.sequence),
        `${task.id}: the store's events differ from the log`,
      );
    }
  } finally {
    taskStore.close();
    direct.taskStore.close();
    await proxy.close();
  }
  await waitForHealth((h) => h.open_watch_streams === 0, 3000);
});

// -- without a gateway: a scripted EventSource and fetch --------------------------------------

class ScriptedEventSource extends EventTarget {
  static all = [];
  readyState = 0;
  constructor(url) {
    super();
    this.url = url;
    ScriptedEventSource.all.push(this);
  }
  open() {
    this.readyState = 1;
    this.dispatchEvent(new Event("open"));
  }
  send(task, sequence, eventType = "progress") {
    const name = ["completed", "failed", "cancelled"].includes(task.status) ? `task:${task.status}` : "task:progress";
    const data = { taskId: task.id, progress: task.progress, status: task.status, sequence, eventType, task };
    this.dispatchEvent(new MessageEvent(name, { data: JSON.stringify(data), lastEventId: String(sequence) }));
  }
  refuse() {
    this.readyState = 2;
    this.dispatchEvent(new Event("error"));
  }
  close() {
    this.readyState = 2;
    this.closed = true;
  }
}

function taskAt(progress, status = "running", second = progress) {
  return {
    id: "task_0123456789abcdef0123456789abcdef",
    type: "image_generation",
    status,
    progress,
    stage: status,
    metadata: { characterId: "char_001" },
    updatedAt: `2030-01-01T00:00:${String(second).padStart(2, "0")}.000001Z`,
    result: status === "completed" ? { imageUrl: "https://media.example/x.png" } : null,
    error: null,
  };
}

test("scripted: replays are dropped, states never go back, a refused stream is diagnosed and resumed with the token", async () => {
  ScriptedEventSource.all = [];
  let token = "tok-1";
  const requests = [];
  const fetchStub = async (url, init) => {
    requests.push({ url: String(url), auth: init?.headers?.Authorization });
    if (String(url).includes("/api/tasks/events")) {
      const body = { error: { code: "UNAUTHENTICATED", message: "expired", reason: "ACCESS_TOKEN_EXPIRED" } };
      return new Response(JSON.stringify(body), { status: 401, headers: { "content-type": "application/json" } });
    }
    return new Response(JSON.stringify(taskAt(30)), { status: 200, headers: { "content-type": "application/json" } });
  };
  const errors = [];
  const { taskStore } = createSeedClient({
    baseUrl: "https://charai.test",
    token: () => token,
    fetch: fetchStub,
    EventSource: ScriptedEventSource,
    onError: (e) => errors.push(e),
  });
  const changes = [];
  taskStore.subscribe((state, previous) => changes.push([state.tasks, previous.tasks]));
  const states = [];
  const id = taskAt(0).id;
  taskStore.subscribeToTask(id, (t) => states.push(`${t.status}:${t.progress}`));
  await until(() => ScriptedEventSource.all.length === 1, 1000, "the EventSource");
  const es = ScriptedEventSource.all[0];
  assert.equal(es.url, "https://charai.test/api/tasks/events?access_token=tok-1");

  es.open();
  await until(() => states.length === 1, 1000, "the fetched state");
  assert.deepEqual(states, ["running:30"]);
  assert.equal(requests[0].url, `https://charai.test/api/tasks/${id}`);
  assert.equal(requests[0].auth, "Bearer tok-1");
  es.send(taskAt(20), 5); // older than the fetched state: not handed over
  es.send(taskAt(40), 7);
  es.send(taskAt(40), 7); // a replay
  es.send(taskAt(35, "running", 35), 6); // an older sequence
  es.send(taskAt(50), 8);
  assert.deepEqual(states, ["running:30", "running:40", "running:50"]);
  assert.equal(taskStore.getState().tasks[id].progress, 50);
  assert.equal(changes.filter(([now, before]) => now !== before).length, 3, "one change per new state");

  // The stream is refused (the token expired): the store asks why, and stops.
  es.refuse();
  await until(() => taskStore.getState().connection === "failed", 1000, "failed");
  assert.equal(taskStore.getState().error.reason, "ACCESS_TOKEN_EXPIRED");
  assert.equal(errors[0].code, "UNAUTHENTICATED");
  assert.equal(ScriptedEventSource.all.length, 1, "no retry loop on a refused token");

  // A fresh token: resume exactly after the last event seen, with the new token.
  token = "tok-2";
  taskStore.reconnect();
  await until(() => ScriptedEventSource.all.length === 2, 1000, "a new EventSource");
  const again = ScriptedEventSource.all[1];
  assert.equal(again.url, "https://charai.test/api/tasks/events?after=8&access_token=tok-2");
  again.open();
  again.send(taskAt(50), 8); // already handled
  again.send(taskAt(100, "completed", 59), 9);
  again.send(taskAt(100, "completed", 59), 10); // after the end: the subscription is over
  assert.deepEqual(states, ["running:30", "running:40", "running:50", "completed:100"]);
  await until(() => again.closed, 1000, "the stream to close with its last subscriber");
  assert.equal(taskStore.getState().connection, "idle");

  // React without React: useSyncExternalStore is the caller's.
  const calls = [];
  const fakeReact = {
    useSyncExternalStore(subscribe, getSnapshot) {
      calls.push(subscribe);
      return getSnapshot();
    },
  };
  const useTask = createUseTask(fakeReact, taskStore);
  assert.equal(useTask(id).status, "completed");
  assert.equal(useTask(id).progress, 100);
  assert.equal(calls[0], calls[1], "a stable subscribe per task id (React would resubscribe otherwise)");
  assert.equal(useTask(undefined), undefined);
  taskStore.close();
});

test("scripted: a task that ended before the app knew of it is followed to its end (events it dropped are fetched)", async () => {
  // The seed's handlers subscribe once submit answers; on a busy page the task's events (up to
  // its end) can come through the shared stream before that answer is read. The store drops them
  // (nobody wanted the task yet), so it must fetch the task for the new subscriber, not hand over
  // the submit answer's older state as if nothing had happened since.
  ScriptedEventSource.all = [];
  const fetched = [];
  const fetchStub = async (url) => {
    fetched.push(String(url));
    return new Response(JSON.stringify(taskAt(100, "failed", 9)), { status: 200, headers: { "content-type": "application/json" } });
  };
  const { taskStore } = createSeedClient({ baseUrl: "https://charai.test", fetch: fetchStub, EventSource: ScriptedEventSource });
  const stopFeed = taskStore.subscribe({ metadata: { characterId: "char_002" } }, () => {}); // keeps the stream open
  await until(() => ScriptedEventSource.all.length === 1, 1000, "the EventSource");
  const es = ScriptedEventSource.all[0];
  es.open();
  const id = taskAt(0).id;
  es.send(taskAt(0, "queued", 1), 1, "created");
  es.send(taskAt(10, "running", 2), 2);
  es.send(taskAt(100, "failed", 9), 3, "failed");
  assert.equal(taskStore.getTask(id), undefined, "nobody wanted the task yet");
  taskStore.ingest(taskAt(0, "queued", 1)); // the submit answer, read late
  const states = [];
  taskStore.subscribeToTask(id, (t) => states.push(`${t.status}:${t.progress}`));
  await until(() => states.includes("failed:100"), 1000, "the task's end");
  assert.deepEqual(states, ["failed:100"]);
  assert.deepEqual(fetched, [`https://charai.test/api/tasks/${id}`]);
  stopFeed();
  taskStore.close();
});

test("scripted: a task retried after its end comes back to life in the store and its feeds", async () => {
  // The store froze a task at its first end: the retry's events (higher sequences) were dropped,
  // and a later subscribeToTask was handed the old failure.
  ScriptedEventSource.all = [];
  const fetchStub = async () =>
    new Response(JSON.stringify(taskAt(100, "failed", 9)), { status: 200, headers: { "content-type": "application/json" } });
  const { taskStore } = createSeedClient({ baseUrl: "https://charai.test", fetch: fetchStub, EventSource: ScriptedEventSource });
  const seen = [];
  const stopFeed = taskStore.subscribe({ metadata: { characterId: "char_001" } }, (t) => seen.push(`${t.status}:${t.progress}`));
  await until(() => ScriptedEventSource.all.length === 1, 1000, "the EventSource");
  const es = ScriptedEventSource.all[0];
  es.open();
  const id = taskAt(0).id;
  es.send(taskAt(10, "running", 2), 2);
  es.send(taskAt(31, "failed", 9), 3, "failed");
  es.send(taskAt(31, "queued", 20), 4, "queued"); // RetryTask
  es.send(taskAt(31, "running", 21), 5);
  es.send(taskAt(31, "running", 5), 5); // a replay: still dropped
  assert.equal(taskStore.getTask(id).status, "running");
  es.send(taskAt(100, "completed", 30), 6, "completed");
  assert.deepEqual(seen, ["running:10", "failed:31", "queued:31", "running:31", "completed:100"]);
  // A fetched state (no sequence) replaces an end only if it is later.
  taskStore.ingest(taskAt(31, "running", 25));
  assert.equal(taskStore.getTask(id).status, "completed");
  stopFeed();
  taskStore.close();
});

test("scripted: the fetch-based EventSource parses as the standard says and reconnects with Last-Event-ID", async () => {
  const encoder = new TextEncoder();
  const requests = [];
  // The first answer arrives in awkward chunks: a BOM, CRLF split across chunks, a lone CR, a
  // comment, `retry:`, a two-line `data`, an `id` alone (a heartbeat with the resume point).
  const first = ["\uFEFFretry: 10\r", "\n: heartbeat\r\nid: 4\r\n\r", "\nid: 5\nevent: task:progress\n", "data: {\"a\":\r", "data: 1}\n\n", "id: 9\n\n", "event: x\ndata: cut"];
  const answers = [
    () => new Response(new ReadableStream({
      start(c) {
        for (const part of first) c.enqueue(encoder.encode(part));
        c.close();
      },
    }), { status: 200, headers: { "content-type": "text/event-stream; charset=utf-8" } }),
    () => new Response(null, { status: 204 }),
  ];
  const es = new FetchEventSource("https://charai.test/api/tasks/events", {
    fetch: async (url, init) => {
      requests.push(init.headers);
      return answers[requests.length - 1]();
    },
  });
  const seen = [];
  es.addEventListener("open", () => seen.push("open"));
  es.addEventListener("task:progress", (e) => seen.push(`progress ${e.data} #${e.lastEventId}`));
  es.addEventListener("x", () => seen.push("an unfinished event was dispatched"));
  es.onerror = () => seen.push(`error ${es.readyState}`);
  await until(() => seen.includes("error 2"), 2000, "the second answer (204) to close it");
  assert.deepEqual(seen, ["open", "progress {\"a\":\n1} #5", "error 0", "error 2"]);
  assert.equal(requests[0]["Last-Event-ID"], undefined);
  assert.equal(requests[1]["Last-Event-ID"], "9", "the heartbeat's id is the resume point");
  assert.equal(es.lastEventId, "9");
  assert.equal(es.readyState, FetchEventSource.CLOSED);
});
