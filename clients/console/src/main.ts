// The task console: one character's tasks, live. Calls go over gRPC-web (@charai/client); the
// live feed is @charai/client/seed's task store, one EventSource on GET /api/tasks/events, the
// same layer the seed's React app uses. Same origin as the gateway.
import { createCharaiClient, describeError, toSeedTask } from "@charai/client";
import {
  type ConnectionState,
  createSeedClient,
  type ImageGenerationPayload,
  type ImageGenerationResult,
  isTerminal,
  SeedApiError,
  type Task,
  type TTSGenerationPayload,
  type TTSGenerationResult,
} from "@charai/client/seed";

const $ = <T extends HTMLElement>(id: string): T => {
  const el = document.getElementById(id);
  if (!el) throw new Error(`#${id} is missing from the page`);
  return el as T;
};

const ui = {
  connection: $("connection"),
  characterForm: $<HTMLFormElement>("character-form"),
  characterId: $<HTMLInputElement>("character-id"),
  characterName: $<HTMLInputElement>("character-name"),
  token: $<HTMLInputElement>("token"),
  error: $("error"),
  imageForm: $<HTMLFormElement>("image-form"),
  imagePrompt: $<HTMLTextAreaElement>("image-prompt"),
  imageView: $<HTMLSelectElement>("image-view"),
  imageResolution: $<HTMLSelectElement>("image-resolution"),
  imageCostume: $<HTMLInputElement>("image-costume"),
  imageSubmit: $<HTMLButtonElement>("image-submit"),
  voiceForm: $<HTMLFormElement>("voice-form"),
  voiceText: $<HTMLTextAreaElement>("voice-text"),
  voiceStyle: $<HTMLInputElement>("voice-style"),
  voiceFormat: $<HTMLSelectElement>("voice-format"),
  voiceSpeed: $<HTMLInputElement>("voice-speed"),
  voiceSubmit: $<HTMLButtonElement>("voice-submit"),
  tasks: $<HTMLOListElement>("tasks"),
  webhooks: $<HTMLTableElement>("webhooks"),
  webhooksEmpty: $("webhooks-empty"),
  webhooksNote: $("webhooks-note"),
  webhooksRefresh: $<HTMLButtonElement>("webhooks-refresh"),
  taskCount: $("task-count"),
  empty: $("empty"),
};

ui.token.value = sessionStorage.getItem("charai.token") ?? "";
ui.token.addEventListener("change", () => sessionStorage.setItem("charai.token", ui.token.value));

const token = (): string | undefined => ui.token.value.trim() || undefined;
const charai = createCharaiClient({ baseUrl: window.location.origin, token });
const { taskStore } = createSeedClient({ baseUrl: window.location.origin, token });

// -- small DOM helper ------------------------------------------------------------------------
type Child = Node | string | null | undefined | false;
function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  props: Record<string, string> = {},
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) el.setAttribute(key, value);
  for (const child of children) if (child) el.append(child);
  return el;
}

