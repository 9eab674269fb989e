// The cursor of a subscription: where the app is in a project's stream of
// events, so that a resubscribe after any reconnect resumes exactly there.
//
// This file is the only place that knows what a cursor holds. Everything
// else treats a cursor as an opaque, JSON-serialisable value and goes
// through these functions: what is kept after an event, after `subscribed`
// and after `reset`; what a `subscribe` frame carries to resume; how an
// event frame is placed relative to the cursor; and how a stored cursor is
// read back.
//
// A cursor names an event, not only a number: the seq of the last event
// handed to the app and that event's `timestamp` (its capture time, which
// the relay's `subscribed` and `reset` frames carry too). The relay checks
// on resume that its log still holds that very event, and answers `reset`
// (`history_diverged`) when it does not: a failover that lost commits this
// app already saw makes seqs repeat with other events, which a bare seq
// cannot tell (docs/protocol.md, "Resume").
//
// A subscription narrowed to some resources (G10) sees only their events,
// so its seqs are not contiguous; the relay accounts for the rest with
// `skipped` frames ({after, seq, timestamp}: no event of the filter lies
// after `after` up to `seq`). A skipped range moves the cursor like an
// event does, so "every seq is an event or a vouched-for range" still
// holds, and a seq neither covers is a gap, as it is unfiltered
// (docs/protocol.md, "Filters"). A cursor is a position in the project's
// whole stream: it resumes a subscription with any filter.

/**
 * @typedef {{seq: number, timestamp?: string}} Cursor
 * @typedef {{seq: number, timestamp?: string|null}} PositionedFrame  an event, `subscribed`, `reset` or `skipped` frame
 * @typedef {{after: number, seq: number, timestamp?: string|null}} SkippedFrame
 */

/** The cursor at `frame`'s position, with its event's name when it has one. */
function at(frame) {
  return typeof frame.timestamp === "string"
    ? { seq: frame.seq, timestamp: frame.timestamp }
    : { seq: frame.seq };
}

/** The cursor once `frame`, an event, has been handed to the app. */
export function afterEvent(frame) {
  return at(frame);
}

/**
 * The cursor once `frame`, a `skipped` range placed "next", has been
 * taken: at its end, named by the event there.
 */
export function afterSkipped(frame) {
  return at(frame);
}

/**
 * The cursor a subscription without one takes from `subscribed`: live from
 * here on (the frame carries the latest event at subscribe time).
 */
export function fromSubscribed(frame) {
  return at(frame);
}

/**
 * The cursor after `reset`, whatever its reason: the relay goes on with the
 * events after the frame's position, which may be lower than the old cursor
 * (a database restored, a history that diverged).
 */
export function fromReset(frame) {
  return at(frame);
}

/**
 * The fields a `subscribe` frame carries to resume after `cursor`; none for
 * a subscription that has no cursor yet (live from now).
 * @param {Cursor|null} cursor
 */
export function subscribeFields(cursor) {
  if (!cursor) return {};
  return cursor.timestamp === undefined
    ? { since_seq: cursor.seq }
    : { since_seq: cursor.seq, since_timestamp: cursor.timestamp };
}

/**
 * Where an event frame stands relative to the cursor: the one expected
 * next, one already handed to the app, or one ahead of a gap.
 * @param {Cursor} cursor
 * @param {PositionedFrame} frame
 * @returns {"next" | "duplicate" | "ahead"}
 */
export function place(cursor, frame) {
  if (frame.seq === cursor.seq + 1) return "next";
  return frame.seq <= cursor.seq ? "duplicate" : "ahead";
}

/**
 * Where a `skipped` range stands relative to the cursor. It is next when
 * it covers the seq after the cursor (`after` at or before the cursor,
 * `seq` past it): nothing the app is owed lies up to its end, since the
 * relay vouched for the whole range, so also for the part after the
 * cursor (a range may start before the cursor when the relay coalesced
 * it differently on a resend). It is a duplicate when it ends at or behind
 * the cursor, and ahead of a gap when it starts past the cursor: the seqs
 * between are unaccounted for.
 * @param {Cursor} cursor
 * @param {SkippedFrame} frame
 * @returns {"next" | "duplicate" | "ahead"}
 */
export function placeSkipped(cursor, frame) {
  if (frame.seq <= cursor.seq) return "duplicate";
  return frame.after <= cursor.seq ? "next" : "ahead";
}

/** Whether `frame` is a `skipped` range the cursor rules can place (integer bounds, `after` < `seq`). */
export function isSkipped(frame) {
  return Number.isSafeInteger(frame.after) && Number.isSafeInteger(frame.seq) && frame.after >= 0 && frame.after < frame.seq;
}

/** The seq a cursor stands at (what a `skipped` event reports). */
export function position(cursor) {
  return cursor.seq;
}

/**
 * A key that orders frames held back ahead of a gap.
 * @param {PositionedFrame} frame
 */
export function orderKey(frame) {
  return frame.seq;
}

/**
 * A stored cursor (from `subscription.cursor`, maybe through JSON) back
 * into a cursor; `null` when `value` is not one.
 * @param {unknown} value
 * @returns {Cursor|null}
 */
export function parse(value) {
  if (value && typeof value === "object" && Number.isSafeInteger(value.seq) && value.seq >= 0) {
    return at(value);
  }
  return null;
}
