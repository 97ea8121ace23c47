// The seed's frontend on charai, in a real browser: Debian's Chromium, headless, driven by
// playwright-core; run by tests/e2e/test_seed_frontend.py, which owns the stack and plays the
// app's backend (it mints the access tokens with the tenant key and restarts the stack).
//
//   CHARAI_GATEWAY=http://127.0.0.1:8080 PAGE_PORT=5173 TOKEN=... FOREIGN_TASK=task_... \
//   SCREENSHOT_DIR=test-artifacts node e2e/seed-frontend.mjs
//
// Bundles e2e/seed-frontend/ (esbuild) and serves it from http://127.0.0.1:$PAGE_PORT, an origin
// of its own (the gateway lists it in CHARAI_CORS_ORIGINS). Asks the test for what only the
// backend can do with one JSON line on stdout ({"need": "short-token" | "restart"}) and reads
// the answer as one JSON line on stdin. The last stdout line is {"result": {...}}; exit 1 on failure.
import assert from "node:assert/strict";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import http from "node:http";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const gateway = process.env.CHARAI_GATEWAY;
const pagePort = Number(process.env.PAGE_PORT);
const token = process.env.TOKEN;
const foreignTask = process.env.FOREIGN_TASK;
const screenshots = process.env.SCREENSHOT_DIR ?? ".";
const executablePath = process.env.CHROMIUM ?? "/usr/bin/chromium";
assert.ok(gateway && pagePort && token && foreignTask, "set CHARAI_GATEWAY, PAGE_PORT, TOKEN and FOREIGN_TASK");

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

const result = { pageErrors: [], consoleErrors: [], timings: {} };
const started = Date.now();
const mark = (name) => (result.timings[name] = Date.now() - started);

// -- talking to the test (the backend) ------------------------------------------------------------
const answers = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function ask(need) {
  process.stdout.write(`${JSON.stringify({ need })}\n`);
  const { value, done } = await answers.next();
  assert.ok(!done, `no answer to ${need}`);
  return JSON.parse(value);
}

// -- the page, on its own origin ------------------------------------------------------------------
async function bundle() {
  const out = await mkdtemp(join(tmpdir(), "charai-seed-page-"));
  await build({
    entryPoints: [join(here, "seed-frontend/main.ts")],
    outfile: join(out, "page.js"),
    bundle: true,
    format: "esm",
    target: ["es2022"],
    sourcemap: "inline",
    logLevel: "warning",
  });
  return {
    dir: out,
    files: {
      "/": ["text/html; charset=utf-8", await readFile(join(here, "seed-frontend/index.html"))],
      "/page.js": ["text/javascript; charset=utf-8", await readFile(join(out, "page.js"))],
    },
  };
}

function serve(files) {
  const server = http.createServer((req, res) => {
    const file = files[new URL(req.url, "http://x").pathname];
    if (!file) {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { "Content-Type": file[0], "Cache-Control": "no-store" }).end(file[1]);
  });
  return new Promise((resolve) => server.listen(pagePort, "127.0.0.1", () => resolve(server)));
}

const TERMINAL = ["completed", "failed", "cancelled"];
let context;
let server;
let bundled;

