// The outbox: writes through the chat API that survive a flaky network, an
// offline period and a page reload, and are never applied twice.
//
// Each send carries a client_generated_id made here, so a retry of a send
// that did reach the database returns the first message and writes
// nothing. Items go out one at a time, in the order they were made.
// Retryable failures (network, 408, 429 honouring Retry-After, 5xx) wait
// with backoff and are tried again, at most `maxAttempts` times; attempts
// made while the device or the relay connection is known to be down do
// not count, the outbox waits for it to be back. Other failures (400,
// 403, 404, 409, 413) stop that item at once with the server's error; the
// items after it still go. The queue is kept in `storage` (localStorage
// in a browser) and picked up again after a reload.

import { backoffDelay, DEFAULT_BACKOFF } from "./backoff.js";
import { Emitter } from "./emitter.js";
import { ApiError } from "./errors.js";

/**
 * @typedef {object} OutboxItem
 * @property {string} id  for a send, its client_generated_id
 * @property {"send"|"edit"|"delete"} op
 * @property {string} [project]
 * @property {string} [body]
 * @property {string} [messageId]
 * @property {number} [version]
 * @property {"pending"|"sent"|"failed"} status
 * @property {number} attempts  attempts that counted
 * @property {{status: number, code: string, message: string}|null} error
 * @property {object|null} message  the server's row once sent
 * @property {number} createdAt
 */

/**
 * Events: `change` (OutboxItem) whenever an item is added or changes
 * status; a sent item is then dropped from the queue.
 */
export class Outbox extends Emitter {
  /**
   * @param {object} options
   * @param {import("./api.js").ChatApi} options.api
   * @param {import("./connection.js").Client} [options.client]  wait for it to be connected after a network failure
   * @param {{getItem(k: string): string|null, setItem(k: string, v: string): void} | null} [options.storage]  default: localStorage when there is one
   * @param {string} [options.storageKey]  default "pgrelay-outbox"; use one per user
   * @param {number} [options.maxAttempts]  default 8
   * @param {{min: number, max: number}} [options.backoff]  default 500 to 20,000 ms
   */
  constructor(options) {
    super();
    const o = options ?? {};
    this.api = o.api;
    this.client = o.client ?? null;
    this.storage = o.storage === undefined ? defaultStorage() : o.storage;
    this.storageKey = o.storageKey ?? "pgrelay-outbox";
    this.maxAttempts = o.maxAttempts ?? 8;
    this.backoff = { ...DEFAULT_BACKOFF, ...o.backoff };
    /** @type {OutboxItem[]} */
    this.items = this._restore();
    this._running = false;
    this._wake = null;
    this._stopped = false;
    const kick = () => this._kick();
    this._offs = [];
    if (this.client) this._offs.push(this.client.on("state", (s) => s === "connected" && kick()));
    if (typeof globalThis.addEventListener === "function") {
      globalThis.addEventListener("online", kick);
      this._offs.push(() => globalThis.removeEventListener("online", kick));
    }
    void this._run();
  }

  /**
   * Queues a message; it shows as pending at once.
   * @param {string} project
   * @param {string} body
   */
  send(project, body) {
    return this._add({ op: "send", id: newId(), project: String(project), body });
  }

  /** Queues an edit of `message` (compare-and-swap on its version). */
  edit(message, body) {
    return this._add({ op: "edit", id: newId(), messageId: message.id, version: message.version, body, project: message.project_id });
  }

  /** Queues a delete of `message` (compare-and-swap on its version). */
  delete(message) {
    return this._add({ op: "delete", id: newId(), messageId: message.id, version: message.version, project: message.project_id });
  }

  /** Items not yet sent (pending or failed) of `project`, oldest first. */
  pending(project) {
    return this.items.filter((i) => project === undefined || i.project === String(project));
  }

  /** Tries a failed item again; it keeps its place in the queue. */
  retry(id) {
    const item = this.items.find((i) => i.id === id && i.status === "failed");
    if (!item) return;
    Object.assign(item, { status: "pending", attempts: 0, error: null });
    this._changed(item);
  }

