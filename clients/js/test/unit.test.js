// The SDK's pure rules, fed frames directly: backoff bounds, the order and
// dedupe of a subscription, and the merge rule of a collection. Everything
// that talks to a relay is in relay.test.js and browser.test.js.

import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import * as sdk from "../src/index.js";
import { backoffDelay, closeAction, Collection, Subscription, unsent } from "../src/index.js";
import { Emitter } from "../src/emitter.js";

test("backoff delays stay within min and the doubling cap", () => {
  const bounds = { min: 500, max: 20_000 };
  for (let attempt = 0; attempt < 40; attempt++) {
    for (const r of [0, 0.5, 0.999999]) {
      const d = backoffDelay(attempt, bounds, () => r);
      assert.ok(d >= 500, `attempt ${attempt}: ${d} < 500`);
      assert.ok(d <= Math.min(20_000, 500 * 2 ** attempt), `attempt ${attempt}: ${d} over the cap`);
    }
  }
  assert.equal(backoffDelay(100, bounds, () => 1), 20_000);
});

test("close codes map to reconnect, slow, token or fatal", () => {
  for (const c of [1000, 1001, 1006, 1011, 4003, 4008, 4999]) assert.equal(closeAction(c), "reconnect", String(c));
  assert.equal(closeAction(4029), "slow");
  assert.equal(closeAction(4001), "token");
  assert.equal(closeAction(4002), "token");
  for (const c of [1007, 1009]) assert.equal(closeAction(c), "fatal", String(c));
});

/** A subscription with a stand-in for the client that records resubscribes. */
function subscription(cursor) {
  const client = { resubscribes: 0, _resubscribe() { this.resubscribes++; }, _forget() {}, _resubscribeLater() {} };
  const sub = new Subscription(client, "p", { cursor });
  const got = [];
  sub.on("event", (f) => got.push(f.seq));
  return { sub, client, got };
}
const ev = (seq) => ({ type: "cache_invalidate", project_id: "p", resource: "message", action: "INSERT", seq, data: { id: "r" + seq, version: 1 } });

test("events reach the app once each, in order, whatever order and repeats they arrive in", () => {
  const { sub, client, got } = subscription(null);
  sub._onEvent(ev(1)); // before `subscribed`: no cursor yet, ignored
  sub._onSubscribed({ type: "subscribed", project_id: "p", seq: 10 });
  for (const s of [11, 12, 12, 11, 14, 16, 15, 13, 17, 17, 9]) sub._onEvent(ev(s));
  assert.deepEqual(got, [11, 12, 13, 14, 15, 16, 17]);
  assert.equal(sub.stats.duplicates, 4);
  assert.equal(sub.stats.heldBack, 3);
  assert.equal(client.resubscribes, 1, "one gap, one resubscribe from the cursor");
  assert.deepEqual(sub.cursor, { seq: 17 });
  // The relay resends from the cursor after the resubscribe: all duplicates.
  sub._onSubscribed({ type: "subscribed", project_id: "p", seq: 17 });
  for (const s of [14, 15, 16, 17]) sub._onEvent(ev(s));
  assert.deepEqual(got, [11, 12, 13, 14, 15, 16, 17]);
});

test("reset moves the cursor wherever the relay says, even back, and clears what was held", () => {
  const { sub, got } = subscription({ seq: 30 });
  const resets = [];
  sub.on("reset", (r) => resets.push(r.reason));
  sub._onEvent(ev(33)); // held ahead of a gap
  sub._onReset({ type: "reset", project_id: "p", seq: 20, reason: "history_diverged" });
  sub._onEvent(ev(21));
  sub._onEvent(ev(33));
  assert.deepEqual(got, [21]);
  assert.deepEqual(resets, ["history_diverged"], "an unknown reason is a reset all the same");
  assert.deepEqual(sub._subscribeFrame(), { action: "subscribe", project_id: "p", since_seq: 21 });
});

