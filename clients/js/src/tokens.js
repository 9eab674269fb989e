// Tokens: one source for the WebSocket and the HTTP API, so a token
// refreshed for one is used by both.

import { AuthError } from "./errors.js";

/**
 * @typedef {{reason: "connect" | "refresh" | "refused", refused: string|null}} TokenRequest
 * @typedef {string | ((request: TokenRequest) => string | Promise<string>)} TokenProvider
 */

export class TokenSource {
  /** @param {TokenProvider} provider */
  constructor(provider) {
    if (typeof provider === "string") {
      const token = provider;
      provider = () => token;
    }
    if (typeof provider !== "function") {
      throw new TypeError("token must be a string or a function returning one (maybe async)");
    }
    this._provider = provider;
    /** @type {string|null} */
    this._token = null;
    /** @type {Promise<string>|null} */
    this._inflight = null;
  }

  /**
   * The current token; asks the provider when there is none yet or it
   * expires within `minValidMs`.
   */
  async get(minValidMs = 5_000) {
    const exp = this._token ? expiresAt(this._token) : null;
    if (this._token && (exp === null || exp - Date.now() > minValidMs)) return this._token;
    return this.fresh(this._token ? "refresh" : "connect", null);
  }

  /**
   * Asks the provider for a token (concurrent calls share one request).
   * @param {"connect"|"refresh"|"refused"} reason
   * @param {string|null} refused  the token the relay refused, if any
   */
  async fresh(reason, refused) {
    if (!this._inflight) {
      this._inflight = (async () => {
        try {
          const token = await this._provider({ reason, refused });
          if (typeof token !== "string" || token === "") {
            throw new AuthError("the token provider returned no token", { code: "no_token", fatal: true });
          }
          this._token = token;
          return token;
        } finally {
          this._inflight = null;
        }
      })();
    }
    return this._inflight;
  }
}

/**
 * When a JWT expires (its `exp`), in milliseconds since the epoch; `null`
 * when the token is not a JWT with an `exp` the SDK can read.
 * @param {string} token
 */
export function expiresAt(token) {
  try {
    const part = token.split(".")[1];
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(b64)).exp;
    return Number.isFinite(exp) ? exp * 1000 : null;
  } catch {
    return null;
  }
}
