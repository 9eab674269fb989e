// The chat API under `/v1` (openapi.yaml), with the same tokens as the
// socket. Each call makes one request; a 401 asks the token provider for a
// new token and tries once more. Failures are ApiError with the server's
// status, code and message, and whether a retry may help. Retries are the
// outbox's business, not this file's.

import { ApiError } from "./errors.js";
import { TokenSource } from "./tokens.js";

export class ChatApi {
  /**
   * @param {object} options
   * @param {import("./connection.js").Client} [options.client]  share its token source and derive the base URL from its socket URL
   * @param {string} [options.baseUrl]  e.g. `http://127.0.0.1:8080`; in a browser, defaults to the page's origin
   * @param {import("./tokens.js").TokenProvider | TokenSource} [options.token]  when there is no client
   * @param {typeof fetch} [options.fetch]
   */
  constructor(options) {
    const o = options ?? {};
    this.tokens = o.client?.tokens ?? (o.token instanceof TokenSource ? o.token : new TokenSource(o.token));
    this.baseUrl = String(o.baseUrl ?? httpBase(o.client?.url)).replace(/\/$/, "");
    this._fetch = o.fetch ?? globalThis.fetch.bind(globalThis);
  }

  /** Projects the user belongs to. */
  async projects() {
    return (await this.request("GET", "/v1/projects")).projects;
  }

  /**
   * One page of messages, newest first.
   * @param {string} project
   * @param {{beforeSeq?: number, limit?: number}} [page]
   * @returns {Promise<{messages: object[], has_more: boolean, next_before_seq: number|null}>}
   */
  async messages(project, page = {}) {
    const q = new URLSearchParams();
    if (page.beforeSeq != null) q.set("before_seq", String(page.beforeSeq));
    if (page.limit != null) q.set("limit", String(page.limit));
    const qs = q.toString();
    return this.request("GET", `/v1/projects/${enc(project)}/messages${qs ? "?" + qs : ""}`);
  }

  /**
   * The newest `limit` messages (several pages if needed), oldest first: a
   * `load` for `client.collection`.
   * @param {string} project
   * @param {number} [limit]
   */
  async recentMessages(project, limit = 200) {
    const out = [];
    let beforeSeq;
    while (out.length < limit) {
      const page = await this.messages(project, { beforeSeq, limit: Math.min(200, limit - out.length) });
      out.push(...page.messages);
      if (!page.has_more) break;
      beforeSeq = page.next_before_seq;
    }
    return out.reverse();
  }

  /** Sends a message; the same `clientGeneratedId` again returns the first one and writes nothing. */
  async send(project, body, clientGeneratedId) {
    return this.request("POST", `/v1/projects/${enc(project)}/messages`, { body, client_generated_id: clientGeneratedId });
  }

  /** Edits a message, if it is still at `version` (else 409 `version_conflict`). */
  async edit(messageId, body, version) {
    return this.request("PATCH", `/v1/messages/${enc(messageId)}`, { body, version });
  }

  /** Deletes a message (a tombstone stays), if it is still at `version` when given. */
  async delete(messageId, version) {
    const q = version == null ? "" : `?version=${enc(version)}`;
    return this.request("DELETE", `/v1/messages/${enc(messageId)}${q}`);
  }

  /** Marks others' messages up to `upToSeq` (a message seq) as delivered to this user. */
  async markDelivered(project, upToSeq) {
    return this.request("POST", `/v1/projects/${enc(project)}/delivered`, { up_to_seq: upToSeq });
  }

  /** Marks others' messages up to `upToSeq` as read by this user. */
  async markRead(project, upToSeq) {
    return this.request("POST", `/v1/projects/${enc(project)}/read`, { up_to_seq: upToSeq });
  }

  /** Messages from others after this user's read mark. */
  async unread(project) {
    return (await this.request("GET", `/v1/projects/${enc(project)}/unread`)).unread;
  }

  /**
   * One request with the current token; one more with a fresh token after
   * a 401. Resolves with the JSON body, rejects with ApiError.
   */
  async request(method, path, body) {
    let token = await this.tokens.get();
    let res = await this._once(method, path, body, token);
    if (res.status === 401) {
      const fresh = await this.tokens.fresh("refused", token).catch(() => token);
      if (fresh !== token) {
        token = fresh;
        res = await this._once(method, path, body, token);
      }
    }
    let json = null;
    try {
      json = await res.json();
    } catch {
      /* a proxy's HTML error page, say */
    }
    if (res.ok) return json;
    const e = json?.error ?? {};
    throw new ApiError(e.message ?? `${method} ${path}: HTTP ${res.status}`, {
      status: res.status,
      code: e.code,
      field: e.field,
      retryAfterMs: retryAfter(res.headers.get("retry-after")),
    });
  }

  async _once(method, path, body, token) {
    try {
      return await this._fetch(this.baseUrl + path, {
        method,
        headers: { authorization: `Bearer ${token}`, ...(body === undefined ? {} : { "content-type": "application/json" }) },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (err) {
      throw new ApiError(`${method} ${path}: network error (${err?.message ?? err})`, { status: 0, cause: err });
    }
  }
}

function enc(s) {
  return encodeURIComponent(String(s));
}

/** `Retry-After` (seconds or an HTTP date) in ms, or null. */
function retryAfter(value) {
  if (!value) return null;
  const secs = Number(value);
  if (Number.isFinite(secs)) return Math.max(0, secs * 1000);
  const at = Date.parse(value);
  return Number.isFinite(at) ? Math.max(0, at - Date.now()) : null;
}

/** `http(s)://host` from a `ws(s)://host/ws` URL, or the page's origin. */
function httpBase(socketUrl) {
  if (socketUrl) {
    const u = new URL(socketUrl);
    return `${u.protocol === "wss:" ? "https:" : "http:"}//${u.host}`;
  }
  if (globalThis.location) return globalThis.location.origin;
  throw new TypeError("baseUrl is required outside a browser (e.g. http://127.0.0.1:8080)");
}
