// @charai/client against a running gateway (CHARAI_HTTP_URL), over connect-web's gRPC-web transport.
import assert from "node:assert/strict";
import { test } from "node:test";
import {
  BadRequestSchema,
  Code,
  ConnectError,
  createCharaiClient,
  errorText,
  fieldViolations,
  resultUrl,
  statusName,
  TaskEventType,
  TaskStatus,
  TaskType,
  toSeedTask,
} from "../dist/index.js";
import { baseUrl, startProxy, uniqueCharacter, until, waitForHealth } from "./helpers.js";

const charai = createCharaiClient({ baseUrl });

function assertIncreasing(events, what) {
  for (let i = 1; i < events.length; i++) {
    assert.ok(events[i].sequence > events[i - 1].sequence, `${what}: sequence not increasing at ${i}`);
    assert.ok(
      events[i].task.progress >= events[i - 1].task.progress,
      `${what}: progress went back from ${events[i - 1].task.progress} to ${events[i].task.progress}`,
    );
  }
}

test("the seed's calls: submit an image and a voice, follow both to the end, list the character", async () => {
  const characterId = uniqueCharacter("ts");
  // Exactly the seed's submitImageTask parameters, plus a category to filter on.
  const image = await charai.submitImageTask({
    characterId,
    viewType: "front",
    prompt: "a young swordsman, front view [[latency:1]]",
    resolution: "1024x1024",
    metadata: { category: "character_design" },
  });
  assert.match(image.id, /^task_[0-9a-f]{32}$/);
  assert.equal(image.status, TaskStatus.QUEUED);
  assert.equal(statusName(image.status), "queued");
  assert.equal(image.type, TaskType.IMAGE_GENERATION);
  assert.equal(image.metadata.characterId, characterId);
  assert.equal(image.payload.case, "image");
  assert.equal(image.payload.value.callback.type, "character_view");
  const voice = await charai.submitTTSTask({
    characterId,
    characterName: "Li Ming",
    // A second at the provider, as the image: its end normally arrives on the watch below.
    text: "Hello, I am Li Ming. [[latency:1]]",
    voiceStyle: "tongtong",
    options: { speed: 1.2, volume: 1, responseFormat: "mp3" },
    // A task with a character callback gets category character_design unless it has its own.
    metadata: { category: "voice_lines" },
  });
  assert.equal(voice.type, TaskType.TTS_GENERATION);
  assert.equal(voice.metadata.characterName, "Li Ming");
  assert.equal(voice.metadata.category, "voice_lines");

  const seen = { [image.id]: [], [voice.id]: [] };
  const [doneImage, doneVoice] = await Promise.all([
    charai.watchTask(image.id, (e) => seen[image.id].push(e)),
    charai.watchTask(voice.id, (e) => seen[voice.id].push(e)),
  ]);
  for (const [done, events] of [
    [doneImage, seen[image.id]],
    [doneVoice, seen[voice.id]],
  ]) {
    assert.equal(done.status, TaskStatus.COMPLETED, JSON.stringify(done.error));
    assert.equal(done.progress, 100);
    assert.equal(events[0].type, TaskEventType.SNAPSHOT);
    // The end arrives live, unless the task had ended before its watch began (a busy machine):
    // then the snapshot shows it completed and is all the watch has to hand out.
    const last = events.at(-1);
    if (last.type === TaskEventType.SNAPSHOT) {
      assert.equal(events.length, 1, "a snapshot is only ever the first event");
      assert.equal(last.task.status, TaskStatus.COMPLETED);
    } else {
      assert.equal(last.type, TaskEventType.COMPLETED);
    }
    assert.ok(!events.some((e) => e.type === TaskEventType.HEARTBEAT), "heartbeats are not passed on");
    assertIncreasing(events, done.id);
  }
  const imageProgress = seen[image.id].filter((e) => e.type === TaskEventType.PROGRESS);
  assert.ok(imageProgress.length >= 2, `only ${imageProgress.length} progress events`);

  // The media URLs are signed: fetched without any header.
  const png = await fetch(resultUrl(doneImage));
  assert.equal(png.status, 200);
  assert.equal(png.headers.get("content-type"), "image/png");
  const bytes = new Uint8Array(await png.arrayBuffer());
  assert.deepEqual([...bytes.slice(1, 4)], [0x50, 0x4e, 0x47]); // "PNG"
  assert.equal(doneImage.result.value.width, 1024);
  const mp3 = await fetch(resultUrl(doneVoice));
  assert.equal(mp3.status, 200);
  assert.equal(mp3.headers.get("content-type"), "audio/mpeg");
  assert.ok(doneVoice.result.value.durationSeconds > 0);

  const all = await charai.getCharacterTasks(characterId);
  assert.deepEqual(
    all.map((t) => t.id),
    [voice.id, image.id],
    "newest first",
  );
  assert.ok(all.every((t) => t.status === TaskStatus.COMPLETED));
  // The voice has a category of its own: the character_design filter leaves it out.
  const design = await charai.getCharacterTasks(characterId, { category: "character_design" });
  assert.deepEqual(
    design.map((t) => t.id),
    [image.id],
  );
  assert.deepEqual(
    (await charai.getCharacterTasks(characterId, { category: "voice_lines" })).map((t) => t.id),
    [voice.id],
  );
  assert.equal((await charai.getTask(voice.id)).status, TaskStatus.COMPLETED);
});

