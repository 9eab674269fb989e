// One project's stream: its cursor, and the rule that the app gets every
// event exactly once and in order. The relay already sends them that way;
// this is the SDK's own check, so that no reconnect, resubscribe or bug on
// either side can show an app an event twice or out of order. A
// subscription narrowed to some resources (G10) gets `skipped` ranges for
// the seqs it was not sent: they move the cursor without an event, and
// the same check tells a range passed over from a range lost.

import * as Cursor from "./cursor.js";
import { Emitter } from "./emitter.js";
import * as Filter from "./filter.js";
import { ErrorCode } from "./codes.js";
import { SignalError, SubscriptionError } from "./errors.js";
import { Presence } from "./presence.js";

/** Most frames held back ahead of a gap; past it they are dropped and re-read after the resubscribe. */
const MAX_HELD = 10_000;
/** How long an acknowledged broadcast waits for its `broadcast_ack` by default (ms). */
const ACK_TIMEOUT = 10_000;
/** Ids of acknowledged broadcasts: unique per page/process (a prefix of its own, then a counter). */
const ackPrefix = Math.random().toString(36).slice(2, 10);
let ackCount = 0;

/**
 * Events: `event` (frame), `reset` ({reason, seq, frame}), `subscribed`
 * ({seq, resources, untracked}), `skipped` ({after, seq}: the cursor moved
 * past events the filter leaves out), `broadcast` (frame), `error`
 * (SubscriptionError, or SignalError for a refused broadcast or presence
 * change), `ended` (SubscriptionError|null).
 */
export class Subscription extends Emitter {
  /**
   * @param {import("./connection.js").Client} client
   * @param {string} project
   * @param {{cursor?: unknown, presence?: boolean, resources?: string[]|null}} [options]  `cursor`: a stored `subscription.cursor` to resume from; `presence`: watch the project's presence from the first subscribe; `resources`: only these resources' events (G10)
   */
  constructor(client, project, options = {}) {
    super();
    this.client = client;
    this.project = project;
    /** @type {import("./cursor.js").Cursor|null} */
    this._cursor = Cursor.parse(options.cursor);
    /** @type {string[]|null} the resources asked for, fixed for the subscription's life; null: all */
    this.resources = Filter.normalize(options.resources);
    /** @type {string[]} of `resources`, those no table was tracked as at the last `subscribed` */
    this.untracked = [];
    /** @type {"pending" | "subscribed" | "ended"} */
    this.state = "pending";
    /** @type {Map<number, object>} frames ahead of a gap, by order key */
    this._held = new Map();
    /** True between asking the relay to resend from the cursor and its `subscribed`. */
    this._refilling = false;
    /** What the SDK corrected: frames dropped as duplicates, held back, gaps refilled, resets; ranges passed over (filters). */
    this.stats = { delivered: 0, duplicates: 0, heldBack: 0, gapsRefilled: 0, resets: 0, skipped: 0 };
    this._ready = new Promise((resolve, reject) => {
      this._resolveReady = resolve;
      this._rejectReady = reject;
    });
    this._ready.catch(() => {}); // an ended subscription nobody waited for is not an unhandled rejection
    if (this._cursor) this._resolveReady();
    /** @type {Presence|null} created by `presence` (or the option) */
    this._presence = options.presence ? new Presence(this) : null;
    /** A subscribe frame asking for presence was made (the relay watches it from its answer on). */
    this._presenceAsked = false;
    /** @type {Map<string, {resolve: () => void, reject: (e: Error) => void, timer: any}>} acknowledged broadcasts in flight */
    this._acks = new Map();
  }

  /**
   * The project's presence: who is online, this connection's place in it.
   * The first use makes the subscription watch it (a resubscribe from the
   * cursor when it was subscribed without).
   * @returns {Presence}
   */
  get presence() {
    if (!this._presence) {
      this._presence = new Presence(this);
      if (this.ended) return this._presence;
      if (this.state === "subscribed") this.client._resubscribe(this);
      // Pending: the first `subscribed` (from a frame without presence) resubscribes.
    }
    return this._presence;
  }

  /**
   * Sends `{event, payload}` to every other subscriber of the project (and
   * to this one with `self`). At most once, never stored. Without `ack`
   * returns whether it was sent (the relay's refusals come as `error`
   * events); with `ack` returns a promise that the relay took it, rejected
   * with a SignalError when refused, when the connection drops first, or
   * after `timeout` ms.
   * @param {string} event
   * @param {unknown} [payload]
   * @param {{self?: boolean, ack?: boolean, timeout?: number}} [options]
   */
  broadcast(event, payload = null, options = {}) {
    const frame = { action: "broadcast", project_id: this.project, event: String(event), payload: payload === undefined ? null : payload };
    if (options.self) frame.self = true;
    if (!options.ack) return !this.ended && this.client._send(frame);
    const id = `${ackPrefix}-${++ackCount}`;
    frame.id = id;
    const fail = (code, message) => Promise.reject(new SignalError(`${this.project}: broadcast ${frame.event}: ${message}`, { code, project: this.project, action: "broadcast", id }));
    if (this.ended) return fail("ended", "the subscription has ended");
    if (!this.client._send(frame)) return fail("disconnected", "not connected");
    return new Promise((resolve, reject) => {
      const timeout = options.timeout ?? ACK_TIMEOUT;
      const timer = setTimeout(() => this._settleAck(id, "timeout", `no acknowledgement within ${timeout} ms`), timeout);
      this._acks.set(id, { resolve, reject, timer, event: frame.event });
    });
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
    const frame = { action: "subscribe", project_id: this.project, ...Cursor.subscribeFields(this._cursor) };
    if (this.resources) frame.resources = [...this.resources];
    if (this._presence) {
      frame.presence = true;
      this._presenceAsked = true;
    }
    return frame;
  }