test("the cursor names its event: a resubscribe sends since_timestamp, a stored cursor keeps it", () => {
  const at = (seq) => `2026-11-24T08:00:00.${String(seq).padStart(6, "0")}Z`;
  const { sub } = subscription(null);
  sub._onSubscribed({ type: "subscribed", project_id: "p", seq: 10, timestamp: at(10) });
  assert.deepEqual(sub._subscribeFrame(), { action: "subscribe", project_id: "p", since_seq: 10, since_timestamp: at(10) });
  sub._onEvent({ ...ev(11), timestamp: at(11) });
  assert.deepEqual(sub.cursor, { seq: 11, timestamp: at(11) });
  const stored = JSON.parse(JSON.stringify(sub.cursor));
  const back = subscription(stored).sub;
  assert.deepEqual(back._subscribeFrame(), { action: "subscribe", project_id: "p", since_seq: 11, since_timestamp: at(11) });
  // A reset names the relay's latest event; a scope with none yet has a null timestamp.
  back._onReset({ type: "reset", project_id: "p", seq: 7, reason: "history_diverged", timestamp: at(7) });
  assert.deepEqual(back.cursor, { seq: 7, timestamp: at(7) });
  back._onReset({ type: "reset", project_id: "p", seq: 0, reason: "history_diverged", timestamp: null });
  assert.deepEqual(back._subscribeFrame(), { action: "subscribe", project_id: "p", since_seq: 0 });
});

/** A filtered subscription (resources `message`) that records what the app is handed. */
function filtered(cursor) {
  const client = { resubscribes: 0, _resubscribe() { this.resubscribes++; }, _forget() {}, _resubscribeLater() {} };
  const sub = new Subscription(client, "p", { cursor, resources: ["message"] });
  const got = [];
  sub.on("event", (f) => got.push(f.seq));
  sub.on("skipped", (s) => got.push(`${s.after}..${s.seq}`));
  return { sub, client, got };
}
const at = (seq) => `2026-11-24T08:00:00.${String(seq).padStart(6, "0")}Z`;
const skip = (after, seq) => ({ type: "skipped", project_id: "p", after, seq, timestamp: at(seq) });

test("a skipped range moves the cursor like an event; one that starts past the cursor is a gap", () => {
  const { sub, client, got } = filtered(null);
  sub._onSubscribed({ type: "subscribed", project_id: "p", seq: 10, timestamp: at(10), resources: ["message"], untracked: [] });
  sub._onSkipped(skip(10, 12));
  assert.deepEqual(sub.cursor, { seq: 12, timestamp: at(12) }, "the stored cursor names the skip's last event");
  sub._onEvent({ ...ev(13), timestamp: at(13) });
  sub._onSkipped(skip(10, 12)); // behind the cursor: a duplicate
  // A range after 15 when the cursor is at 13: 14 and 15 are unaccounted for.
  sub._onSkipped(skip(15, 18));
  sub._onEvent(ev(19));
  assert.equal(client.resubscribes, 1, "one gap, one resubscribe from the cursor");
  assert.deepEqual(got, ["10..12", 13]);
  assert.deepEqual(sub._subscribeFrame(), { action: "subscribe", project_id: "p", since_seq: 13, since_timestamp: at(13), resources: ["message"] });
  // The relay resends from 13, coalescing differently: 14..15 then 15..18 is
  // held already; a range starting before the cursor but reaching past it counts.
  sub._onSubscribed({ type: "subscribed", project_id: "p", seq: 19, timestamp: at(19), resources: ["message"], untracked: [] });
  sub._onSkipped(skip(13, 15));
  assert.deepEqual(got, ["10..12", 13, "13..15", "15..18", 19]);
  sub._onSkipped(skip(18, 19)); // behind
  sub._onSkipped(skip(17, 21)); // covers 20..21
  sub._onEvent(ev(22));
  assert.deepEqual(got, ["10..12", 13, "13..15", "15..18", 19, "19..21", 22]);
  assert.equal(sub.stats.skipped, 4);
  assert.equal(sub.stats.duplicates, 2);
  assert.equal(sub.stats.delivered, 3);
  // Stored and given back: the filter is the subscription's, the cursor resumes it.
  const back = filtered(JSON.parse(JSON.stringify(sub.cursor))).sub;
  assert.deepEqual(back._subscribeFrame(), { action: "subscribe", project_id: "p", since_seq: 22, resources: ["message"] });
  // Malformed ranges are not placed (a gap shows them, and the refill replaces them).
  for (const bad of [{ after: 22, seq: 22 }, { after: "22", seq: 30 }, { seq: 30 }]) sub._onSkipped({ type: "skipped", project_id: "p", ...bad });
  assert.deepEqual(sub.cursor, { seq: 22 });
});

