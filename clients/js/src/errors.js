// Error classes: one per thing an app may want to handle differently.
// Every error has `code` (a close code number or an error-code string) and
// `fatal` (true when the SDK has stopped trying).

export class PgRelayError extends Error {
  /**
   * @param {string} message
   * @param {{code?: number|string, fatal?: boolean, cause?: unknown}} [opts]
   */
  constructor(message, opts = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = new.target.name;
    this.code = opts.code ?? null;
    this.fatal = opts.fatal ?? false;
  }
}

/** The relay refused the token (4001/4002, `unauthorized`, 401) and the provider had no other. */
export class AuthError extends PgRelayError {}

/** The relay closed with a code that says "do not come back" (1007, 1009). */
export class ConnectionError extends PgRelayError {}

/** A subscription was refused or ended by the relay (`forbidden`, `too_many_subscriptions`, ...). */
export class SubscriptionError extends PgRelayError {
  /** @param {string} message @param {{code?: string, project?: string, fatal?: boolean}} opts */
  constructor(message, opts) {
    super(message, opts);
    this.project = opts.project ?? null;
  }
}

/**
 * The relay refused a broadcast or a presence change (`too_large`,
 * `rate_limited`, `not_subscribed`, `unavailable`, ...), or an acknowledged
 * broadcast got no answer (`disconnected`, `timeout`): `action` is
 * `broadcast`, `presence` or `presence_leave`; `id` the broadcast's.
 */
export class SignalError extends PgRelayError {
  /** @param {string} message @param {{code?: string, project?: string, action?: string, id?: string|null}} opts */
  constructor(message, opts) {
    super(message, opts);
    this.project = opts.project ?? null;
    this.action = opts.action ?? null;
    this.id = opts.id ?? null;
  }
}

/** A `/v1` request failed. `status` is 0 for a network error. */
export class ApiError extends PgRelayError {
  /**
   * @param {string} message
   * @param {{status: number, code?: string, field?: string|null, retryAfterMs?: number|null, cause?: unknown}} opts
   */
  constructor(message, opts) {
    super(message, { code: opts.code ?? (opts.status === 0 ? "network" : "http_" + opts.status), cause: opts.cause });
    this.status = opts.status;
    this.field = opts.field ?? null;
    this.retryAfterMs = opts.retryAfterMs ?? null;
    this.retryable = isRetryableStatus(opts.status);
  }
}

/**
 * Network errors, 408, 429 and 5xx may succeed later; 400, 401 (after a
 * fresh token), 403, 404, 409, 413 and the rest will not.
 * @param {number} status
 */
export function isRetryableStatus(status) {
  return status === 0 || status === 408 || status === 429 || status >= 500;
}