  _onDisconnect() {
    if (this.ended) return;
    this.state = "pending";
    this._refilling = false;
    this._presence?._onDisconnect();
    // The relay may or may not have taken them: at most once.
    for (const id of [...this._acks.keys()]) this._settleAck(id, "disconnected", "the connection dropped before the acknowledgement");
  }

  /**
   * Settles the acknowledged broadcast `id`: resolved without `code`,
   * rejected with it. False when no such broadcast waits.
   */
  _settleAck(id, code, message) {
    const pending = this._acks.get(id);
    if (!pending) return false;
    this._acks.delete(id);
    clearTimeout(pending.timer);
    if (code === undefined) pending.resolve();
    else pending.reject(new SignalError(`${this.project}: broadcast ${pending.event}: ${message}`, { code, project: this.project, action: "broadcast", id }));
    return true;
  }

  /** `broadcast`, `broadcast_ack`, and the presence frames of this project. */
  _onSignal(frame) {
    if (this.ended) return;
    switch (frame.type) {
      case "broadcast":
        return this.emit("broadcast", frame);
      case "broadcast_ack":
        return void this._settleAck(String(frame.id));
      default:
        return this._presence?._onFrame(frame);
    }
  }

  /** An `error` frame about a broadcast or presence request of this project: the subscription goes on. */
  _onSignalError(frame) {
    if (this.ended) return;
    const action = String(frame.ref);
    const message = frame.message ?? frame.code;
    if (action === "broadcast" && frame.id !== undefined && this._settleAck(String(frame.id), frame.code, message)) return;
    if (action !== "broadcast") this._presence?._onRefused(frame.code, action);
    this.emit(
      "error",
      new SignalError(`${this.project}: ${action}: ${message}`, { code: frame.code, project: this.project, action, id: frame.id ?? null }),
    );
  }

  _onSubscribed(frame) {
    if (this.ended) return;
    this.state = "subscribed";
    this._refilling = false;
    const first = this._cursor === null;
    if (first) this._cursor = Cursor.fromSubscribed(frame);
    this.untracked = this.resources && Array.isArray(frame.untracked) ? frame.untracked.map(String) : [];
    this.emit("subscribed", { seq: frame.seq, resources: this.resources, untracked: this.untracked });
    if (first) this._resolveReady();
    this._drain();
    // Presence asked for after a subscribe without it: again, from the cursor, with it.
    if (this._presence && !this._presenceAsked) this.client._resubscribe(this);
    this._presence?._onSubscribed();
  }

  _onEvent(frame) {
    this._arrive(frame);
  }

  /** A `skipped` range: the relay passed over events the filter leaves out. */
  _onSkipped(frame) {
    if (Cursor.isSkipped(frame)) this._arrive(frame);
  }

  /**
   * An event or a skipped range, placed against the cursor: a duplicate is
   * counted and dropped, one past a gap is held until the gap is filled,
   * the next one is applied (and lets go of the held ones it reaches).
   */
  _arrive(frame) {
    if (this.ended || this._cursor === null) return;
    const where = this._place(frame);
    if (where === "duplicate") {
      this.stats.duplicates++;
      return;
    }
    if (where === "ahead") {
      this._hold(frame);
      return;
    }
    this._apply(frame);
    this._drain();
  }

  _apply(frame) {
    if (frame.type === "skipped") this._skip(frame);
    else this._deliver(frame);
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
    if (!Filter.wants(this.resources, frame.resource)) {
      // A relay that does not filter (older than G10) sent it: passed over
      // here, as the relay would have.
      this._skip(frame);
      return;
    }
    this._cursor = Cursor.afterEvent(frame);
    this.stats.delivered++;
    this.emit("event", frame);
  }

  /** Moves the cursor over a range with nothing for the app (a `skipped` frame, or an event the filter leaves out). */
  _skip(frame) {
    const after = Cursor.position(this._cursor);
    this._cursor = frame.type === "skipped" ? Cursor.afterSkipped(frame) : Cursor.afterEvent(frame);
    this.stats.skipped++;
    this.emit("skipped", { after, seq: Cursor.position(this._cursor) });
  }

  /** Where a frame (an event or a `skipped` range) stands relative to the cursor. */
  _place(frame) {
    return frame.type === "skipped" ? Cursor.placeSkipped(this._cursor, frame) : Cursor.place(this._cursor, frame);
  }

  /** Hands over held-back frames that have become next. */
  _drain() {
    if (this._held.size === 0) return;
    const keys = [...this._held.keys()].sort((a, b) => a - b);
    for (const key of keys) {
      const frame = this._held.get(key);
      const where = this._place(frame);
      if (where === "ahead") break;
      this._held.delete(key);
      if (where !== "next") this.stats.duplicates++;
      else this._apply(frame);
    }
  }

  _hold(frame) {
    const key = Cursor.orderKey(frame);
    const held = this._held.get(key);
    if (held) {
      // Two ranges to one end: the wider one is the more useful.
      if (frame.type === "skipped" && held.type === "skipped" && frame.after < held.after) this._held.set(key, frame);
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
    for (const id of [...this._acks.keys()]) this._settleAck(id, "ended", "the subscription ended before the acknowledgement");
    this._presence?._end();
    this._rejectReady(err ?? new SubscriptionError(`${this.project}: unsubscribed`, { code: "unsubscribed", project: this.project }));
    this.emit("ended", err);
  }
}