test("a filtered subscription passes over an event of another resource itself (a relay that does not filter)", () => {
  const { sub, got } = filtered({ seq: 5 });
  sub._onEvent(ev(6));
  sub._onEvent({ ...ev(7), resource: "task" });
  sub._onEvent({ ...ev(9), resource: "task" }); // ahead: held
  sub._onEvent(ev(8));
  assert.deepEqual(got, [6, "6..7", 8, "8..9"]);
  assert.deepEqual(sub.cursor, { seq: 9 });
});

test("subscribed says which resources no table is tracked as; a filter is checked with the relay's rule", () => {
  const { sub } = filtered(null);
  const infos = [];
  sub.on("subscribed", (i) => infos.push(i));
  sub._onSubscribed({ type: "subscribed", project_id: "p", seq: 0, timestamp: null, resources: ["message"], untracked: ["message"] });
  assert.deepEqual(infos, [{ seq: 0, resources: ["message"], untracked: ["message"] }]);
  assert.deepEqual(sub.untracked, ["message"]);
  assert.deepEqual(new Subscription({}, "p", { resources: ["a", "b.c-1", "a", "_x"] }).resources, ["a", "b.c-1", "_x"]);
  assert.equal(new Subscription({}, "p", {}).resources, null);
  const many = Array.from({ length: 33 }, (_, i) => `r${i}`);
  for (const bad of [[], "message", [1], ["9lives"], ["a b"], ["r".repeat(65)], many]) {
    assert.throws(() => new Subscription({}, "p", { resources: bad }), TypeError, JSON.stringify(bad));
  }
});

test("one subscription per project per connection: the same filter shares it, another one is refused", () => {
  const client = new sdk.Client({ url: "ws://127.0.0.1:9/ws", token: "t", WebSocket: function NoSocket() {}, autoConnect: false });
  const sub = client.subscribe("p", { resources: ["message", "task"] });
  assert.equal(client.subscribe("p", { resources: ["task", "message", "task"] }), sub, "the same set, in any order");
  for (const other of [{ resources: ["message"] }, {}, { presence: true }]) {
    assert.throws(() => client.subscribe("p", other), (e) => e instanceof sdk.PgRelayError && e.code === "filter_conflict", JSON.stringify(other));
  }
  assert.deepEqual(sub._subscribeFrame(), { action: "subscribe", project_id: "p", resources: ["message", "task"] });
  // A collection shares the filtered subscription, and refuses a resource it leaves out.
  const load = async () => [];
  assert.equal(sdk.collection(client, "p", "task", { load }).subscription, sub);
  assert.throws(() => sdk.collection(client, "p", "member", { load }), (e) => e.code === "filtered_out" && /member/.test(e.message));
  // Unsubscribed, the project may be subscribed again with another filter.
  sub.unsubscribe();
  const all = client.subscribe("p");
  assert.notEqual(all, sub);
  assert.equal(all.resources, null);
  assert.equal(sdk.collection(client, "p", "member", { load }).subscription, all);
  client.close();
});

test("forbidden ends the subscription with a SubscriptionError; unavailable asks again", async () => {
  const { sub } = subscription({ seq: 1 });
  const errors = [];
  sub.on("error", (e) => errors.push(e));
  sub._onError({ type: "error", code: "unavailable", message: "db down", project_id: "p" });
  assert.equal(sub.ended, false);
  sub._onError({ type: "error", code: "forbidden", message: "membership revoked", project_id: "p" });
  assert.equal(sub.ended, true);
  assert.equal(errors[1].name, "SubscriptionError");
  assert.equal(errors[1].code, "forbidden");
  assert.equal(errors[1].fatal, true);
});

/** A subscription whose stand-in client records the frames it sends (a socket that is always open). */
function signalling(options) {
  const client = { sent: [], _send(f) { this.sent.push(f); return true; }, _resubscribe(s) { this.sent.push(s._subscribeFrame()); }, _forget() {}, _resubscribeLater() {} };
  const sub = new Subscription(client, "p", options);
  return { sub, client };
}