  /** Gives up an item that has not been sent. */
  discard(id) {
    const item = this.items.find((i) => i.id === id && i.status !== "sent");
    if (!item) return;
    this.items = this.items.filter((i) => i !== item);
    this._save();
  }

  /** Stops sending (items stay stored). */
  stop() {
    this._stopped = true;
    for (const off of this._offs) off();
    this._kick();
  }

  _add(fields) {
    const item = { ...fields, status: "pending", attempts: 0, error: null, message: null, createdAt: Date.now() };
    this.items.push(item);
    this._changed(item);
    return item;
  }

  _changed(item) {
    this._save();
    this.emit("change", item);
    this._kick();
  }

  _kick() {
    const wake = this._wake;
    this._wake = null;
    wake?.();
    if (!this._running) void this._run();
  }

  /** Sleeps until `ms` pass or something kicks the outbox. */
  _sleep(ms) {
    return new Promise((resolve) => {
      const t = ms === Infinity ? null : setTimeout(() => resolve(), ms);
      this._wake = () => {
        clearTimeout(t);
        resolve();
      };
    });
  }

  _online() {
    if (globalThis.navigator?.onLine === false) return false;
    return !this.client || this.client.state === "connected";
  }

  async _run() {
    if (this._running) return;
    this._running = true;
    try {
      for (;;) {
        if (this._stopped) return;
        const item = this.items.find((i) => i.status === "pending");
        if (!item) return;
        let result;
        try {
          result = await this._attempt(item);
        } catch (err) {
          const e = err instanceof ApiError ? err : new ApiError(String(err?.message ?? err), { status: 0, cause: err });
          const offline = e.status === 0 && !this._online();
          if (!offline) item.attempts++;
          item.error = { status: e.status, code: String(e.code), message: e.message };
          if (e.retryable && item.attempts < this.maxAttempts) {
            this._save();
            this.emit("change", item);
            // Offline: wait for the connection (kicked by `online` or `connected`).
            const wait = offline ? Infinity : (e.retryAfterMs ?? backoffDelay(item.attempts - 1, this.backoff));
            await this._sleep(wait);
            continue;
          }
          item.status = "failed";
          this._save();
          this.emit("change", item);
          continue;
        }
        item.attempts++;
        item.status = "sent";
        item.error = null;
        item.message = result?.message ?? null;
        this.items = this.items.filter((i) => i !== item);
        this._save();
        this.emit("change", item);
      }
    } finally {
      this._running = false;
    }
  }

  _attempt(item) {
    switch (item.op) {
      case "send":
        return this.api.send(item.project, item.body, item.id);
      case "edit":
        return this.api.edit(item.messageId, item.body, item.version);
      case "delete":
        return this.api.delete(item.messageId, item.version);
      default:
        return Promise.reject(new ApiError(`unknown outbox operation ${item.op}`, { status: 400, code: "bad_request" }));
    }
  }

  _restore() {
    if (!this.storage) return [];
    try {
      const items = JSON.parse(this.storage.getItem(this.storageKey) ?? "[]");
      return Array.isArray(items) ? items.filter((i) => i && typeof i.id === "string" && i.status !== "sent") : [];
    } catch {
      return [];
    }
  }

  _save() {
    if (!this.storage) return;
    try {
      this.storage.setItem(this.storageKey, JSON.stringify(this.items));
    } catch {
      /* storage full or forbidden: the queue lives on in memory */
    }
  }
}

/**
 * Pending and failed sends of `project` that are not yet among `rows`
 * (matched by client_generated_id), for showing next to them: a message is
 * never shown twice, whichever of its event and its POST answer comes
 * first.
 * @param {OutboxItem[]} items
 * @param {Iterable<{client_generated_id?: string}>} rows
 */
export function unsent(items, rows) {
  const have = new Set();
  for (const r of rows) if (r.client_generated_id) have.add(r.client_generated_id);
  return items.filter((i) => i.op === "send" && !have.has(i.id));
}

function newId() {
  if (globalThis.crypto?.randomUUID) return globalThis.crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}-${Math.random().toString(36).slice(2)}`;
}

function defaultStorage() {
  try {
    return globalThis.localStorage ?? null;
  } catch {
    return null; // e.g. a sandboxed iframe
  }
}