// -- errors ----------------------------------------------------------------------------------
function clearError(): void {
  ui.error.hidden = true;
  ui.error.replaceChildren();
  for (const el of document.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  for (const el of document.querySelectorAll(".field-error")) el.remove();
}

/** `{code, message, fields}` of a gRPC-web error or a REST one (the feed's). */
function explain(err: unknown): { code: string; message: string; fields: { field: string; description: string }[] } {
  if (err instanceof SeedApiError) return { code: err.code.toLowerCase(), message: err.message, fields: err.fieldViolations };
  return describeError(err);
}

function showError(action: string, err: unknown): void {
  clearError();
  const d = explain(err);
  const title = h("strong", {}, `${action} failed: `);
  const code = h("code", {}, d.code);
  ui.error.append(title, code, " ", d.fields.length ? "" : d.message);
  if (d.fields.length) {
    const list = h("ul");
    for (const f of d.fields) {
      list.append(h("li", {}, h("code", {}, f.field), ` ${f.description}`));
      const input = document.querySelector<HTMLElement>(`[data-field="${CSS.escape(f.field)}"]`);
      if (input) {
        input.setAttribute("aria-invalid", "true");
        input.closest("label")?.append(h("span", { class: "field-error" }, f.description));
      }
    }
    ui.error.append(list);
  }
  ui.error.hidden = false;
}

// -- connection state ------------------------------------------------------------------------
function setConnection(state: "idle" | "connecting" | "live" | "reconnecting", text: string): void {
  ui.connection.className = `pill pill-${state}`;
  ui.connection.textContent = text;
}

const CONNECTION_TEXT: Record<ConnectionState, [state: "idle" | "connecting" | "live" | "reconnecting", text: string]> = {
  idle: ["idle", "not connected"],
  connecting: ["connecting", "connecting…"],
  live: ["live", "live"],
  reconnecting: ["reconnecting", "reconnecting…"],
  failed: ["idle", "disconnected"],
};
taskStore.subscribe((state, previous) => {
  if (state.connection === previous.connection) return;
  setConnection(...CONNECTION_TEXT[state.connection]);
  if (state.connection === "failed" && state.error) showError("Following the tasks", state.error);
});

// -- the task list ---------------------------------------------------------------------------
interface Row {
  task: Task;
  el: HTMLLIElement;
}
const rows = new Map<string, Row>();

function isNewer(candidate: Task, current: Task): boolean {
  if (isTerminal(current) && !isTerminal(candidate)) return false;
  if (isTerminal(candidate) && !isTerminal(current)) return true;
  const a = Date.parse(candidate.updatedAt ?? "") || 0;
  const b = Date.parse(current.updatedAt ?? "") || 0;
  if (a !== b) return a > b;
  return candidate.progress >= current.progress;
}

function upsert(task: Task): void {
  const row = rows.get(task.id);
  if (row && !isNewer(task, row.task)) return;
  if (row) {
    row.task = task;
    render(row);
    return;
  }
  const el = h("li", { class: "task", "data-task-id": task.id });
  const fresh: Row = { task, el };
  rows.set(task.id, fresh);
  render(fresh);
  // Newest first: before the first task created earlier than this one.
  const created = createdMs(task);
  const before = [...rows.values()]
    .filter((r) => r !== fresh && createdMs(r.task) < created && r.el.isConnected)
    .sort((x, y) => createdMs(y.task) - createdMs(x.task))
    .at(0);
  ui.tasks.insertBefore(el, before ? before.el : null);
  updateCount();
}

function createdMs(task: Task): number {
  return Date.parse(task.createdAt ?? "") || Date.now();
}

function updateCount(): void {
  const n = rows.size;
  const running = [...rows.values()].filter((r) => !isTerminal(r.task)).length;
  ui.taskCount.textContent = n ? `${n} task${n === 1 ? "" : "s"}${running ? `, ${running} in progress` : ""}` : "";
  ui.empty.hidden = n > 0;
  if (!n) ui.empty.textContent = current ? "No tasks yet: generate an image or a voice." : "Open a character to see its tasks.";
}

function timeText(task: Task): string {
  return task.createdAt
    ? new Date(task.createdAt).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" })
    : "";
}

/** (Re)draws one task in place; the <img>/<audio> element is kept once made, so playback survives. */
function render(row: Row): void {
  const { task, el } = row;
  const status = task.status;
  const image = task.type === "image_generation" ? (task.payload as ImageGenerationPayload) : undefined;
  const voice = task.type === "tts_generation" ? (task.payload as TTSGenerationPayload) : undefined;
  el.dataset["status"] = status;
  el.className = `task status-${status}`;

  let header = el.querySelector<HTMLElement>(".task-head");
  if (!header) {
    const kind = image ? "Image" : "Voice";
    const detail = image
      ? [image.viewType, image.resolution, image.costumeId].filter(Boolean).join(" · ")
      : voice
        ? [voice.voiceStyle, voice.responseFormat || "wav"].join(" · ")
        : "";
    const text = image ? image.prompt : voice ? voice.text : "";
    header = h(
      "div",
      { class: "task-head" },
      h("span", { class: `kind kind-${kind.toLowerCase()}` }, kind),
      h("span", { class: "detail" }, detail),
      h("span", { class: "badge" }),
      h("time", { class: "muted" }, timeText(task)),
    );
    el.append(
      header,
      h("p", { class: "task-text", title: text }, text),
      h(
        "div",
        { class: "progress", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100", "aria-label": "progress" },
        h("div", { class: "progress-fill" }),
      ),
      h("div", { class: "task-foot" }, h("span", { class: "stage" }), h("code", { class: "task-id muted" }, task.id)),
      h("div", { class: "task-result" }),
    );
  }
  el.querySelector(".badge")!.textContent = status;

  const bar = el.querySelector<HTMLElement>(".progress")!;
  bar.setAttribute("aria-valuenow", String(task.progress));
  el.querySelector<HTMLElement>(".progress-fill")!.style.width = `${task.progress}%`;

  const stage = el.querySelector<HTMLElement>(".stage")!;
  const parts = [`${task.progress}%`, task.stage];
  if (task.status === "queued" && task.queuePosition > 0) parts.push(`#${task.queuePosition} in queue`);
  const eta = task.status === "queued" ? task.estimatedStartAt : task.status === "running" ? task.estimatedEndAt : null;
  if (eta) parts.push(`${task.status === "queued" ? "starts" : "ends"} ${untilText(eta)}`);
  if (task.attempt > 1) parts.push(`attempt ${task.attempt}/${task.maxAttempts}`);
  stage.textContent = parts.filter(Boolean).join(" · ");

  const foot = el.querySelector<HTMLElement>(".task-foot")!;
  let cancel = foot.querySelector<HTMLButtonElement>("button.cancel");
  if (!isTerminal(task)) {
    if (!cancel) {
      cancel = h("button", { class: "cancel danger", type: "button" }, "Cancel");
      cancel.addEventListener("click", () => void cancelTask(task.id, cancel!));
      foot.append(cancel);
    }
  } else {
    cancel?.remove();
  }

  const result = el.querySelector<HTMLElement>(".task-result")!;
  if (image && task.result && !result.querySelector("img")) {
    const r = task.result as ImageGenerationResult;
    const img = h("img", {
      src: r.imageUrl,
      alt: r.prompt,
      width: String(r.width || 1024),
      height: String(r.height || 1024),
      loading: "lazy",
    });
    result.replaceChildren(h("a", { href: r.imageUrl, target: "_blank", rel: "noopener" }, img));
  } else if (voice && task.result && !result.querySelector("audio")) {
    const r = task.result as TTSGenerationResult;
    result.replaceChildren(
      h("audio", { controls: "", preload: "metadata", src: r.audioUrl }),
      h("span", { class: "muted" }, `${(r.duration ?? 0).toFixed(1)} s · ${r.contentType ?? ""}`),
    );
  } else if (task.errorDetail && (task.status === "failed" || task.stage === "waiting_retry")) {
    const retrying = task.status !== "failed";
    result.replaceChildren(
      h(
        "p",
        { class: retrying ? "task-error retrying" : "task-error" },
        h("code", {}, task.errorDetail.code),
        ` ${task.errorDetail.message}`,
        retrying ? " (retrying)" : "",
      ),
    );
  } else if (task.status === "cancelled" && !result.childElementCount) {
    result.replaceChildren(h("p", { class: "muted" }, "Cancelled."));
  }
  updateCount();
}

async function cancelTask(id: string, button: HTMLButtonElement): Promise<void> {
  button.disabled = true;
  button.textContent = "Cancelling…";
  try {
    upsert(toSeedTask(await charai.cancelTask(id)));
  } catch (err) {
    showError("Cancel", err);
    button.disabled = false;
    button.textContent = "Cancel";
  }
}

// -- the open character ------------------------------------------------------------------------
let current: { characterId: string; stop: () => void } | undefined;

function openCharacter(characterId: string, characterName: string): void {
  current?.stop();
  rows.clear();
  ui.tasks.replaceChildren();
  clearError();
  updateCount();
  const url = new URL(window.location.href);
  url.searchParams.set("character", characterId);
  if (characterName) url.searchParams.set("name", characterName);
  else url.searchParams.delete("name");
  window.history.replaceState(null, "", url);
  localStorage.setItem("charai.character", JSON.stringify({ characterId, characterName }));
  document.getElementById("tasks-title")!.textContent = `Tasks of ${characterName || characterId}`;

  // One subscription: the character's tasks as they are (listed once the stream is open), then
  // every change; the store hands each task's states over in order, never an older one.
  const stop = taskStore.subscribe({ metadata: { characterId } }, (task) => upsert(task), {
    current: true,
    onError: (err) => showError("Loading the tasks", err),
  });
  current = { characterId, stop };
  updateCount();
}

function characterName(): string {
  return ui.characterName.value.trim();
}

ui.characterForm.addEventListener("submit", (e) => {
  e.preventDefault();
  openCharacter(ui.characterId.value.trim(), characterName());
});

async function submit(button: HTMLButtonElement, action: string, call: () => Promise<Task>): Promise<void> {
  if (!current) {
    showError(action, new Error("open a character first"));
    return;
  }
  clearError();
  button.disabled = true;
  try {
    upsert(await call());
  } catch (err) {
    showError(action, err);
  } finally {
    button.disabled = false;
  }
}

ui.imageForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const characterId = current?.characterId ?? "";
  void submit(ui.imageSubmit, "Submitting the image", async () =>
    toSeedTask(await charai.submitImageTask({
      characterId,
      characterName: characterName(),
      viewType: ui.imageView.value,
      prompt: ui.imagePrompt.value,
      resolution: ui.imageResolution.value,
      ...(ui.imageCostume.value.trim() ? { costumeId: ui.imageCostume.value.trim() } : {}),
    })),
  );
});