async function main() {
  bundled = await bundle();
  server = await serve(bundled.files);
  const profile = await mkdtemp(join(tmpdir(), "charai-chromium-"));
  bundled.profile = profile;
  context = await chromium.launchPersistentContext(profile, {
    executablePath,
    headless: true,
    args: ARGS,
    viewport: { width: 1100, height: 900 },
  });
  const page = context.pages()[0] ?? (await context.newPage());
  openPage = page;
  // Generous: a waited-for state that never comes fails here, a slow machine does not.
  page.setDefaultTimeout(90_000);
  page.on("pageerror", (err) => result.pageErrors.push(err.message));
  page.on("console", (msg) => msg.type() === "error" && result.consoleErrors.push(msg.text()));
  // What the app's backend handed over when it rendered the page: where the gateway is, and a
  // token for char_001 (never the tenant key).
  await page.addInitScript((config) => (window.__charai = config), { gateway, token });
  await page.goto(`http://127.0.0.1:${pagePort}/`);
  await page.locator("#status").filter({ hasText: "ready" }).waitFor();
  mark("pageReady");

  // (a) gRPC-web create + watch, and the multi-task SSE route, with the scoped token.
  result.created = await page.evaluate(() =>
    window.harness.createAndWatch("李明, a young swordsman, front view [[latency:1]]"),
  );
  mark("created");

  // (b) refused outside the scope; (c) the seed's handlers; the short token expires meanwhile.
  result.refusals = await page.evaluate((id) => window.harness.refusals(id), foreignTask);
  mark("refusals");
  const short = await ask("short-token");
  const expiry = page.evaluate(({ t, e }) => window.harness.expiry(t, e), { t: short.token, e: short.expireTime });
  await page.evaluate(() =>
    Promise.all([
      window.harness.generateImage("a young swordsman in blue robes", "front"),
      window.harness.generateVoice("你好，我是李明。", "tongtong"),
      window.harness.generateImage("a forbidden scene [[content]]", "side"),
      window.harness.generateVoice("[[content]] 不该说的话", "tongtong"),
    ]),
  );
  await page.waitForFunction(() => {
    const c = window.harness.calls;
    return (
      c.updateCharacterView.length >= 1 &&
      c.updateCharacterVoice.length >= 1 &&
      c.toast.filter((t) => t.kind === "error").length >= 2 &&
      c.toast.filter((t) => t.kind === "success").length >= 2
    );
  });
  result.expiry = await expiry;
  result.calls = await page.evaluate(() => window.harness.calls);
  mark("handlers");
  await page.screenshot({ path: join(screenshots, "seed-frontend.png"), fullPage: true });

  // The whole stack stops and starts again on the same data dir while a slow task runs and the
  // page keeps its one EventSource: it resumes by itself (Last-Event-ID) once the gateway is back.
  const survivor = await page.evaluate(() => window.harness.startSurvivor("it survives a restart [[latency:2.5]]"));
  await page.waitForFunction(
    (id) => (window.harness.states[id] ?? []).some((s) => s.status === "running" && s.progress >= 20),
    survivor,
  );
  mark("survivorRunning");
  result.restart = await ask("restart");
  mark("restarted");
  await page.waitForFunction(
    ({ id, terminal }) =>
      (window.harness.states[id] ?? []).some((s) => terminal.includes(s.status)) &&
      window.harness.feed.some((e) => e.taskId === id && terminal.includes(e.status)),
    { id: survivor, terminal: TERMINAL },
  );
  mark("survivorDone");
  result.survivor = await page.evaluate((id) => ({
    id,
    states: window.harness.states[id],
    feed: window.harness.feed.filter((e) => e.taskId === id),
    connection: window.harness.connection(),
    connections: window.harness.connections,
  }), survivor);

  // What the character record saved before the restart still loads (no page cache: first load).
  result.saved = await page.evaluate(() => window.harness.showSaved());
  mark("saved");
  await page.screenshot({ path: join(screenshots, "seed-frontend-after-restart.png"), fullPage: true });
  await page.close();
}

let openPage;
let failed = false;
try {
  await main();
} catch (err) {
  failed = true;
  result.error = String(err?.stack ?? err);
  // What the seed's handlers had done when it failed (the full result is long; this comes first).
  result.atFailure = await openPage
    ?.evaluate(() => ({
      calls: Object.fromEntries(Object.entries(window.harness.calls).map(([k, v]) => [k, v.length])),
      toasts: window.harness.calls.toast,
      connection: window.harness.connection(),
      states: Object.fromEntries(
        Object.entries(window.harness.states).map(([id, s]) => [id, s.map((x) => `${x.status}:${x.progress}`).join(" ")]),
      ),
    }))
    .catch((e) => String(e));
} finally {
  await context?.close().catch(() => {});
  server?.close();
  for (const dir of [bundled?.dir, bundled?.profile]) if (dir) await rm(dir, { recursive: true, force: true }).catch(() => {});
}
process.stdout.write(`${JSON.stringify({ result })}\n`);
process.exit(failed ? 1 : 0);
