// The watch helpers opt in to several events per stream message (`maxEventsPerMessage`) and unpack
// them: a watcher that fell behind is sent what it missed packed in `events`, and `onEvent` is still
// called once per event, in order, exactly as a client that did not opt in sees them one message
// each. Against a running gateway (CHARAI_HTTP_URL). The streams fall behind by construction: a
// live `watchCharacter` gets 20 tasks created in one `createMany` (one commit, one burst), then
// `watchCharacter` and `watchTask` resume (`afterSequence`) once all their events are in the log.
import assert from "node:assert/strict";
import { test } from "node:test";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { createCharaiClient, TaskEventType, TaskStatus } from "../dist/index.js";
import { baseUrl, uniqueCharacter, until, waitForHealth } from "./helpers.js";

const charai = createCharaiClient({ baseUrl });
const COUNT = 20;

/**
 * A client whose transport records, per watch call, the request's `maxEventsPerMessage` and the
 * events of each stream message as they reach the helper (`packed`: they came in `events`).
 */
function recordingClient() {
  const calls = [];
  const record = (next) => async (req) => {
    if (!req.stream) return next(req);
    const call = { method: req.method.name, maxEventsPerMessage: undefined, messages: [] };
    calls.push(call);
    const input = req.message;
    const res = await next({
      ...req,
      message: (async function* () {
        for await (const m of input) {
          call.maxEventsPerMessage = m.maxEventsPerMessage;
          yield m;
        }
      })(),
    });
    const output = res.message;
    return {
      ...res,
      message: (async function* () {
        for await (const m of output) {
          const packed = m.events.length > 0;
          call.messages.push({ packed, events: (packed ? m.events : [m.event]).map(key) });
          yield m;
        }
      })(),
    };
  };
  const client = createCharaiClient({ baseUrl, transport: createGrpcWebTransport({ baseUrl, interceptors: [record] }) });
  return { client, calls };
}

/** What identifies an event in the comparisons. */
function key(e) {
  return { sequence: e.sequence, type: e.type, taskId: e.task?.id ?? "" };
}

/** The replay of a raw stream that did not opt in: one event per message in `event`, up to the first heartbeat or the end. */
async function oldClientReplay(stream) {
  const events = [];
  for await (const m of stream) {
    assert.equal(m.events.length, 0, "a client that did not opt in never gets `events`");
    assert.ok(m.event !== undefined);
    if (m.event.type === TaskEventType.HEARTBEAT) break;
    events.push(key(m.event));
  }
  return events;
}

/** The character's head: the sequence of a fresh WatchTasks stream's opening heartbeat. */
async function head(characterId) {
  for await (const m of charai.raw.watchTasks({ metadata: { characterId } })) {
    assert.equal(m.event?.type, TaskEventType.HEARTBEAT);
    return m.event.sequence;
  }
  assert.fail("the stream ended before its opening heartbeat");
}