ui.voiceForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const characterId = current?.characterId ?? "";
  const format = ui.voiceFormat.value === "mp3" ? "mp3" : "wav";
  void submit(ui.voiceSubmit, "Submitting the voice", async () =>
    toSeedTask(await charai.submitTTSTask({
      characterId,
      characterName: characterName(),
      text: ui.voiceText.value,
      voiceStyle: ui.voiceStyle.value.trim(),
      options: { responseFormat: format, speed: Number(ui.voiceSpeed.value || "1") },
    })),
  );
});

// -- webhook deliveries (the tenant's newest; a tenant key is needed, not an access token) ----
const DELIVERY_STATUS: Record<number, string> = { 1: "pending", 2: "delivered", 3: "failed" };

function attemptsText(attempts: { httpStatus: number; error: string }[]): string {
  return attempts.map((a) => (a.httpStatus > 0 ? String(a.httpStatus) : a.httpStatus < 0 ? "refused" : "none")).join(", ") || "–";
}

async function loadWebhooks(): Promise<void> {
  let page;
  try {
    page = await charai.raw.listWebhookDeliveries({ pageSize: 20 });
  } catch (err) {
    const d = explain(err);
    ui.webhooksNote.dataset["error"] = "true";
    ui.webhooksNote.textContent = d.code === "permission_denied" ? "needs a tenant API key" : `not available: ${d.message}`;
    return;
  }
  if (ui.webhooksNote.dataset["error"]) {
    delete ui.webhooksNote.dataset["error"];
    ui.webhooksNote.textContent = "";
  }
  const body = ui.webhooks.tBodies[0]!;
  body.replaceChildren();
  for (const d of page.deliveries) {
    const status = DELIVERY_STATUS[d.status] ?? "unknown";
    const last = d.attempts.at(-1);
    const actions = h("td");
    if (status === "failed") {
      const again = h("button", { type: "button", class: "secondary redeliver", "data-delivery-id": d.id }, "Redeliver");
      again.addEventListener("click", () => void redeliver(d.id));
      actions.append(again);
    }
    body.append(
      h(
        "tr",
        { class: `status-${status}`, "data-delivery-id": d.id },
        h("td", {}, d.eventType),
        h("td", {}, h("code", {}, d.taskId.slice(0, 13))),
        h("td", { class: "endpoint", title: d.url }, d.url),
        h("td", {}, h("span", { class: "badge" }, status)),
        h("td", {}, attemptsText(d.attempts), last?.error ? h("div", { class: "attempt-error" }, last.error) : null),
        actions,
      ),
    );
  }
  ui.webhooks.hidden = page.deliveries.length === 0;
  ui.webhooksEmpty.hidden = page.deliveries.length > 0;
}