test("presence: a snapshot replaces, diffs replace one user, and the state is sent again after a reconnect", () => {
  const { sub, client } = signalling({ presence: true });
  assert.equal(sub._subscribeFrame().presence, true);
  const seen = [];
  for (const e of ["join", "update", "leave", "sync"]) sub.presence.on(e, (x) => seen.push([e, x.user ?? [...x.members.keys()].join()]));
  sub.presence.join({ typing: false });
  assert.deepEqual(client.sent.filter((f) => f.action === "presence"), [], "not before the subscription holds");
  sub._onSubscribed({ type: "subscribed", project_id: "p", seq: 0 });
  assert.deepEqual(client.sent.at(-1), { action: "presence", project_id: "p", state: { typing: false } });
  const c = (k, state = {}) => ({ connection: k, state });
  sub._onSignal({ type: "presence_state", project_id: "p", members: [{ user_id: "ann", connections: [c("1")] }], truncated: false });
  sub._onSignal({ type: "presence", project_id: "p", event: "join", user_id: "bob", connections: [c("2")] });
  sub._onSignal({ type: "presence", project_id: "p", event: "update", user_id: "bob", connections: [c("2"), c("3")] });
  sub._onSignal({ type: "presence", project_id: "p", event: "leave", user_id: "ann", connections: [] });
  sub._onSignal({ type: "presence_joined", project_id: "p", connection: "3" });
  assert.deepEqual([...sub.presence.members.keys()], ["bob"]);
  assert.equal(sub.presence.members.get("bob").length, 2);
  assert.equal(sub.presence.connection, "3");
  assert.deepEqual(seen, [["sync", "ann"], ["join", "bob"], ["update", "bob"], ["leave", "ann"]]);
  sub.presence.update({ typing: true });
  // Reconnect: joined again with the last state, once subscribed.
  sub._onDisconnect();
  assert.equal(sub.presence.connection, null);
  const before = client.sent.length;
  sub._onSubscribed({ type: "subscribed", project_id: "p", seq: 0 });
  assert.deepEqual(client.sent.slice(before), [{ action: "presence", project_id: "p", state: { typing: true } }]);
  sub.presence.leave();
  assert.deepEqual(client.sent.at(-1), { action: "presence_leave", project_id: "p" });
  sub._onDisconnect();
  sub._onSubscribed({ type: "subscribed", project_id: "p", seq: 0 });
  assert.deepEqual(client.sent.at(-1), { action: "presence_leave", project_id: "p" }, "not joined again after a leave");
});

test("presence asked for after subscribing without it: one resubscribe from the cursor, with presence", () => {
  const { sub, client } = signalling({});
  sub._onSubscribed({ type: "subscribed", project_id: "p", seq: 5 });
  assert.deepEqual(client.sent, []);
  void sub.presence;
  assert.deepEqual(client.sent, [{ action: "subscribe", project_id: "p", since_seq: 5, presence: true }]);
  void sub.presence;
  assert.equal(client.sent.length, 1);
});

test("acknowledged broadcasts settle: ack, an error naming the id, a disconnect, a timeout", async () => {
  const { sub, client } = signalling({});
  sub._onSubscribed({ type: "subscribed", project_id: "p", seq: 0 });
  const acked = sub.broadcast("e", { a: 1 }, { ack: true, self: true });
  const frame = client.sent.at(-1);
  assert.deepEqual({ ...frame, id: "x" }, { action: "broadcast", project_id: "p", event: "e", payload: { a: 1 }, self: true, id: "x" });
  sub._onSignal({ type: "broadcast_ack", project_id: "p", id: frame.id });
  await acked;
  const refused = sub.broadcast("e", "x".repeat(10), { ack: true });
  sub._onSignalError({ type: "error", code: "too_large", message: "big", ref: "broadcast", project_id: "p", id: client.sent.at(-1).id });
  await assert.rejects(refused, (e) => e.name === "SignalError" && e.code === "too_large" && e.id === client.sent.at(-1).id);
  const dropped = sub.broadcast("e", null, { ack: true });
  sub._onDisconnect();
  await assert.rejects(dropped, (e) => e.code === "disconnected");
  const late = sub.broadcast("e", null, { ack: true, timeout: 20 });
  await assert.rejects(late, (e) => e.code === "timeout");
  // Without ack: errors are events.
  const errors = [];
  sub.on("error", (e) => errors.push(e));
  assert.equal(sub.broadcast("e"), true);
  sub._onSignalError({ type: "error", code: "rate_limited", message: "slow down", ref: "broadcast", project_id: "p" });
  assert.deepEqual(errors.map((e) => [e.name, e.code, e.action, e.fatal]), [["SignalError", "rate_limited", "broadcast", false]]);
  assert.equal(sub.ended, false);
});

