// A keyed collection of one resource of a project: history and live events
// merged without a race.
//
// The order is what makes it safe: listen to the subscription first, wait
// until it has a cursor (every event after that point will arrive), and
// only then load the history. A change committed before the load's
// snapshot is in the history; one committed after it has a higher seq than
// the cursor and arrives as an event. So nothing is missed; what remains
// is the overlap, settled per row:
//  - events are applied in seq order, each replacing what it finds;
//  - a history row replaces what an event set only if it has a strictly
//    greater `version` (it cannot know it is newer otherwise, and if it is,
//    the event that made it so is still on its way);
//  - a deleted row stays as a tombstone, so a history row of it loaded
//    before the delete cannot bring it back.
// After a `reset` the history is loaded again the same way; rows neither in
// it nor touched by an event since the reload began are gone.
// Over a subscription narrowed to some resources (G10) the same holds: its
// cursor moves over the other resources' events (`skipped`), so "after the
// cursor" still means every later change of this resource. A filter that
// leaves this resource out would leave the collection frozen at its
// history: that is refused when the collection is made.

import { backoffDelay, DEFAULT_BACKOFF } from "./backoff.js";
import { Emitter } from "./emitter.js";
import { PgRelayError } from "./errors.js";

/**
 * @typedef {object} CollectionOptions
 * @property {(row: any) => string} [key]  a row's key (default `row.id`)
 * @property {() => Promise<any[]>} load  the history (e.g. `() => api.recentMessages(project)`)
 * @property {(row: any) => number|undefined} [version]  a row's version (default `row.version` when a number)
 * @property {(row: any) => boolean} [isDeleted]  a row that counts as removed though it still exists (a soft delete)
 * @property {(a: any, b: any) => number} [sort]  order of `values()`
 */

/**
 * Events: `change` ({reason: "load"|"event"|"upsert", changes: [{type:
 * "upsert"|"remove", key, row}]}), `reset` ({reason, seq}), `error` (the
 * load failed; it is retried with backoff).
 */
export class Collection extends Emitter {
  /**
   * @param {import("./subscription.js").Subscription} subscription
   * @param {string} resource  e.g. "message"
   * @param {CollectionOptions} options
   */
  constructor(subscription, resource, options) {
    super();
    if (typeof options?.load !== "function") throw new TypeError("collection: options.load must be a function returning the history");
    const filter = subscription.resources;
    if (Array.isArray(filter) && !filter.includes(resource)) {
      throw new PgRelayError(
        `collection: the subscription of ${subscription.project} is for resources [${filter.join(", ")}], ` +
          `so ${JSON.stringify(resource)} events would never arrive`,
        { code: "filtered_out" },
      );
    }
    this.subscription = subscription;
    this.resource = resource;
    this._key = options.key ?? ((row) => String(row.id));
    this._version = options.version ?? ((row) => (typeof row?.version === "number" ? row.version : undefined));
    this._isDeleted = options.isDeleted ?? (() => false);
    this._sort = options.sort ?? null;
    this._load = options.load;
    /** @type {Map<string, {row: any, deleted: boolean, version: number|undefined, fromEvent: boolean, gen: number}>} */
    this._entries = new Map();
    this._gen = 0;
    this.loading = false;
    this._stopped = false;
    this._offs = [
      subscription.on("event", (frame) => this._onEvent(frame)),
      subscription.on("reset", (info) => {
        this.emit("reset", info);
        void this.reload();
      }),
    ];
    this.ready = this.reload();
  }

  /** The row held under `key`, or undefined (also for a deleted one). */
  get(key) {
    const e = this._entries.get(String(key));
    return e && !e.deleted ? e.row : undefined;
  }

  /** The rows, sorted when a `sort` was given. */
  values() {
    const rows = [];
    for (const e of this._entries.values()) if (!e.deleted) rows.push(e.row);
    return this._sort ? rows.sort(this._sort) : rows;
  }

  get size() {
    let n = 0;
    for (const e of this._entries.values()) if (!e.deleted) n++;
    return n;
  }

  /**
   * Merges a row the app got some other way (the answer to its own write),
   * with the same rule as history: it never replaces a newer version.
   */
  upsert(row) {
    const change = this._mergeHistory(row, this._gen, true);
    if (change) this.emit("change", { reason: "upsert", changes: [change] });
  }

  /** Loads the history again and merges it (what a `reset` does). */
  async reload() {
    const gen = ++this._gen;
    this.loading = true;
    for (let attempt = 0; !this._stopped; attempt++) {
      try {
        await this.subscription.ready();
        const rows = await this._load();
        if (gen !== this._gen || this._stopped) return; // a newer reload took over
        this._finishLoad(rows, gen);
        return;
      } catch (err) {
        if (this._stopped || gen !== this._gen) return;
        if (this.subscription.ended) {
          this.loading = false;
          this.emit("error", err);
          return;
        }
        this.emit("error", err);
        await new Promise((r) => setTimeout(r, backoffDelay(attempt, DEFAULT_BACKOFF)));
      }
    }
  }

  /** Stops following the subscription (which stays for its other users). */
  stop() {
    this._stopped = true;
    for (const off of this._offs) off();
  }

  _finishLoad(rows, gen) {
    const changes = [];
    const seen = new Set();
    for (const row of rows) {
      seen.add(this._key(row));
      const change = this._mergeHistory(row, gen, false);
      if (change) changes.push(change);
    }
    // Rows neither in this history nor touched since it began: gone.
    for (const [key, e] of this._entries) {
      if (seen.has(key) || e.gen === gen) continue;
      this._entries.delete(key);
      if (!e.deleted) changes.push({ type: "remove", key, row: e.row });
    }
    this.loading = false;
    this.emit("change", { reason: "load", changes });
  }

  /**
   * A history row (or the app's own): see the rule at the top. The app's
   * own rows count as touched during the current load, so a history loaded
   * before them does not remove them.
   */
  _mergeHistory(row, gen, own) {
    const key = this._key(row);
    const version = this._version(row);
    const held = this._entries.get(key);
    if (held && held.fromEvent && held.gen === gen) {
      const newer = version !== undefined && held.version !== undefined && version > held.version;
      if (!newer) return null;
    } else if (held && held.version !== undefined && version !== undefined && version < held.version) {
      return null;
    }
    const deleted = this._isDeleted(row);
    this._entries.set(key, { row, deleted, version, fromEvent: false, gen: own ? gen : -1 });
    if (deleted) return held && !held.deleted ? { type: "remove", key, row } : null;
    return { type: "upsert", key, row };
  }

  _onEvent(frame) {
    if (this._stopped || frame.resource !== this.resource || !frame.data) return;
    const row = frame.data;
    const key = this._key(row);
    const held = this._entries.get(key);
    const version = this._version(row);
    // A history row newer than this event was loaded after the event's change.
    if (held && !held.fromEvent && held.version !== undefined && version !== undefined && version < held.version) return;
    const deleted = frame.action === "DELETE" || this._isDeleted(row);
    this._entries.set(key, { row, deleted, version, fromEvent: true, gen: this._gen });
    const change = deleted ? (held && !held.deleted ? { type: "remove", key, row } : null) : { type: "upsert", key, row };
    if (change) this.emit("change", { reason: "event", changes: [change] });
  }
}
