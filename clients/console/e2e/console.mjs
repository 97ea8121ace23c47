// The console in a real browser: Debian's Chromium, headless, driven by playwright-core.
//
//   CHARAI_HTTP_URL=http://127.0.0.1:8080 SCREENSHOT=test-artifacts/console.png node e2e/console.mjs
//
// Opens the console served by the gateway, submits an image and a voice, watches the progress
// bars climb to 100 % live, checks the image decodes and the audio loads, cancels a running task,
// sees a rejected request explained field by field, reloads (the list comes back; the old page's
// stream is closed on the gateway at once), closes the tab (its stream too), and saves a screenshot. Prints one JSON line of what it saw; exits 1 on any failure.
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const baseUrl = process.env.CHARAI_HTTP_URL;
const screenshot = process.env.SCREENSHOT ?? "console.png";
const executablePath = process.env.CHROMIUM ?? "/usr/bin/chromium";
assert.ok(baseUrl, "set CHARAI_HTTP_URL to the gateway's HTTP URL");

const ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

const characterId = `char_browser_${Math.random().toString(16).slice(2, 10)}`;
const profile = await mkdtemp(join(tmpdir(), "charai-chromium-"));
const seen = { characterId, progress: [], problems: [] };
let context;

async function main() {
  context = await chromium.launchPersistentContext(profile, {
    executablePath,
    headless: true,
    args: ARGS,
    viewport: { width: 1280, height: 900 },
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(20_000);
  page.on("pageerror", (err) => seen.problems.push(`page error: ${err.message}`));
  page.on("console", (msg) => {
    if (msg.type() === "error") seen.problems.push(`console error: ${msg.text()}`);
  });
  page.on("requestfailed", (req) => {
    // An aborted watch (reload, navigation) is expected; anything else is not.
    const failure = req.failure()?.errorText ?? "";
    if (!failure.includes("ERR_ABORTED")) seen.problems.push(`request failed: ${req.url()} ${failure}`);
  });

  await page.goto(`${baseUrl}/?character=${characterId}&name=${encodeURIComponent("Li Ming")}`);
  await page.locator("#tasks-title").filter({ hasText: "Tasks of Li Ming" }).waitFor();
  await page.locator("#empty").filter({ hasText: "No tasks yet" }).waitFor();

  // Record every progress value each task's bar shows, as the page updates it.
  await page.evaluate(() => {
    window.__progress = {};
    new MutationObserver((mutations) => {
      for (const m of mutations) {
        const bar = m.target;
        if (!(bar instanceof HTMLElement) || bar.getAttribute("role") !== "progressbar") continue;
        const id = bar.closest("[data-task-id]")?.dataset.taskId;
        (window.__progress[id] ??= []).push(Number(bar.getAttribute("aria-valuenow")));
      }
    }).observe(document.getElementById("tasks"), {
      subtree: true,
      attributes: true,
      attributeFilter: ["aria-valuenow"],
    });
  });

  // 1. An image, with enough provider latency to see the bar move.
  await page.fill("#image-prompt", "A young swordsman in blue robes, front view, soft light [[latency:1.5]]");
  await page.selectOption("#image-view", "front");
  await page.selectOption("#image-resolution", "1024x1024");
  await page.click("#image-submit");
  const image = page.locator("li.task").filter({ has: page.locator(".kind-image") }).first();
  await image.waitFor();
  const imageId = await image.getAttribute("data-task-id");
  assert.match(imageId, /^task_[0-9a-f]{32}$/);

  // 2. A voice, while the image runs.
  await page.fill("#voice-text", "Hello, I am Li Ming. The mountains are quiet tonight.");
  await page.click("#voice-submit");
  const voice = page.locator("li.task").filter({ has: page.locator(".kind-voice") }).first();
  await voice.waitFor();

  // The image's bar reaches 100 % and the image decodes.
  await image.locator('.progress[aria-valuenow="100"]').waitFor();
  await page.waitForFunction(
    (id) => {
      const img = document.querySelector(`[data-task-id="${id}"] img`);
      return img instanceof HTMLImageElement && img.complete && img.naturalWidth > 0;
    },
    imageId,
  );
  assert.equal(await image.getAttribute("data-status"), "completed");
  seen.imageNaturalWidth = await image.locator("img").evaluate((img) => img.naturalWidth);
  seen.progress = await page.evaluate((id) => window.__progress[id] ?? [], imageId);
  const live = seen.progress.filter((p) => p > 0 && p < 100);
  assert.ok(new Set(live).size >= 3, `the bar did not move live: ${JSON.stringify(seen.progress)}`);
  for (let i = 1; i < seen.progress.length; i++) {
    assert.ok(seen.progress[i] >= seen.progress[i - 1], `progress went back: ${seen.progress}`);
  }
  assert.equal(seen.progress.at(-1), 100);

  // The voice completes and its <audio> loads (metadata: a real duration).
  await voice.locator('.progress[aria-valuenow="100"]').waitFor();
  await voice.locator("audio").waitFor();
  seen.audioDuration = await voice.locator("audio").evaluate(
    (audio) =>
      new Promise((resolve, reject) => {
        if (audio.readyState >= 1) resolve(audio.duration);
        audio.addEventListener("loadedmetadata", () => resolve(audio.duration), { once: true });
        audio.addEventListener("error", () => reject(new Error(`audio error ${audio.error?.code}`)), { once: true });
      }),
  );
  assert.ok(seen.audioDuration > 0, `audio duration ${seen.audioDuration}`);

  // 3. A slow image, cancelled from its card while running.
  await page.fill("#image-prompt", "A paper lantern festival, wide shot [[latency:30]]");
  await page.selectOption("#image-view", "side");
  await page.click("#image-submit");
  const slow = page.locator("li.task").filter({ hasText: "paper lantern" });
  await slow.locator('[data-status="running"], .badge').first().waitFor();
  await page.waitForFunction(() => document.querySelector('li.task[data-status="running"] button.cancel'));
  await slow.locator("button.cancel").click();
  await page.locator('li.task[data-status="cancelled"]').filter({ hasText: "paper lantern" }).waitFor();
  assert.equal(await slow.locator("button.cancel").count(), 0);

  // 4. A request the gateway rejects: explained, with the field marked.
  await page.fill("#image-prompt", "   ");
  await page.click("#image-submit");
  const banner = page.locator("#error");
  await banner.filter({ hasText: "image.prompt" }).waitFor();
  seen.errorBanner = (await banner.innerText()).replace(/\s+/g, " ").trim();
  assert.match(seen.errorBanner, /invalid_argument/);
  assert.equal(await page.getAttribute("#image-prompt", "aria-invalid"), "true");
  seen.connection = await page.textContent("#connection");

  await page.screenshot({ path: screenshot, fullPage: true });

  // 5. A reload lists the same tasks (ListTasks), newest first.
  await page.reload();
  await page.locator("li.task").nth(2).waitFor();
  const ids = await page.locator("li.task").evaluateAll((els) => els.map((el) => el.dataset.taskId));
  const statuses = await page.locator("li.task").evaluateAll((els) => els.map((el) => el.dataset.status));
  assert.equal(ids.length, 3);
  assert.equal(ids[2], imageId, `newest first: ${ids}`);
  assert.deepEqual(statuses, ["cancelled", "completed", "completed"]);

  // 6. Webhook deliveries: every task here went to the tenant's default endpoint, which refuses
  // connections, so each delivery failed after its one attempt; Redeliver queues one again.
  await page.click("#webhooks-refresh");
  const failedRow = page.locator("#webhooks tr.status-failed").first();
  await failedRow.waitFor();
  seen.webhookRows = await page.locator("#webhooks tbody tr").count();
  seen.webhookAttempts = (await failedRow.locator("td").nth(4).innerText()).trim();
  await failedRow.locator("button.redeliver").click();
  await page.locator("#webhooks-note").filter({ hasText: "1 queued again" }).waitFor();

  // The reload closed the old page's stream on the gateway at once: only the new page's is open.
  await page.locator("#connection.pill-live").waitFor();
  seen.openWatchStreams = await waitForStreams((n) => n === 1);

  // Closing the tab ends it too.
  await page.close();
  seen.openWatchStreamsAfterClose = await waitForStreams((n) => n === 0);
  assert.deepEqual(seen.problems, []);
}

/**
 * Polls the gateway's GET /healthz until `open_watch_streams` satisfies `ok`: a generous 15 s on
 * a busy machine (the gateway notices a closed HTTP/1.1 stream when the socket closes).
 */
async function waitForStreams(ok) {
  const deadline = Date.now() + 15000;
  let n;
  while (Date.now() < deadline) {
    n = (await (await fetch(new URL("/healthz", baseUrl))).json()).open_watch_streams;
    if (ok(n)) return n;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`open_watch_streams stayed at ${n}`);
}

let failed = false;
try {
  await main();
} catch (err) {
  failed = true;
  seen.error = String(err?.stack ?? err);
} finally {
  await context?.close().catch(() => {});
  await rm(profile, { recursive: true, force: true }).catch(() => {});
}
console.log(JSON.stringify(seen));
process.exit(failed ? 1 : 0);