/** A collection over a stand-in subscription (an emitter with a cursor). */
function coll(load) {
  const sub = new Emitter();
  sub.ready = () => Promise.resolve();
  const c = new Collection(sub, "message", { load, sort: (a, b) => a.seq - b.seq });
  return { sub, c };
}
const row = (id, version, body = "v" + version) => ({ id, seq: Number(id.slice(1)), version, body });
const frame = (action, data) => ({ type: "cache_invalidate", resource: "message", action, data, seq: 0 });

test("history never replaces a newer row, and never brings back a deleted one", async () => {
  let release;
  const { sub, c } = coll(() => new Promise((r) => (release = r)));
  await new Promise((r) => setImmediate(r));
  // Live events while the history is loading.
  sub.emit("event", frame("UPDATE", row("m1", 3)));
  sub.emit("event", frame("DELETE", row("m2", 1)));
  sub.emit("event", frame("INSERT", row("m4", 1)));
  release([row("m1", 2), row("m2", 1), row("m3", 5)]);
  await c.ready;
  assert.deepEqual(
    c.values().map((r) => [r.id, r.version]),
    [["m1", 3], ["m3", 5], ["m4", 1]],
  );
  // History newer than an event it raced with wins; an older event after it does not.
  sub.emit("event", frame("UPDATE", row("m3", 4)));
  assert.equal(c.get("m3").version, 5);
  sub.emit("event", frame("UPDATE", row("m3", 6)));
  assert.equal(c.get("m3").version, 6);
});

test("a reload after reset drops rows that are gone and keeps those touched meanwhile", async () => {
  let history = [row("m1", 1), row("m2", 1)];
  const { sub, c } = coll(async () => history);
  await c.ready;
  history = [row("m2", 2)];
  const reloaded = c.reload();
  sub.emit("event", frame("INSERT", row("m9", 1)));
  await reloaded;
  assert.deepEqual(c.values().map((r) => r.id), ["m2", "m9"]);
});

test("unsent items are those whose message is not in the collection yet", () => {
  const items = [
    { op: "send", id: "a", body: "x" },
    { op: "send", id: "b", body: "y" },
    { op: "edit", id: "c", body: "z" },
  ];
  assert.deepEqual(unsent(items, [{ client_generated_id: "a" }]).map((i) => i.id), ["b"]);
});

test("the types declare every export, and the README names every export and member the types declare", () => {
  const types = readFileSync(new URL("../src/index.d.ts", import.meta.url), "utf8");
  const readme = readFileSync(new URL("../README.md", import.meta.url), "utf8");
  const exported = new Set([...types.matchAll(/^export (?:class|function|const|type|interface) (\w+)/gm)].map((m) => m[1]));
  assert.deepEqual(Object.keys(sdk).filter((name) => !exported.has(name)), [], "exports of index.js missing from index.d.ts");
  const members = [...types.matchAll(/^ {2}(?:readonly )?(\w+)\??[(:<]/gm)].map((m) => m[1]).filter((n) => n !== "constructor");
  const fenced = [];
  const prose = readme.replace(/```[\s\S]*?```/g, (block) => (fenced.push(block), ""));
  const spans = [...fenced, ...[...prose.matchAll(/`([^`]+)`/g)].map((m) => m[1])].join("\n");
  const unnamed = [...new Set([...exported, ...members])].filter((name) => !new RegExp(`\\b${name}\\b`).test(spans));
  assert.deepEqual(unnamed, [], "declared in index.d.ts, not named in README.md");
  assert.ok(exported.size >= 30 && members.length >= 80, `read ${exported.size} exports and ${members.length} members`);
});