/** Resolves once the character has COUNT tasks, all completed (polled: no watch of the client under test). */
async function allCompleted(characterId, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const tasks = await charai.getCharacterTasks(characterId);
    if (tasks.length === COUNT && tasks.every((t) => t.status === TaskStatus.COMPLETED)) return;
    const failed = tasks.find((t) => t.status === TaskStatus.FAILED);
    assert.equal(failed, undefined, `a task failed: ${JSON.stringify(failed?.error)}`);
    if (Date.now() > deadline) assert.fail(`the ${COUNT} tasks did not all complete within ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

function assertPerTaskIncreasing(events, what) {
  const last = new Map();
  for (const e of events) {
    assert.ok(e.sequence > (last.get(e.taskId) ?? 0n), `${what}: task ${e.taskId} went back at sequence ${e.sequence}`);
    last.set(e.taskId, e.sequence);
  }
}

test("a watcher that fell behind gets events packed per message; watchTask / watchCharacter still hand out each once, in order", async (t) => {
  const characterId = uniqueCharacter("packed");
  const stopLive = new AbortController();
  const stopResumed = new AbortController();
  const stopRest = new AbortController(); // the other watches, should the test fail half-way
  const stopAll = (reason) => {
    for (const c of [stopLive, stopResumed, stopRest]) c.abort(reason);
  };
  // Nothing here may hang: a watch that never sees what it waits for fails the test instead.
  const deadline = setTimeout(() => stopAll(new Error("the test took longer than 45 s")), 45_000);
  t.after(() => {
    clearTimeout(deadline);
    stopAll();
  });
  // The resume point: the log's head before any event of the character. Above 0 (0 would mean
  // "from now on"): on a fresh gateway, a task of another character makes a first event.
  let floor = await head(characterId);
  if (floor === 0n) {
    await charai.submitTTSTask({ characterId: uniqueCharacter("warmup"), text: "Hi.", voiceStyle: "tongtong" });
    floor = await head(characterId);
  }
  assert.ok(floor > 0n);

  // A live character watch, in place before the batch exists (20 QUEUED events in one commit).
  const live = recordingClient();
  const liveEvents = [];
  let connected = false;
  const following = live.client.watchCharacter(characterId, (e) => liveEvents.push(key(e)), {
    signal: stopLive.signal,
    onConnected: () => {
      connected = true;
    },
  });
  await until(() => connected, 10_000, "the live watch's opening heartbeat");
  const tasks = await charai.createMany(
    Array.from({ length: COUNT }, (_, i) => ({
      image: { characterId, viewType: `v${i}`, prompt: `packed ${i}`, resolution: "1024x1024" },
    })),
  );
  await allCompleted(characterId, 30_000);
  const terminal = () => liveEvents.filter((e) => e.type === TaskEventType.COMPLETED).length;
  await until(() => terminal() === COUNT, 15_000, "the live watch to see every task complete");

  // What a client that does not opt in gets when it resumes after `floor`: the whole log, one by one.
  const reference = await oldClientReplay(
    charai.raw.watchTasks({ metadata: { characterId }, afterSequence: floor }, { signal: stopRest.signal }),
  );
  assert.ok(reference.length >= COUNT * 3, `only ${reference.length} events in the log`);
  assert.equal(reference.filter((e) => e.type === TaskEventType.QUEUED).length, COUNT);
  for (let i = 1; i < reference.length; i++) assert.ok(reference[i].sequence > reference[i - 1].sequence);

  // The live watch: every event exactly once, each task's in order (the stream orders per task).
  stopLive.abort();
  await following;
  assertPerTaskIncreasing(liveEvents, "live watchCharacter");
  assert.deepEqual(
    [...liveEvents].sort((a, b) => (a.sequence < b.sequence ? -1 : 1)),
    reference,
    "the live watch saw exactly the log's events",
  );

  // watchCharacter resumed after `floor`: the server packs the replay; onEvent sees the very same
  // events as the old client, in the same order, once each.
  const resumed = recordingClient();
  const resumedEvents = [];
  const resuming = resumed.client.watchCharacter(characterId, (e) => resumedEvents.push(key(e)), {
    signal: stopResumed.signal,
    afterSequence: floor,
  });
  // The heartbeat that follows the replay has reached the helper: the replay is all handed out.
  const replayed = () => resumed.calls[0]?.messages.some((m) => m.events[0].type === TaskEventType.HEARTBEAT);
  await until(replayed, 10_000, "the resumed watch's heartbeat after its replay");
  stopResumed.abort();
  await resuming;
  const [call] = resumed.calls;
  assert.equal(resumed.calls.length, 1, "one connection");
  assert.equal(call.method, "WatchTasks");
  assert.ok(call.maxEventsPerMessage >= 2, `watchCharacter asked for ${call.maxEventsPerMessage} events per message`);
  const packed = call.messages.filter((m) => m.packed);
  assert.ok(packed.length >= 1, "the replay came packed");
  assert.ok(call.messages.length < reference.length, `${call.messages.length} messages for ${reference.length} events`);
  assert.ok(packed.every((m) => m.events.length >= 2 && m.events.every((e) => e.type !== TaskEventType.HEARTBEAT)));
  assert.deepEqual(resumedEvents, reference, "watchCharacter: every event once, in order");

  // watchTask resumed after `floor` on an ended task: what it missed comes packed, and the helper
  // resolves with the final task after handing out each event once, in order.
  const one = recordingClient();
  const oneEvents = [];
  const final = await one.client.watchTask(tasks[0].id, (e) => oneEvents.push(key(e)), {
    afterSequence: floor,
    signal: stopRest.signal,
  });
  assert.equal(final.status, TaskStatus.COMPLETED);
  const oneReference = await oldClientReplay(
    charai.raw.watchTask({ id: tasks[0].id, afterSequence: floor }, { signal: stopRest.signal }),
  );
  assert.ok(oneReference.length >= 3, `only ${oneReference.length} events of one task`);
  assert.deepEqual(oneEvents, oneReference, "watchTask: every event once, in order");
  assert.deepEqual(oneReference, reference.filter((e) => e.taskId === tasks[0].id));
  const [oneCall] = one.calls;
  assert.equal(oneCall.method, "WatchTask");
  assert.ok(oneCall.maxEventsPerMessage >= 2, `watchTask asked for ${oneCall.maxEventsPerMessage} events per message`);
  assert.deepEqual(
    oneCall.messages.map((m) => m.packed),
    [true],
    "the whole missed history in one message",
  );
  const summary = (c) =>
    `${c.messages.length} messages, packed: ${c.messages.filter((m) => m.packed).map((m) => m.events.length).join(",") || "none"}`;
  t.diagnostic(`${reference.length} events; live watchCharacter: ${summary(live.calls[0])}`);
  t.diagnostic(`resumed watchCharacter: ${summary(call)}; resumed watchTask: ${summary(oneCall)}`);
  await waitForHealth((h) => h.open_watch_streams === 0, 3000);
});
