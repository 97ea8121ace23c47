// The REST side of `@charai/client/seed`: fetch with the token, JSON in and out, errors as
// `SeedApiError` carrying the gateway's `{error: {code, message, reason?, fieldViolations}}`.

/** A token, or a function asked before every request (it may refresh the token). */
export type TokenSource = string | (() => string | null | undefined | Promise<string | null | undefined>);

/** One bad field of a rejected request, named as in the JSON body (`payload.prompt`). */
export interface FieldViolation {
  field: string;
  description: string;
}

/** A refused or failed REST call. `message` is the gateway's message. */
export class SeedApiError extends Error {
  override readonly name = "SeedApiError";
  /** The HTTP status (0: the request never got an answer, e.g. the network is down). */
  readonly status: number;
  /** The gRPC code's name, e.g. "NOT_FOUND", "PERMISSION_DENIED", "UNAUTHENTICATED", "UNAVAILABLE". */
  readonly code: string;
  /** google.rpc.ErrorInfo reason when there is one, e.g. "ACCESS_TOKEN_EXPIRED", "ACCESS_TOKEN_SCOPE". */
  readonly reason: string | undefined;
  readonly fieldViolations: FieldViolation[];

  constructor(
    message: string,
    init: { status: number; code: string; reason?: string | undefined; fieldViolations?: FieldViolation[]; cause?: unknown },
  ) {
    super(message, init.cause === undefined ? undefined : { cause: init.cause });
    this.status = init.status;
    this.code = init.code;
    this.reason = init.reason;
    this.fieldViolations = init.fieldViolations ?? [];
  }

  /** Whether trying again later may work (the gateway is down or restarting, a timeout, a rate limit). */
  get transient(): boolean {
    return this.status === 0 || this.status === 429 || this.status >= 500;
  }
}

const CODE_OF_STATUS: Record<number, string> = {
  400: "INVALID_ARGUMENT",
  401: "UNAUTHENTICATED",
  403: "PERMISSION_DENIED",
  404: "NOT_FOUND",
  409: "ABORTED",
  413: "RESOURCE_EXHAUSTED",
  415: "INVALID_ARGUMENT",
  429: "RESOURCE_EXHAUSTED",
  500: "INTERNAL",
  501: "UNIMPLEMENTED",
  503: "UNAVAILABLE",
  504: "DEADLINE_EXCEEDED",
};

/** How the REST helpers reach the gateway. */
export interface HttpConfig {
  /** The gateway's HTTP URL; "" means the page's own origin (relative URLs). */
  baseUrl: string;
  token: TokenSource | undefined;
  fetch: typeof globalThis.fetch;
  /** Deadline of each request in ms (0: none). */
  timeoutMs: number;
}

export async function resolveToken(token: TokenSource | undefined): Promise<string | undefined> {
  const value = typeof token === "function" ? await token() : token;
  return value ? value : undefined;
}

/** `baseUrl` + `path` (+ query): absolute when a base URL is set, relative otherwise. */
export function joinUrl(baseUrl: string, path: string, query?: URLSearchParams): string {
  const q = query && [...query.keys()].length ? `?${query.toString()}` : "";
  return `${baseUrl.replace(/\/+$/, "")}${path}${q}`;
}

/** Sends one request; resolves with the parsed JSON body (undefined for 204), or throws `SeedApiError`. */
export async function request<T>(
  config: HttpConfig,
  method: string,
  path: string,
  options: { query?: URLSearchParams; body?: unknown; headers?: Record<string, string>; signal?: AbortSignal } = {},
): Promise<{ data: T; headers: Headers }> {
  const headers: Record<string, string> = { Accept: "application/json", ...(options.headers ?? {}) };
  const token = await resolveToken(config.token);
  if (token) headers["Authorization"] = `Bearer ${token}`;
  let body: string | undefined;
  if (options.body !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(options.body);
  }
  const signals = [options.signal, config.timeoutMs > 0 ? AbortSignal.timeout(config.timeoutMs) : undefined].filter(
    (s): s is AbortSignal => s !== undefined,
  );
  const signal = signals.length > 1 ? anySignal(signals) : signals[0];
  let response: Response;
  try {
    response = await config.fetch(joinUrl(config.baseUrl, path, options.query), {
      method,
      headers,
      ...(body !== undefined ? { body } : {}),
      ...(signal ? { signal } : {}),
    });
  } catch (err) {
    if (options.signal?.aborted) throw options.signal.reason;
    const timedOut = err instanceof DOMException && err.name === "TimeoutError";
    throw new SeedApiError(timedOut ? `${method} ${path}: no answer within ${config.timeoutMs} ms` : `${method} ${path}: ${String(err)}`, {
      status: 0,
      code: timedOut ? "DEADLINE_EXCEEDED" : "UNAVAILABLE",
      cause: err,
    });
  }
  if (response.status === 204) return { data: undefined as T, headers: response.headers };
  const text = await response.text();
  let parsed: unknown;
  try {
    parsed = text ? JSON.parse(text) : undefined;
  } catch {
    parsed = undefined;
  }
  if (!response.ok) throw errorFromBody(response.status, parsed, text);
  return { data: parsed as T, headers: response.headers };
}

function errorFromBody(status: number, parsed: unknown, text: string): SeedApiError {
  const error = (parsed as { error?: Record<string, unknown> } | undefined)?.error;
  const code = typeof error?.["code"] === "string" ? error["code"] : (CODE_OF_STATUS[status] ?? `HTTP_${status}`);
  const message =
    typeof error?.["message"] === "string" ? error["message"] : text.trim().slice(0, 200) || `HTTP ${status}`;
  const reason = typeof error?.["reason"] === "string" ? error["reason"] : undefined;
  const violations = Array.isArray(error?.["fieldViolations"])
    ? (error["fieldViolations"] as FieldViolation[]).filter((v) => typeof v?.field === "string")
    : [];
  return new SeedApiError(message, { status, code, reason, fieldViolations: violations });
}

/** AbortSignal.any where it exists (Node 20, current browsers), else a small equivalent. */
function anySignal(signals: AbortSignal[]): AbortSignal {
  const any = (AbortSignal as unknown as { any?: (s: AbortSignal[]) => AbortSignal }).any;
  if (any) return any(signals);
  const controller = new AbortController();
  for (const s of signals) {
    if (s.aborted) {
      controller.abort(s.reason);
      break;
    }
    s.addEventListener("abort", () => controller.abort(s.reason), { once: true });
  }
  return controller.signal;
}
