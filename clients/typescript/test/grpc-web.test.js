// The official grpc-web runtime (npm `grpc-web`, the one protoc-gen-grpc-web code uses), in Node
// through xhr2, in text mode (application/grpc-web-text) and binary mode, against the gateway.
// Messages are (de)serialized with @bufbuild/protobuf; the method descriptors are written by hand,
// as protoc-gen-grpc-web would generate them.
import assert from "node:assert/strict";
import { test } from "node:test";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { anyUnpack } from "@bufbuild/protobuf/wkt";
import grpcWeb from "grpc-web";
import XMLHttpRequest from "xhr2";
import {
  BadRequestSchema,
  CreateTaskRequestSchema,
  CreateTaskResponseSchema,
  GetTaskRequestSchema,
  GetTaskResponseSchema,
  StatusSchema,
  TaskEventType,
  TaskStatus,
  TaskType,
  WatchTaskRequestSchema,
  WatchTaskResponseSchema,
} from "../dist/index.js";
import { baseUrl, uniqueCharacter, waitForHealth } from "./helpers.js";

globalThis.XMLHttpRequest = XMLHttpRequest;

/**
 * xhr2 fills `responseText` only when the response ends and fires `readystatechange` once for
 * LOADING, so the runtime would see a stream all at once. Browsers (and the XHR spec) expose the
 * text so far and fire `readystatechange` for every chunk; this subclass does the same, so the
 * runtime decodes the text stream incrementally, chunk by chunk, as it does in a browser.
 */
class StreamingXMLHttpRequest extends XMLHttpRequest {
  _onHttpResponseData(response, data) {
    const result = super._onHttpResponseData(response, data);
    if (this._response === response) {
      this.chunks = (this.chunks ?? 0) + 1;
      this.responseText = Buffer.concat(this._responseParts).toString("latin1");
      this._setReadyState(XMLHttpRequest.LOADING);
    }
    return result;
  }
}
const { GrpcWebClientBase, MethodDescriptor, MethodType, StatusCode } = grpcWeb;
const SERVICE = "charai.tasks.v1.TaskService";

function method(name, type, requestSchema, responseSchema) {
  return new MethodDescriptor(
    `/${SERVICE}/${name}`,
    type,
    Object,
    Object,
    (request) => toBinary(requestSchema, request),
    (bytes) => fromBinary(responseSchema, bytes),
  );
}

const CreateTask = method("CreateTask", MethodType.UNARY, CreateTaskRequestSchema, CreateTaskResponseSchema);
const GetTask = method("GetTask", MethodType.UNARY, GetTaskRequestSchema, GetTaskResponseSchema);
const WatchTask = method("WatchTask", MethodType.SERVER_STREAMING, WatchTaskRequestSchema, WatchTaskResponseSchema);

function imageRequest(characterId, prompt, resolution = "1024x1024") {
  return create(CreateTaskRequestSchema, {
    type: TaskType.IMAGE_GENERATION,
    payload: { case: "image", value: { characterId, prompt, resolution, viewType: "front" } },
  });
}

function unary(client, descriptor, request) {
  return client.unaryCall(`${baseUrl}${descriptor.getName()}`, request, {}, descriptor);
}

/** Every message of a server stream, with the final status and when each message arrived. */
function collect(client, descriptor, request) {
  return new Promise((resolve, reject) => {
    const messages = [];
    const stream = client.serverStreaming(`${baseUrl}${descriptor.getName()}`, request, {}, descriptor);
    stream.on("data", (m) => messages.push({ message: m, at: Date.now() }));
    stream.on("error", (err) => reject(err));
    stream.on("status", (status) => {
      if (status.code === StatusCode.OK) resolve({ messages, status });
    });
  });
}

for (const format of ["text", "binary"]) {
  test(`grpc-web runtime (${format}): unary create and get`, async () => {
    const client = new GrpcWebClientBase({ format });
    const characterId = uniqueCharacter(`grpcweb_${format}`);
    const created = await unary(client, CreateTask, imageRequest(characterId, "unary"));
    assert.equal(created.task.status, TaskStatus.QUEUED);
    assert.equal(created.task.metadata.characterId, characterId);
    const got = await unary(client, GetTask, create(GetTaskRequestSchema, { id: created.task.id }));
    assert.equal(got.task.id, created.task.id);
  });
}

test("grpc-web runtime (text): a stream of many events arrives one by one, then ends", async (t) => {
  globalThis.XMLHttpRequest = StreamingXMLHttpRequest;
  t.after(() => {
    globalThis.XMLHttpRequest = XMLHttpRequest;
  });
  const client = new GrpcWebClientBase({ format: "text" });
  const characterId = uniqueCharacter("grpcweb_stream");
  const { task } = await unary(client, CreateTask, imageRequest(characterId, "many events [[latency:2]]"));
  const { messages, status } = await collect(client, WatchTask, create(WatchTaskRequestSchema, { id: task.id }));
  assert.equal(status.code, StatusCode.OK);
  const events = messages.map((m) => m.message.event).filter((e) => e.type !== TaskEventType.HEARTBEAT);
  const progress = events.filter((e) => e.type === TaskEventType.PROGRESS);
  assert.ok(progress.length >= 5, `only ${progress.length} progress events`);
  assert.equal(events[0].type, TaskEventType.SNAPSHOT);
  assert.equal(events.at(-1).type, TaskEventType.COMPLETED);
  assert.equal(events.at(-1).task.progress, 100);
  for (let i = 1; i < events.length; i++) {
    assert.ok(events[i].sequence > events[i - 1].sequence);
    assert.ok(events[i].task.progress >= events[i - 1].task.progress);
  }
  // Flushed as they happened, not buffered until the end: the task ran for 2 s and its events
  // arrived spread over that time.
  const arrivals = messages.map((m) => m.at);
  assert.ok(arrivals.at(-1) - arrivals[0] >= 1000, `all events arrived within ${arrivals.at(-1) - arrivals[0]} ms`);
  await waitForHealth((h) => h.open_watch_streams === 0, 3000);
});

test("grpc-web runtime (text): INVALID_ARGUMENT carries google.rpc.Status with BadRequest", async () => {
  const client = new GrpcWebClientBase({ format: "text" });
  const characterId = uniqueCharacter("grpcweb_bad");
  const err = await unary(client, CreateTask, imageRequest(characterId, "ok", "7x7")).then(
    () => assert.fail("accepted a bad resolution"),
    (e) => e,
  );
  assert.equal(err.code, StatusCode.INVALID_ARGUMENT);
  assert.match(err.message, /image\.resolution/);
  const raw = err.metadata["grpc-status-details-bin"];
  assert.ok(raw, `no grpc-status-details-bin in ${JSON.stringify(Object.keys(err.metadata))}`);
  const status = fromBinary(StatusSchema, Buffer.from(raw, "base64"));
  assert.equal(status.code, StatusCode.INVALID_ARGUMENT);
  const bad = status.details.map((d) => anyUnpack(d, BadRequestSchema)).find(Boolean);
  assert.ok(bad, "no BadRequest detail");
  assert.deepEqual(
    bad.fieldViolations.map((v) => v.field),
    ["image.resolution"],
  );

  // The same on a stream: an error before the first message (a trailers-only reply).
  const streamErr = await collect(client, WatchTask, create(WatchTaskRequestSchema, { id: "nope" })).then(
    () => assert.fail("watched a malformed id"),
    (e) => e,
  );
  assert.equal(streamErr.code, StatusCode.INVALID_ARGUMENT);
  assert.match(streamErr.message, /must be a task id/);
});
