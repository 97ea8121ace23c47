// getUsage from the TypeScript client against a running gateway (CHARAI_HTTP_URL): a voice line
// made through the stack shows up in the caller's usage for today, counted in characters.
import assert from "node:assert/strict";
import { test } from "node:test";
import { createCharaiClient, TaskStatus } from "../dist/index.js";
import { baseUrl, uniqueCharacter } from "./helpers.js";

const charai = createCharaiClient({ baseUrl });

function spoken(response) {
  return response.rows
    .filter((row) => row.model === "glm-tts")
    .reduce((sum, row) => sum + Number(row.speechCharacters), 0);
}

test("getUsage: a completed voice line is metered for today", async () => {
  const today = { startDay: new Date().toISOString().slice(0, 10) };
  const before = spoken(await charai.getUsage(today));
  const characterId = uniqueCharacter("usage");
  const text = `Usage is metered, line ${characterId}.`;
  const task = await charai.submitTTSTask({ characterId, text, voiceStyle: "tongtong" });
  const done = await charai.watchTask(task.id, () => {});
  assert.equal(done.status, TaskStatus.COMPLETED);
  const after = await charai.getUsage(today);
  assert.ok(after.rows.every((row) => row.day >= today.startDay));
  assert.equal(spoken(after) - before >= text.length, true, "the line's characters are counted");
});
