// BatchCreateTasks from the TypeScript client against a running gateway (CHARAI_HTTP_URL): a
// character's sheet (three views and a voice line) in one call, answered in order; one bad item
// refuses the whole batch, naming it `requests[i].…`, and stores nothing. Over gRPC-web
// (`createMany`) and over REST (`@charai/client/seed`: `createMany`, `createCharacterSheet`).
import assert from "node:assert/strict";
import { test } from "node:test";
import { create } from "@bufbuild/protobuf";
import {
  Code,
  ConnectError,
  CreateTaskRequestSchema,
  createCharaiClient,
  errorText,
  fieldViolations,
  TaskStatus,
  TaskType,
  TtsPayloadSchema,
} from "../dist/index.js";
import { createSeedClient, SeedApiError } from "../dist/seed/index.js";
import { baseUrl, uniqueCharacter } from "./helpers.js";

const charai = createCharaiClient({ baseUrl });
const VIEWS = ["front", "side", "back"];

/** Three image views and a voice line of one character, as `createMany` takes them. */
function sheet(characterId, requestId) {
  const rid = (i) => (requestId ? { requestId: `${requestId}-${i}` } : {});
  return [
    ...VIEWS.map((viewType, i) => ({
      image: { characterId, viewType, prompt: `a young swordsman, ${viewType} view`, resolution: "1024x1024", ...rid(i) },
    })),
    { tts: { characterId, text: "Hello, I am Li Ming.", voiceStyle: "tongtong", options: { responseFormat: "mp3" }, ...rid(3) } },
  ];
}

test("createMany: three views and a voice line in one call, answered in order, all completed", async () => {
  const characterId = uniqueCharacter("batch");
  const tasks = await charai.createMany(sheet(characterId));
  assert.equal(tasks.length, 4);
  assert.deepEqual(
    tasks.map((t) => (t.payload.case === "image" ? t.payload.value.viewType : t.payload.case)),
    [...VIEWS, "tts"],
  );
  assert.deepEqual(tasks.map((t) => t.type), [...VIEWS.map(() => TaskType.IMAGE_GENERATION), TaskType.TTS_GENERATION]);
  for (const task of tasks) {
    assert.match(task.id, /^task_[0-9a-f]{32}$/);
    assert.equal(task.status, TaskStatus.QUEUED);
    assert.equal(task.metadata.characterId, characterId);
  }
  assert.equal(new Set(tasks.map((t) => t.id)).size, 4, "four distinct tasks");
  assert.deepEqual(tasks.map((t) => t.payload.value.callback.type), [
    "character_view",
    "character_view",
    "character_view",
    "character_voice",
  ]);
  // The ids are the stored tasks': each one is what it was asked to be.
  for (const [i, task] of tasks.entries()) {
    const stored = await charai.getTask(task.id);
    assert.equal(stored.id, task.id);
    assert.equal(stored.payload.case === "image" ? stored.payload.value.viewType : "tts", [...VIEWS, "tts"][i]);
  }
  assert.deepEqual(
    (await charai.getCharacterTasks(characterId)).map((t) => t.id).sort(),
    tasks.map((t) => t.id).sort(),
  );
  const done = await Promise.all(tasks.map((t) => charai.watchTask(t.id, () => {})));
  assert.deepEqual(done.map((t) => t.status), tasks.map(() => TaskStatus.COMPLETED), JSON.stringify(done.map((t) => t.error)));
});

test("createMany with request ids: a retried batch returns the same tasks; a CreateTaskRequest message is taken as is", async () => {
  const characterId = uniqueCharacter("batch_retry");
  const first = await charai.createMany(sheet(characterId, characterId));
  const again = await charai.createMany(sheet(characterId, characterId));
  assert.deepEqual(again.map((t) => t.id), first.map((t) => t.id));
  assert.equal((await charai.getCharacterTasks(characterId)).length, 4);

  const raw = create(CreateTaskRequestSchema, {
    type: TaskType.TTS_GENERATION,
    payload: { case: "tts", value: create(TtsPayloadSchema, { characterId, text: "Hi.", voiceStyle: "tongtong" }) },
  });
  const [line, view] = await charai.createMany([raw, { image: { characterId, viewType: "front", prompt: "p", resolution: "" } }]);
  assert.equal(line.type, TaskType.TTS_GENERATION);
  assert.equal(view.type, TaskType.IMAGE_GENERATION);
  assert.equal((await charai.getCharacterTasks(characterId)).length, 6);
});

