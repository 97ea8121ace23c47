// An EventSource for runtimes without one (Node 20, workers): the WHATWG algorithm on fetch.
// Browsers use their own; `@charai/client/seed` picks this one only when `globalThis.EventSource`
// is missing (or when given explicitly).
//
// What it keeps from the standard (https://html.spec.whatwg.org/multipage/server-sent-events.html):
// the parser (fields, comments, CR/LF/CRLF, a leading BOM, `id` without NUL, `retry` digits only),
// dispatch on a blank line (nothing dispatched without data), `Last-Event-ID` on reconnect, the
// `retry:` delay, reconnecting after a network error or the end of the stream, and failing
// (CLOSED, no reconnect) on any status other than 200 or another content type; 204 is a failure too.
// One addition: `lastEventId` is readable on the object (a browser keeps it private), so a
// client that has to start a new EventSource can resume from where this one was.

/** The part of the EventSource constructor the seed layer uses (browsers' and this one fit). */
export interface EventSourceLike extends EventTarget {
  readonly readyState: number;
  readonly url: string;
  close(): void;
  /** Not in browsers: the id the next reconnect would send. */
  readonly lastEventId?: string;
}

export type EventSourceConstructor = new (url: string, init?: { withCredentials?: boolean }) => EventSourceLike;

export interface FetchEventSourceInit {
  withCredentials?: boolean;
  /** Another fetch. */
  fetch?: typeof globalThis.fetch;
  /** Extra request headers (e.g. `Authorization`; a browser's EventSource cannot send any). */
  headers?: Record<string, string>;
}

const CONNECTING = 0;
const OPEN = 1;
const CLOSED = 2;

export class FetchEventSource extends EventTarget implements EventSourceLike {
  static readonly CONNECTING = CONNECTING;
  static readonly OPEN = OPEN;
  static readonly CLOSED = CLOSED;
  readonly CONNECTING = CONNECTING;
  readonly OPEN = OPEN;
  readonly CLOSED = CLOSED;

  readonly url: string;
  readonly withCredentials: boolean;
  onopen: ((this: FetchEventSource, ev: Event) => unknown) | null = null;
  onmessage: ((this: FetchEventSource, ev: MessageEvent) => unknown) | null = null;
  onerror: ((this: FetchEventSource, ev: Event) => unknown) | null = null;

  private state = CONNECTING;
  private lastId = "";
  private retryMs = 3000;
  private controller: AbortController | undefined;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private readonly fetchImpl: typeof globalThis.fetch;
  private readonly headers: Record<string, string>;

  constructor(url: string | URL, init: FetchEventSourceInit = {}) {
    super();
    this.url = String(url);
    this.withCredentials = init.withCredentials ?? false;
    this.fetchImpl = init.fetch ?? globalThis.fetch.bind(globalThis);
    this.headers = init.headers ?? {};
    queueMicrotask(() => void this.connect());
  }

  get readyState(): number {
    return this.state;
  }

  get lastEventId(): string {
    return this.lastId;
  }

  close(): void {
    this.state = CLOSED;
    clearTimeout(this.timer);
    this.controller?.abort();
  }

  private emit(event: Event): void {
    const handler =
      event.type === "open" ? this.onopen : event.type === "error" ? this.onerror : event.type === "message" ? this.onmessage : null;
    if (handler) (handler as (ev: Event) => unknown).call(this, event);
    this.dispatchEvent(event);
  }

  private async connect(): Promise<void> {
    if (this.state === CLOSED) return;
    const controller = new AbortController();
    this.controller = controller;
    const headers: Record<string, string> = { Accept: "text/event-stream", "Cache-Control": "no-store", ...this.headers };
    if (this.lastId) headers["Last-Event-ID"] = this.lastId;
    let response: Response;
    try {
      response = await this.fetchImpl(this.url, {
        headers,
        signal: controller.signal,
        cache: "no-store",
        credentials: this.withCredentials ? "include" : "same-origin",
      });
    } catch {
      this.reconnect(controller);
      return;
    }
    if (this.state === CLOSED || controller.signal.aborted) {
      void response.body?.cancel().catch(() => {});
      return;
    }
    const type = (response.headers.get("content-type") ?? "").split(";")[0]?.trim().toLowerCase();
    if (response.status !== 200 || type !== "text/event-stream" || !response.body) {
      void response.body?.cancel().catch(() => {});
      this.fail();
      return;
    }
    this.state = OPEN;
    this.emit(new Event("open"));
    try {
      await this.read(response.body, controller);
    } catch {
      // a network error mid-stream: reconnect below
    }
    this.reconnect(controller);
  }

  private async read(body: ReadableStream<Uint8Array>, controller: AbortController): Promise<void> {
    const reader = body.getReader();
    const decoder = new TextDecoder("utf-8");
    let buffer = "";
    let first = true;
    let data = "";
    let eventType = "";
    let pendingCr = false;
    const line = (text: string): void => {
      if (text === "") {
        // dispatch
        if (data === "") {
          eventType = "";
          return;
        }
        const payload = data.endsWith("\n") ? data.slice(0, -1) : data;
        const type = eventType || "message";
        data = "";
        eventType = "";
        if (this.state === CLOSED) return;
        this.emit(new MessageEvent(type, { data: payload, lastEventId: this.lastId, origin: originOf(this.url) }));
        return;
      }
      if (text.startsWith(":")) return;
      const colon = text.indexOf(":");
      const field = colon < 0 ? text : text.slice(0, colon);
      let value = colon < 0 ? "" : text.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") eventType = value;
      else if (field === "data") data += `${value}\n`;
      else if (field === "id") {
        if (!value.includes("\0")) this.lastId = value;
      } else if (field === "retry") {
        if (/^\d+$/.test(value)) this.retryMs = Number(value);
      }
    };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done || controller.signal.aborted) break;
        let chunk = decoder.decode(value, { stream: true });
        if (first && chunk) {
          if (chunk.charCodeAt(0) === 0xfeff) chunk = chunk.slice(1);
          first = false;
        }
        buffer += chunk;
        let start = 0;
        for (let i = 0; i < buffer.length; i++) {
          const c = buffer.charCodeAt(i);
          if (c === 10 /* LF */) {
            if (pendingCr && i === start) {
              // the LF of a CRLF split across chunks
              pendingCr = false;
              start = i + 1;
              continue;
            }
            pendingCr = false;
            line(buffer.slice(start, i));
            start = i + 1;
          } else if (c === 13 /* CR */) {
            pendingCr = false;
            line(buffer.slice(start, i));
            if (buffer.charCodeAt(i + 1) === 10) i += 1;
            else if (i + 1 === buffer.length) pendingCr = true;
            start = i + 1;
          } else {
            pendingCr = false;
          }
        }
        buffer = buffer.slice(start);
      }
    } finally {
      reader.releaseLock();
    }
  }

  /** The connection dropped or ended: CONNECTING again after the retry delay. */
  private reconnect(controller: AbortController): void {
    if (this.state === CLOSED || controller.signal.aborted) return;
    this.state = CONNECTING;
    this.emit(new Event("error"));
    if (this.state === CLOSED) return; // an error handler closed it
    this.timer = setTimeout(() => void this.connect(), this.retryMs);
  }

  /** The server refused the stream: CLOSED for good. */
  private fail(): void {
    if (this.state === CLOSED) return;
    this.state = CLOSED;
    this.emit(new Event("error"));
  }
}

function originOf(url: string): string {
  try {
    return new URL(url, (globalThis as { location?: { href: string } }).location?.href).origin;
  } catch {
    return "";
  }
}
