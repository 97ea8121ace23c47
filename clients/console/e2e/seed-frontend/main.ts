// The browser side of tests/e2e/test_seed_frontend.py: a page on its own origin (not the
// gateway's) that holds only an access token its "backend" minted for characterId=char_001, and
// talks to the gateway with @charai/client (gRPC-web) and @charai/client/seed (REST + SSE).
// The Node driver (../seed-frontend.mjs) calls the functions on `window.harness`.
import { createCharaiClient, describeError, eventTypeName, resultUrl, statusName } from "@charai/client";
import {
  characterTasksApi,
  configureSeed,
  createSeedClient,
  SeedApiError,
  type Task,
  type TaskEventData,
  taskStore,
} from "@charai/client/seed";
import { calls, character } from "./app";
import { handleGenerateImage, handleGenerateVoice } from "./character-gallery";

declare global {
  interface Window {
    __charai: { gateway: string; token: string };
    harness: typeof harness;
  }
}

const { gateway } = window.__charai;
let token = window.__charai.token;
// The seed app's start-up: where the gateway is and the token its backend handed over.
configureSeed({ baseUrl: gateway, token: () => token });
const charai = createCharaiClient({ baseUrl: gateway, token: () => token });

function until(predicate: () => boolean, timeoutMs: number, what: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  return new Promise((resolve, reject) => {
    const poll = (): void => {
      if (predicate()) resolve();
      else if (Date.now() > deadline) reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`));
      else setTimeout(poll, 20);
    };
    poll();
  });
}

/** A refused call as "code reason" (gRPC-web) or "status code reason" (REST); "ok" when it went through. */
async function refusal(call: () => Promise<unknown>): Promise<string> {
  try {
    await call();
    return "ok";
  } catch (err) {
    if (err instanceof SeedApiError) return `${err.status} ${err.code} ${err.reason ?? ""}`.trim();
    const d = describeError(err);
    return `${d.code} ${d.reason}`.trim();
  }
}

interface Seen {
  taskId: string;
  sequence: number;
  eventType: string;
  status: string;
  progress: number;
}

const seen = (e: TaskEventData): Seen => ({
  taskId: e.taskId,
  sequence: e.sequence,
  eventType: e.eventType,
  status: e.status,
  progress: e.progress,
});

const feed: Seen[] = [];
/** Every change of the shared stream's state, with the error the store saw (if any). */
const connections: string[] = [];
taskStore.subscribe((state, previous) => {
  if (state.connection !== previous.connection || state.error !== previous.error) {
    connections.push(`${state.connection}${state.error ? ` (${state.error.status} ${state.error.code})` : ""}`);
  }
});
const states: Record<string, { status: string; progress: number; stage: string }[]> = {};

function follow(taskId: string): void {
  const mine: { status: string; progress: number; stage: string }[] = (states[taskId] = []);
  taskStore.subscribeToTask(taskId, (t: Task) => mine.push({ status: t.status, progress: t.progress, stage: t.stage }));
}

const harness = {
  calls,
  character,
  feed,
  states,
  connections,
  connection: () => taskStore.getState().connection,

  /** (a) Create over gRPC-web; watch it over gRPC-web and over the multi-task SSE route. */
  async createAndWatch(prompt: string) {
    const sse: Seen[] = [];
    const stop = taskStore.subscribe({ metadata: { characterId: "char_001" } }, (_t, e) => e && sse.push(seen(e)));
    await until(() => taskStore.getState().connection === "live", 10_000, "the SSE stream");
    const task = await charai.submitImageTask({
      characterId: "char_001",
      characterName: "李明",
      viewType: "front",
      prompt,
      resolution: "1024x1024",
    });
    const grpc: Seen[] = [];
    const final = await charai.watchTask(task.id, (e) =>
      grpc.push({
        taskId: e.task?.id ?? "",
        sequence: Number(e.sequence),
        eventType: eventTypeName(e.type),
        status: statusName(e.task!.status),
        progress: e.task!.progress,
      }),
    );
    await until(() => sse.some((e) => e.taskId === task.id && e.status === "completed"), 10_000, "SSE completion");
    stop();
    return {
      taskId: task.id,
      metadata: task.metadata,
      final: statusName(final.status),
      imageUrl: resultUrl(final),
      grpc,
      sse: sse.filter((e) => e.taskId === task.id),
    };
  },

  /** (b) What the char_001 token may not do. */
  async refusals(foreignTaskId: string) {
    const store = await new Promise<string>((resolve) =>
      taskStore.subscribeToTask(foreignTaskId, () => resolve("delivered"), {
        onError: (e) => resolve(`${e.status} ${e.code}`),
      }),
    );
    return {
      grpcGetForeign: await refusal(() => charai.getTask(foreignTaskId)),
      grpcWatchForeign: await refusal(() => charai.watchTask(foreignTaskId, () => {})),
      grpcCancelForeign: await refusal(() => charai.cancelTask(foreignTaskId)),
      restGetForeign: await refusal(() => characterTasksApi.getTask(foreignTaskId)),
      storeForeign: store,
      grpcCreateForeign: await refusal(() =>
        charai.submitImageTask({ characterId: "char_002", viewType: "front", prompt: "not mine", resolution: "1024x1024" }),
      ),
      restCreateForeign: await refusal(() =>
        characterTasksApi.submitImageTask({ characterId: "char_002", viewType: "front", prompt: "no", resolution: "1024x1024" }),
      ),
      grpcListForeign: await refusal(() => charai.getCharacterTasks("char_002")),
      queueStats: await refusal(() => charai.raw.getQueueStats({})),
      createAccessToken: await refusal(() => charai.raw.createAccessToken({ metadata: { characterId: "char_001" } })),
      restCreateAccessToken: await refusal(() =>
        characterTasksApi.createAccessToken({ metadata: { characterId: "char_001" } }),
      ),
    };
  },

  /** (b) A short-lived token: works, then (once its expiry has passed) is refused everywhere. */
  async expiry(shortToken: string, expireTime: string) {
    const grpc = createCharaiClient({ baseUrl: gateway, token: shortToken });
    const seed = createSeedClient({ baseUrl: gateway, token: shortToken });
    const before = {
      grpc: await refusal(() => grpc.getCharacterTasks("char_001", { limit: 1 })),
      rest: await refusal(() => seed.characterTasksApi.getCharacterTasks("char_001")),
    };
    const expiresMs = Date.parse(expireTime);
    await until(() => Date.now() > expiresMs, 60_000, "the token to expire");
    const stop = seed.taskStore.subscribe({ metadata: { characterId: "char_001" } }, () => {});
    await until(() => seed.taskStore.getState().connection === "failed", 10_000, "the SSE stream to be refused");
    const error = seed.taskStore.getState().error;
    stop();
    seed.taskStore.close();
    return {
      before,
      grpc: await refusal(() => grpc.getCharacterTasks("char_001", { limit: 1 })),
      rest: await refusal(() => seed.characterTasksApi.getCharacterTasks("char_001")),
      sse: `${error?.status} ${error?.code} ${error?.reason ?? ""}`.trim(),
    };
  },

  /** (c) The seed's handlers, unchanged, as the gallery's buttons would call them. */
  generateImage(basePrompt: string, viewType: string) {
    character.basePrompt = basePrompt;
    return handleGenerateImage(viewType);
  },
  generateVoice(text: string, voiceStyle: string) {
    return handleGenerateVoice(text, voiceStyle);
  },

  /** Before the restart: the feed of char_001 and a slow task followed with subscribeToTask. */
  async startSurvivor(prompt: string) {
    // Every state the subscription is handed: from an event, or (sequence 0) the created task the
    // store was given by submitImageTask's own answer, which may come before the QUEUED event.
    taskStore.subscribe({ metadata: { characterId: "char_001" } }, (t, e) =>
      feed.push(e ? seen(e) : { taskId: t.id, sequence: 0, eventType: "", status: t.status, progress: t.progress }),
    );
    await until(() => taskStore.getState().connection === "live", 10_000, "the SSE stream");
    const task = await characterTasksApi.submitImageTask({
      characterId: "char_001",
      viewType: "back",
      prompt,
      resolution: "1024x1024",
    });
    follow(task.id);
    return task.id;
  },

  /** After the restart: show what the character record saved; each image must decode. */
  async showSaved() {
    const gallery = document.getElementById("gallery")!;
    const images = calls.updateCharacterView.map(({ viewType, view }) => {
      const img = document.createElement("img");
      img.alt = viewType;
      img.src = view.url;
      img.width = 256;
      img.height = 256;
      gallery.append(img);
      return img;
    });
    const voices = calls.updateCharacterVoice.map(({ voice }) => {
      const audio = document.createElement("audio");
      audio.controls = true;
      audio.preload = "metadata";
      audio.src = voice.url;
      gallery.append(audio);
      return audio;
    });
    const widths = await Promise.all(
      images.map((img) => img.decode().then(() => img.naturalWidth, () => 0)),
    );
    const durations = await Promise.all(
      voices.map(
        (audio) =>
          new Promise<number>((resolve) => {
            if (audio.readyState >= 1) resolve(audio.duration);
            audio.addEventListener("loadedmetadata", () => resolve(audio.duration), { once: true });
            audio.addEventListener("error", () => resolve(0), { once: true });
          }),
      ),
    );
    return { widths, durations };
  },
};

window.harness = harness;
document.getElementById("status")!.textContent = "ready";
