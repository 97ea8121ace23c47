// Shared by the tests: where the gateway is, unique names, the gateway's health JSON, and a TCP
// proxy whose connections a test can cut (a real dropped connection, not a simulated one).
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import net from "node:net";

export const baseUrl = process.env.CHARAI_HTTP_URL ?? "";
assert.ok(baseUrl, "set CHARAI_HTTP_URL to the gateway's HTTP URL (gRPC-web port), e.g. http://127.0.0.1:8080");

/** A character id no other test uses. */
export function uniqueCharacter(label) {
  return `char_${label}_${randomUUID().slice(0, 8)}`;
}

/** GET /healthz as JSON (200 or 503). */
export async function health() {
  const response = await fetch(new URL("/healthz", baseUrl));
  return response.json();
}

/** Polls `predicate(health)` until true, or fails after `timeoutMs`. */
export async function waitForHealth(predicate, timeoutMs = 5000) {
  const deadline = Date.now() + timeoutMs;
  let last;
  while (Date.now() < deadline) {
    last = await health();
    if (predicate(last)) return last;
    await new Promise((r) => setTimeout(r, 50));
  }
  assert.fail(`health never matched within ${timeoutMs} ms; last: ${JSON.stringify(last)}`);
}

/** Resolves once `predicate()` is true (polled), or fails after `timeoutMs`. */
export async function until(predicate, timeoutMs, what) {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) assert.fail(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

const UNAVAILABLE_BODY = '{"error":{"code":"UNAVAILABLE","message":"restarting","fieldViolations":[]}}';
const UNAVAILABLE =
  "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n" +
  `Content-Length: ${UNAVAILABLE_BODY.length}\r\n\r\n${UNAVAILABLE_BODY}`;

/**
 * A loopback TCP proxy in front of the gateway. `cut()` destroys every open connection at once
 * (both sides), like a network drop; new connections keep working. `mode` plays a restarting
 * gateway to new connections: "refuse" (closed at once: a network error), "unavailable" (an HTTP
 * 503, as a gateway answers while what it needs is still starting), "pass" (the default).
 */
export async function startProxy(target = baseUrl) {
  const { hostname, port } = new URL(target);
  const sockets = new Set();
  let connections = 0;
  let mode = "pass";
  const server = net.createServer((client) => {
    connections += 1;
    if (mode === "refuse") {
      client.destroy();
      return;
    }
    if (mode === "unavailable") {
      client.on("error", () => {});
      client.once("data", () => client.end(UNAVAILABLE));
      return;
    }
    const upstream = net.connect(Number(port), hostname);
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on("close", () => sockets.delete(s));
      s.on("error", () => {});
    }
    client.pipe(upstream);
    upstream.pipe(client);
    client.on("close", () => upstream.destroy());
    upstream.on("close", () => client.destroy());
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    get connections() {
      return connections;
    },
    get mode() {
      return mode;
    },
    set mode(value) {
      mode = value;
    },
    cut() {
      for (const s of sockets) s.destroy();
    },
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}
