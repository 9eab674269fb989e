// One project's stream: its cursor, and the rule that the app gets every
// event exactly once and in order. The relay already sends them that way;
// this is the SDK's own check, so that no reconnect, resubscribe or bug on
// either side can show an app an event twice or out of order.

import * as Cursor from "./cursor.js";
import { Emitter } from "./emitter.js";
import { ErrorCode } from "./codes.js";
import { SubscriptionError } from "./errors.js";

/** Most frames held back ahead of a gap; past it they are dropped and re-read after the resubscribe. */
const MAX_HELD = 10_000;

/**
 * Events: `event` (frame), `reset` ({reason, seq, frame}), `subscribed`
 * ({seq}), `error` (SubscriptionError), `ended` (SubscriptionError|null).
 */
export class Subscription extends Emitter {
  /**
   * @param {import("./connection.js").Client} client
   * @param {string} project
   * @param {{cursor?: unknown}} [options]  `cursor`: a stored `subscription.cursor` to resume from
   */
  constructor(client, project, options = {}) {
    super();
    this.client = client;
    this.project = project;
    /** @type {import("./cursor.js").Cursor|null} */
    this._cursor = Cursor.parse(options.cursor);
    /** @type {"pending" | "subscribed" | "ended"} */
    this.state = "pending";
    /** @type {Map<number, object>} frames ahead of a gap, by order key */
    this._held = new Map();
    /** True between asking the relay to resend from the cursor and its `subscribed`. */
    this._refilling = false;
    /** What the SDK corrected: frames dropped as duplicates, held back, gaps refilled, resets. */
    this.stats = { delivered: 0, duplicates: 0, heldBack: 0, gapsRefilled: 0, resets: 0 };
    this._ready = new Promise((resolve, reject) => {
      this._resolveReady = resolve;
      this._rejectReady = reject;
    });
    this._ready.catch(() => {}); // an ended subscription nobody waited for is not an unhandled rejection
    if (this._cursor) this._resolveReady();
  }

  /** The cursor to store for a later resume (JSON-serialisable), or null before the first `subscribed`. */
  get cursor() {
    return this._cursor;
  }

  /**
   * Resolves once the subscription has a cursor: every event after that
   * point reaches the app. Load history only after this (the collection
   * helper does). Rejects if the subscription ends first.
   */
  ready() {
    return this._ready;
  }

  get ended() {
    return this.state === "ended";
  }

  /** Ends this subscription (for every listener of it). */
  unsubscribe() {
    if (this.ended) return;
    this.client._unsubscribe(this);
    this._end(null);
  }

  /** The `subscribe` frame that resumes from the cursor. */
  _subscribeFrame() {
    return { action: "subscribe", project_id: this.project, ...Cursor.subscribeFields(this._cursor) };
  }

  _onDisconnect() {
    if (this.ended) return;
    this.state = "pending";
    this._refilling = false;
  }

  _onSubscribed(frame) {
    if (this.ended) return;
    this.state = "subscribed";
    this._refilling = false;
    const first = this._cursor === null;
    if (first) this._cursor = Cursor.fromSubscribed(frame);
    this.emit("subscribed", { seq: frame.seq });
    if (first) this._resolveReady();
    this._drain();
  }

  _onEvent(frame) {
    if (this.ended || this._cursor === null) return;
    const where = Cursor.place(this._cursor, frame);
    if (where === "duplicate") {
      this.stats.duplicates++;
      return;
    }
    if (where === "ahead") {
      this._hold(frame);
      return;
    }
    this._deliver(frame);
    this._drain();
  }

  _onReset(frame) {
    if (this.ended) return;
    this.stats.resets++;
    this._held.clear();
    this._cursor = Cursor.fromReset(frame);
    this._resolveReady();
    this.emit("reset", { reason: String(frame.reason ?? "unknown"), seq: frame.seq, frame });
  }

  /** An `error` frame about this project. */
  _onError(frame) {
    if (this.ended) return;
    const err = new SubscriptionError(`${this.project}: ${frame.message ?? frame.code}`, {
      code: frame.code,
      project: this.project,
      fatal: frame.code !== ErrorCode.UNAVAILABLE,
    });
    if (frame.code === ErrorCode.UNAVAILABLE) {
      // The relay could not reach its database: ask again shortly.
      this.emit("error", err);
      this.client._resubscribeLater(this);
      return;
    }
    if (frame.code === ErrorCode.NOT_SUBSCRIBED) return; // an unsubscribe crossed an end
    // forbidden (not a member, or membership revoked), authorize_failed,
    // too_many_subscriptions, bad_request (the relay names the project it
    // refused): the same subscribe would be refused again.
    this.client._forget(this);
    this.emit("error", err);
    this._end(err);
  }

  _deliver(frame) {
    this._cursor = Cursor.afterEvent(frame);
    this.stats.delivered++;
    this.emit("event", frame);
  }

  /** Hands over held-back frames that have become next. */
  _drain() {
    if (this._held.size === 0) return;
    const keys = [...this._held.keys()].sort((a, b) => a - b);
    for (const key of keys) {
      const frame = this._held.get(key);
      const where = Cursor.place(this._cursor, frame);
      if (where === "ahead") break;
      this._held.delete(key);
      if (where === "next") this._deliver(frame);
      else this.stats.duplicates++;
    }
  }

  _hold(frame) {
    const key = Cursor.orderKey(frame);
    if (this._held.has(key)) {
      this.stats.duplicates++;
      return;
    }
    this.stats.heldBack++;
    if (this._held.size >= MAX_HELD) this._held.clear(); // re-read after the resubscribe
    this._held.set(key, frame);
    if (!this._refilling) {
      // A gap: ask the relay to send again from the cursor.
      this._refilling = true;
      this.stats.gapsRefilled++;
      this.client._resubscribe(this);
    }
  }

  _end(err) {
    if (this.ended) return;
    this.state = "ended";
    this._held.clear();
    this._rejectReady(err ?? new SubscriptionError(`${this.project}: unsubscribed`, { code: "unsubscribed", project: this.project }));
    this.emit("ended", err);
  }
}