test("a bad request is INVALID_ARGUMENT with a BadRequest detail naming each field; nothing is stored", async () => {
  const characterId = uniqueCharacter("bad");
  await assert.rejects(
    charai.submitImageTask({ characterId, viewType: "front", prompt: "", resolution: "12x12" }),
    (err) => {
      assert.ok(err instanceof ConnectError, String(err));
      assert.equal(err.code, Code.InvalidArgument);
      const details = err.findDetails(BadRequestSchema);
      assert.equal(details.length, 1);
      assert.deepEqual(details[0].fieldViolations.map((v) => v.field).sort(), ["image.prompt", "image.resolution"]);
      assert.deepEqual(
        fieldViolations(err).find((v) => v.field === "image.prompt"),
        { field: "image.prompt", description: "must not be empty" },
      );
      assert.match(errorText(err), /^invalid_argument: image\.prompt: must not be empty; image\.resolution: /);
      return true;
    },
  );
  await assert.rejects(
    charai.submitTTSTask({ characterId, text: "hi", voiceStyle: "tongtong", options: { speed: 9 } }),
    (err) => err.code === Code.InvalidArgument && fieldViolations(err).some((v) => v.field === "tts.speed"),
  );
  assert.deepEqual(await charai.getCharacterTasks(characterId), []);
  const unknown = `task_${"0".repeat(32)}`;
  await assert.rejects(charai.getTask(unknown), (err) => err.code === Code.NotFound);
  // A watch of an unknown task fails at once (NOT_FOUND is not worth reconnecting for).
  await assert.rejects(
    charai.watchTask(unknown, () => {}),
    (err) => err.code === Code.NotFound,
  );
});

test("aborting watches mid-stream closes them on the gateway at once; cancel ends a running task", async () => {
  await waitForHealth((h) => h.open_watch_streams === 0);
  const characterId = uniqueCharacter("abort");
  const task = await charai.submitImageTask({
    characterId,
    viewType: "side",
    prompt: "a slow one [[latency:20]]",
    resolution: "1024x1024",
  });
  const taskWatch = new AbortController();
  const characterWatch = new AbortController();
  const events = [];
  const watching = charai.watchTask(task.id, (e) => events.push(e), { signal: taskWatch.signal });
  const following = charai.watchCharacter(characterId, () => {}, { signal: characterWatch.signal });
  await waitForHealth((h) => h.open_watch_streams === 2);
  await until(() => events.some((e) => e.task.status === TaskStatus.RUNNING), 10_000, "the task to start");

  taskWatch.abort();
  await assert.rejects(watching, { name: "AbortError" });
  characterWatch.abort();
  await following; // a character watch ends quietly when its signal aborts
  await waitForHealth((h) => h.open_watch_streams === 0, 3000);

  const cancelled = await charai.cancelTask(task.id);
  assert.ok([TaskStatus.RUNNING, TaskStatus.CANCELLED].includes(cancelled.status));
  const final = await charai.watchTask(task.id, () => {});
  assert.equal(final.status, TaskStatus.CANCELLED);
  await waitForHealth((h) => h.open_watch_streams === 0, 3000);
});