async function redeliver(deliveryId: string): Promise<void> {
  try {
    const answer = await charai.raw.redeliverWebhook({ deliveryId });
    ui.webhooksNote.textContent = `${answer.redelivered} queued again`;
  } catch (err) {
    showError("Redelivering a webhook", err);
  }
  await loadWebhooks();
}

ui.webhooksRefresh.addEventListener("click", () => void loadWebhooks());
setInterval(() => {
  if (document.visibilityState === "visible") void loadWebhooks();
}, 5000);
void loadWebhooks();

// Start with the character from the URL (?character=...&name=...), else the last one opened.
{
  const params = new URLSearchParams(window.location.search);
  let id = params.get("character") ?? "";
  let name = params.get("name") ?? "";
  if (!id) {
    try {
      const saved = JSON.parse(localStorage.getItem("charai.character") ?? "null") as {
        characterId?: string;
        characterName?: string;
      } | null;
      id = saved?.characterId ?? "";
      name = saved?.characterName ?? "";
    } catch {
      // ignore a corrupt entry
    }
  }
  ui.characterId.value = id || "char_001";
  ui.characterName.value = id ? name : "Li Ming";
  openCharacter(ui.characterId.value, ui.characterName.value);
}

/** "in ~42 s" / "in ~3 min" / "any moment" until an ISO time (estimates are coarse: rounded). */
function untilText(iso: string): string {
  const seconds = Math.round((Date.parse(iso) - Date.now()) / 1000);
  if (!(seconds > 1)) return "any moment";
  if (seconds < 90) return `in ~${seconds} s`;
  return `in ~${Math.round(seconds / 60)} min`;
}
