/** Reconnect policy of the watch helpers. */
export interface ReconnectOptions {
  /** First delay before reconnecting, in ms (default 200). */
  initialDelayMs?: number;
  /** Cap of the exponential backoff, in ms (default 5000). */
  maxDelayMs?: number;
  /** Consecutive failed attempts before giving up (default 30; an event received resets the count). */
  maxAttempts?: number;
  /**
   * A stream that delivers nothing (not even a heartbeat) for this long, in ms, is treated as dead
   * and reconnected (default 30000; the gateway sends a heartbeat every few seconds). 0 disables it.
   */
  idleTimeoutMs?: number;
}

export type ResolvedReconnect = Required<ReconnectOptions>;

export function resolveReconnect(options: ReconnectOptions | undefined): ResolvedReconnect {
  return {
    initialDelayMs: options?.initialDelayMs ?? 200,
    maxDelayMs: options?.maxDelayMs ?? 5000,
    maxAttempts: options?.maxAttempts ?? 30,
    idleTimeoutMs: options?.idleTimeoutMs ?? 30_000,
  };
}

/** Exponential backoff with "equal jitter": half fixed, half random, capped. */
export function backoffDelay(failures: number, policy: ResolvedReconnect): number {
  const exp = Math.min(policy.maxDelayMs, policy.initialDelayMs * 2 ** Math.max(0, failures - 1));
  return Math.round(exp / 2 + Math.random() * (exp / 2));
}

/** Resolves after `ms`, or rejects with the signal's reason as soon as it aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/**
 * One connection attempt's abort controller: aborted when the caller's signal aborts, or when the
 * stream stays silent for longer than the idle timeout (`touch()` on every message).
 */
export class Attempt {
  readonly controller = new AbortController();
  idle = false;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private readonly unlink: () => void;

  constructor(
    private readonly outer: AbortSignal | undefined,
    private readonly idleTimeoutMs: number,
  ) {
    const onAbort = (): void => this.controller.abort(outer?.reason);
    if (outer?.aborted) {
      this.controller.abort(outer.reason);
    } else {
      outer?.addEventListener("abort", onAbort, { once: true });
    }
    this.unlink = () => outer?.removeEventListener("abort", onAbort);
    this.touch();
  }

  get signal(): AbortSignal {
    return this.controller.signal;
  }

  touch(): void {
    if (this.idleTimeoutMs <= 0) return;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      this.idle = true;
      this.controller.abort(new Error(`no message for ${this.idleTimeoutMs} ms`));
    }, this.idleTimeoutMs);
  }

  close(): void {
    clearTimeout(this.timer);
    this.unlink();
    if (!this.controller.signal.aborted) this.controller.abort();
  }
}