test("createMany: one bad item refuses the whole batch, naming requests[i].…, and creates nothing", async () => {
  const characterId = uniqueCharacter("batch_bad");
  const items = sheet(characterId);
  items[2].image.prompt = "";
  items[3].tts.voiceStyle = "";
  await assert.rejects(charai.createMany(items), (err) => {
    assert.ok(err instanceof ConnectError, String(err));
    assert.equal(err.code, Code.InvalidArgument);
    assert.deepEqual(fieldViolations(err).map((v) => v.field).sort(), ["requests[2].image.prompt", "requests[3].tts.voice_style"]);
    assert.match(errorText(err), /^invalid_argument: requests\[2\]\.image\.prompt: /);
    return true;
  });
  // Refused before sending, named the same way.
  const badPriority = sheet(characterId);
  badPriority[1].image.priority = "urgent";
  await assert.rejects(charai.createMany(badPriority), (err) => {
    assert.equal(err.code, Code.InvalidArgument);
    assert.deepEqual(fieldViolations(err).map((v) => v.field), ["requests[1].priority"]);
    return true;
  });
  await assert.rejects(charai.createMany([]), (err) => {
    assert.equal(err.code, Code.InvalidArgument);
    assert.deepEqual(fieldViolations(err).map((v) => v.field), ["requests"]);
    return true;
  });
  assert.deepEqual(await charai.getCharacterTasks(characterId), [], "nothing was created");
});

test("@charai/client/seed over REST: createCharacterSheet in order; a bad item is a 400 naming requests[i].payload.…", async () => {
  const { characterTasksApi, taskStore } = createSeedClient({ baseUrl });
  const characterId = uniqueCharacter("batch_seed");
  const { views, voice } = await characterTasksApi.createCharacterSheet(characterId, {
    views: VIEWS.map((viewType) => ({ viewType, prompt: `a young swordsman, ${viewType} view` })),
    voice: { text: "Hello, I am Li Ming.", voiceStyle: "tongtong" },
    resolution: "1024x1024",
    characterName: "Li Ming",
    requestId: characterId,
  });
  assert.deepEqual(views.map((t) => t.payload.viewType), VIEWS);
  assert.deepEqual(views.map((t) => t.payload.resolution), VIEWS.map(() => "1024x1024"));
  assert.deepEqual(views.map((t) => t.type), VIEWS.map(() => "image_generation"));
  assert.equal(voice.type, "tts_generation");
  const all = [...views, voice];
  assert.ok(all.every((t) => t.status === "queued" && t.metadata.characterName === "Li Ming"));
  assert.deepEqual(all.map((t) => t.requestId), [0, 1, 2, 3].map((i) => `${characterId}-${i}`));
  assert.equal(new Set(all.map((t) => t.id)).size, 4);
  assert.equal(taskStore.getTask(voice.id).status, "queued", "the created tasks are in the store");

  const items = sheet(characterId);
  items[1].image.prompt = "";
  await assert.rejects(characterTasksApi.createMany(items), (err) => {
    assert.ok(err instanceof SeedApiError, String(err));
    assert.equal(err.status, 400);
    assert.equal(err.code, "INVALID_ARGUMENT");
    assert.deepEqual(err.fieldViolations.map((v) => v.field), ["requests[1].payload.prompt"]);
    return true;
  });
  const listed = await characterTasksApi.getCharacterTasks(characterId);
  assert.deepEqual(listed.map((t) => t.id).sort(), all.map((t) => t.id).sort(), "the refused batch created nothing");
  const again = await characterTasksApi.createMany(sheet(characterId).slice(3));
  assert.equal(again.length, 1);
  assert.equal(again[0].payload.voiceStyle, "tongtong");
  taskStore.close();
});