test("watchTask and watchCharacter resume after dropped connections, losing and repeating nothing", async () => {
  const proxy = await startProxy();
  const flaky = createCharaiClient({ baseUrl: proxy.url, reconnect: { initialDelayMs: 50, maxDelayMs: 200 } });
  try {
    const characterId = uniqueCharacter("resume");
    const reconnects = [];
    const onReconnect = (info) => reconnects.push(info);
    const characterEvents = [];
    const stopCharacter = new AbortController();
    let connected = false;
    const following = flaky.watchCharacter(characterId, (e) => characterEvents.push(e), {
      signal: stopCharacter.signal,
      onReconnect,
      onConnected: () => {
        connected = true;
      },
    });
    // The first message (a heartbeat) proves the server has the watch in place.
    await until(() => connected, 10_000, "the character watch's first heartbeat");

    const task = await charai.submitImageTask({
      characterId,
      viewType: "back",
      prompt: "resume me [[latency:3]]",
      resolution: "1024x1024",
    });
    const direct = [];
    const directDone = charai.watchTask(task.id, (e) => direct.push(e));
    const viaProxy = [];
    const proxyDone = flaky.watchTask(task.id, (e) => viaProxy.push(e), { onReconnect });

    // Cut every connection through the proxy mid-task, twice (unless the task ends first).
    const progressCount = () => viaProxy.filter((e) => e.type === TaskEventType.PROGRESS).length;
    const ended = () => viaProxy.some((e) => e.type === TaskEventType.COMPLETED);
    let cuts = 0;
    for (const after of [2, 4]) {
      await until(() => progressCount() >= after || ended(), 15_000, `${after} progress events`);
      if (ended()) break;
      proxy.cut();
      cuts += 1;
    }
    assert.ok(cuts >= 1, "the task ended before the first cut");

    const [finalDirect, finalProxy] = await Promise.all([directDone, proxyDone]);
    assert.equal(finalProxy.status, TaskStatus.COMPLETED);
    assert.equal(finalDirect.status, TaskStatus.COMPLETED);
    // The first cut dropped both streams and both came back; a second one at least the task's.
    assert.ok(reconnects.length >= cuts + 1, `${reconnects.length} reconnects after ${cuts} cuts`);
    assert.ok(proxy.connections >= cuts + 3, `only ${proxy.connections} connections through the proxy`);

    // No repeats: strictly increasing sequences. No loss: every event the direct watcher saw after
    // the proxied watcher's snapshot is there too, and the two end identically.
    assertIncreasing(viaProxy, "via proxy");
    const proxied = new Set(viaProxy.map((e) => e.sequence));
    const missing = direct.filter((e) => e.sequence > viaProxy[0].sequence && !proxied.has(e.sequence));
    assert.deepEqual(missing.map((e) => e.sequence), [], "events lost across the drops");
    assert.equal(viaProxy.at(-1).sequence, direct.at(-1).sequence);

    // The character watch (started before the task existed) saw every event of the task exactly once.
    await until(
      () => characterEvents.some((e) => e.type === TaskEventType.COMPLETED),
      10_000,
      "the character watch to see the task complete",
    );
    stopCharacter.abort();
    await following;
    assert.equal(characterEvents[0].type, TaskEventType.QUEUED);
    assertIncreasing(characterEvents, "character watch");
    const characterSeqs = new Set(characterEvents.map((e) => e.sequence));
    assert.deepEqual(
      direct.filter((e) => !characterSeqs.has(e.sequence)).map((e) => e.sequence),
      [],
      "events lost by the character watch",
    );
  } finally {
    await proxy.close();
  }
  await waitForHealth((h) => h.open_watch_streams === 0, 3000);
});

test("watching a finished task from its last event resolves with the task, without reconnecting", async () => {
  // The gateway answers such a resume with nothing (there is nothing after the cursor): the
  // client took that for a dropped stream and reconnected until it gave up (30 tries, ~2 min).
  const task = await charai.submitTTSTask({ characterId: uniqueCharacter("ts-end"), text: "Done soon.", voiceStyle: "tongtong" });
  const events = [];
  const final = await charai.watchTask(task.id, (e) => events.push(e));
  assert.equal(final.status, TaskStatus.COMPLETED);
  const reconnects = [];
  const again = await charai.watchTask(task.id, () => assert.fail("no event comes after the last"), {
    afterSequence: events.at(-1).sequence,
    onReconnect: (r) => reconnects.push(r),
  });
  assert.equal(again.status, TaskStatus.COMPLETED);
  assert.deepEqual(reconnects, []);
  // From an earlier event: the rest, then the end, as before.
  const rest = [];
  await charai.watchTask(task.id, (e) => rest.push(e), { afterSequence: events.at(-2).sequence });
  assert.deepEqual(rest.map((e) => e.sequence), [events.at(-1).sequence]);
});

test("toSeedTask gives a gRPC-web task the very shape the REST routes answer, webhook and usage included", async () => {
  const characterId = uniqueCharacter("shape");
  const created = await fetch(new URL("/api/tasks", baseUrl), {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({
      type: "tts_generation",
      payload: { characterId, text: `One shape for every door, ${characterId}.`, voiceStyle: "tongtong" },
      // Nobody delivers it here (the stack runs no webhook sender); the task carries it.
      webhook: { url: "http://127.0.0.1:9/hook", events: ["completed"] },
    }),
  });
  const body = await created.json();
  assert.equal(created.status, 201, JSON.stringify(body));
  let task;
  const deadline = Date.now() + 60_000;
  while (!task || statusName(task.status) !== "completed") {
    assert.ok(Date.now() < deadline, `the task did not complete: ${task && statusName(task.status)}`);
    await new Promise((r) => setTimeout(r, 100));
    task = await charai.getTask(body.id);
  }
  const rest = await (await fetch(new URL(`/api/tasks/${body.id}`, baseUrl))).json();
  const mine = toSeedTask(task);
  assert.deepEqual(mine.webhook, { url: "http://127.0.0.1:9/hook", events: ["completed"] });
  assert.equal(mine.usage.calls, 1);
  assert.ok(mine.usage.speechCharacters > 0 && mine.usage.costUsd > 0, JSON.stringify(mine.usage));
  // The whole task, field for field (the REST answer's queue position and ETAs are read at its own time).
  assert.deepEqual(mine, rest);
});
