// Who is online in one project (`sub.presence`): the members the relay
// reports (a snapshot, then diffs) and this connection's own place among
// them, joined again with its last state after every reconnect.
//
// Presence is eventually consistent (the relay's G9): a snapshot replaces
// everything, a diff replaces one user's connections. While the socket is
// down the members are the last ones known; the snapshot after the
// reconnect replaces them.

import { ErrorCode } from "./codes.js";
import { Emitter } from "./emitter.js";

/**
 * Events: `join`, `update`, `leave` ({user, connections}), `sync`
 * ({members, truncated}) after a snapshot, `change` (members) after any of
 * them.
 */
export class Presence extends Emitter {
  /** @param {import("./subscription.js").Subscription} sub */
  constructor(sub) {
    super();
    this.subscription = sub;
    /** @type {Map<string, {connection: string, state: object}[]>} user -> their connections */
    this.members = new Map();
    /** The last snapshot left members out (the relay's bound per snapshot). */
    this.truncated = false;
    /** This connection's key in member lists once the relay stored its state, else null. */
    this.connection = null;
    /** The state this connection is in the presence with, or null when not joined. */
    this.state = null;
    /** The state was sent on the current socket (set again after each reconnect). */
    this._sent = false;
  }

  /** Whether the app asked to be in the presence (and did not leave since). */
  get joined() {
    return this.state !== null;
  }

  /**
   * Joins the presence with `state` (a JSON object, at most 1024 bytes), or
   * replaces the state; after a reconnect the SDK joins again with it.
   * @param {object} [state]
   */
  join(state = {}) {
    if (state === null || typeof state !== "object" || Array.isArray(state)) throw new TypeError("presence state must be a JSON object");
    this.state = state;
    this._sent = false;
    this._flush();
  }

  /** The same as `join`: a new state replaces the old one. */
  update(state = {}) {
    this.join(state);
  }

  /** Leaves the presence (the subscription goes on). */
  leave() {
    if (this.state === null) return;
    this.state = null;
    this._sent = false;
    this.connection = null;
    const sub = this.subscription;
    if (sub.state === "subscribed") sub.client._send({ action: "presence_leave", project_id: sub.project });
  }

  /** Sends the state once the subscription holds on this socket. */
  _flush() {
    const sub = this.subscription;
    if (this.state === null || this._sent || sub.state !== "subscribed") return;
    this._sent = sub.client._send({ action: "presence", project_id: sub.project, state: this.state });
  }

  _onSubscribed() {
    this._flush();
  }

  _onDisconnect() {
    this._sent = false;
    this.connection = null;
  }

  /**
   * An error about a presence request: the state was not stored. One the
   * relay would refuse again (too large, malformed) is dropped; otherwise
   * it is sent again after a pause (rate) or the next subscribe.
   * @param {string} code
   * @param {string} action  `presence` or `presence_leave`
   */
  _onRefused(code, action) {
    const sub = this.subscription;
    if (action === "presence_leave") {
      // Still in: leave again shortly unless joined meanwhile.
      if (code === ErrorCode.RATE_LIMITED) {
        setTimeout(() => this.state === null && sub.state === "subscribed" && sub.client._send({ action: "presence_leave", project_id: sub.project }), 1_000);
      }
      return;
    }
    this._sent = false;
    if (code === ErrorCode.TOO_LARGE || code === ErrorCode.BAD_REQUEST) {
      this.state = null;
      this.connection = null;
    } else if (code === ErrorCode.RATE_LIMITED) {
      setTimeout(() => this._flush(), 1_000);
    }
  }

  _onFrame(frame) {
    switch (frame.type) {
      case "presence_state": {
        this.members = new Map();
        for (const m of frame.members ?? []) this.members.set(String(m.user_id), m.connections ?? []);
        this.truncated = frame.truncated === true;
        this.emit("sync", { members: this.members, truncated: this.truncated });
        return this.emit("change", this.members);
      }
      case "presence": {
        const user = String(frame.user_id);
        const connections = frame.connections ?? [];
        if (connections.length === 0) this.members.delete(user);
        else this.members.set(user, connections);
        const event = ["join", "update", "leave"].includes(frame.event) ? frame.event : "update";
        this.emit(event, { user, connections });
        return this.emit("change", this.members);
      }
      case "presence_joined":
        // A late answer to a join made before a leave is not a membership.
        if (this.state !== null) this.connection = String(frame.connection);
        return;
      case "presence_left":
        if (this.state === null) this.connection = null;
        return;
    }
  }

  _end() {
    this.state = null;
    this.connection = null;
    this._sent = false;
    if (this.members.size === 0) return;
    this.members = new Map();
    this.emit("change", this.members);
  }
}
