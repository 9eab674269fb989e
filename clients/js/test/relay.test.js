// The SDK in Node against the real relay binary and a private Postgres:
// exactly once in order across forced disconnects and relay restarts,
// reset after trimming, backoff bounds and the stop on fatal codes, token
// refresh, outbox retries and the lack of them; subscriptions narrowed to
// some resources (G10) and a collection over one.

import { test, before, after, afterEach } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { Client, ChatApi, Outbox, collection, invalidateOn, AuthError, ConnectionError, PgRelayError, SubscriptionError } from "../src/index.js";
import { Postgres, Relay, Proxy, seed, token, until, sleep, insertLoop, tally, output, freePort } from "./harness.js";

let pg;
const results = {};
let dbCount = 0;

before(async () => {
  mkdirSync(new URL("../test-output", import.meta.url), { recursive: true });
  pg = await Postgres.start();
});

/** Clients, proxies, outboxes and relays a test opened: closed after it, pass or fail. */
const opened = [];
const track = (x) => (opened.push(x), x);
afterEach(async () => {
  for (const x of opened.splice(0).reverse()) {
    if (x instanceof Relay) await x.stop();
    else if (x instanceof Outbox) x.stop();
    else x.close();
  }
});

after(async () => {
  output("node-results.json", JSON.stringify(results, null, 2) + "\n");
  await pg?.close();
});

/** A fresh database, a relay on it (migrated), the project `p` with alice and bob. */
async function setup(relayOpts = {}) {
  const name = `t${++dbCount}`;
  await pg.psql("postgres", `CREATE DATABASE ${name}`);
  const relay = track(await Relay.start(pg.url(name), relayOpts));
  await seed(pg, name, "p", ["alice", "bob"]);
  return { db: name, relay };
}

/** Records message INSERTs and every event seq the app receives. */
function record(sub) {
  const r = { ids: [], seqs: [] };
  sub.on("event", (e) => {
    r.seqs.push(e.seq);
    if (e.resource === "message" && e.action === "INSERT") r.ids.push(e.data.id);
  });
  return r;
}

async function messageIds(db) {
  return pg.psql(db, "SELECT id FROM chat.messages WHERE project_id = 'p' ORDER BY seq");
}

function contiguous(seqs) {
  return seqs.every((s, i) => i === 0 || s === seqs[i - 1] + 1);
}

const quick = { backoff: { min: 50, max: 300 }, pingInterval: 2_000, pingTimeout: 2_000 };

test("exactly once, in order, across forced disconnects", async () => {
  const { db, relay } = await setup();
  const proxy = track(await Proxy.start(relay.port));
  const client = track(new Client({ url: proxy.ws, token: () => token("alice"), ...quick }));
  const sub = client.subscribe("p");
  const got = record(sub);
  await sub.ready();
  const writing = insertLoop(pg, db, "p", "bob", 600, 4);
  let done = false;
  void writing.finally(() => (done = true));
  while (!done) {
    await sleep(300);
    proxy.cut();
  }
  const expected = await messageIds(db);
  await until(() => got.ids.length >= expected.length, "every message");
  await sleep(300); // room for a late duplicate to show
  const t = tally(expected, got.ids);
  results.forcedDisconnects = { ...t, cuts: proxy.cuts, sockets: client.stats.sockets, sdk: sub.stats };
  assert.deepEqual(got.ids, expected);
  assert.ok(contiguous(got.seqs), "event seqs contiguous");
  assert.ok(proxy.cuts >= 5, `only ${proxy.cuts} cuts`);
  client.close();
  proxy.close();
  await relay.stop();
});

test("exactly once, in order, across relay restarts (1001 and a crash)", async () => {
  const { db, relay } = await setup();
  const client = track(new Client({ url: relay.ws, token: () => token("alice"), ...quick }));
  const sub = client.subscribe("p");
  const got = record(sub);
  await sub.ready();
  const closes = [];
  client.on("reconnecting", (r) => closes.push(r.code));
  const writing = insertLoop(pg, db, "p", "bob", 400, 5);
  await sleep(400);
  await relay.restart(); // SIGTERM: 1001 going away
  await sleep(400);
  await relay.stop("SIGKILL"); // no close frame at all
  await relay.boot();
  await writing;
  const expected = await messageIds(db);
  await until(() => got.ids.length >= expected.length, "every message");
  await sleep(300);
  results.relayRestart = { ...tally(expected, got.ids), closeCodes: closes, sdk: sub.stats };
  assert.deepEqual(got.ids, expected);
  assert.ok(contiguous(got.seqs));
  assert.ok(closes.includes(1001), `close codes seen: ${closes}`);
  client.close();
  await relay.stop();
});

test("reset after trimming: the collection reloads and ends equal to the database", async () => {
  const { db, relay } = await setup();
  const proxy = track(await Proxy.start(relay.port));
  const client = track(new Client({ url: proxy.ws, token: () => token("alice"), ...quick }));
  const api = new ChatApi({ client });
  const messages = collection(client, "p", "message", { load: () => api.recentMessages("p", 500), sort: (a, b) => a.seq - b.seq });
  const resets = [];
  messages.on("reset", (r) => resets.push(r.reason));
  // The query-cache helper on the same subscription: one call per message
  // event, and every handler with null on the reset.
  const invalidated = { message: 0, all: 0, nulls: 0 };
  invalidateOn(client.subscribe("p"), {
    message: (e) => (e ? invalidated.message++ : invalidated.nulls++),
    "*": (e) => (e ? invalidated.all++ : invalidated.nulls++),
  });
  await insertLoop(pg, db, "p", "bob", 20, 0, "before");
  await messages.ready;
  // Both the collection and the invalidation helper have seen the first 20
  // live (history alone can fill the collection before the last events
  // arrive, and an event cut off by the refusal below would then come
  // only after the reset).
  await until(() => messages.size === 20 && invalidated.message === 20, "the first 20 messages");
  proxy.refuse();
  await insertLoop(pg, db, "p", "bob", 30, 0, "gap");
  await pg.psql(db, "DELETE FROM chat.messages WHERE body IN ('before1', 'gap1')");
  await pg.psql(db, "SELECT relay.trim(0, '0 seconds', 100000)");
  proxy.allow();
  await until(() => resets.length > 0, "a reset");
  const rows = async () => (await pg.psql(db, "SELECT id || ':' || version FROM chat.messages WHERE project_id = 'p' ORDER BY seq"));
  const expected = await rows();
  await until(() => !messages.loading && messages.values().map((m) => `${m.id}:${m.version}`).join() === expected.join(), "the collection to equal the database");
  results.resetAfterTrim = { resets, rows: expected.length, collection: messages.size, invalidated };
  assert.deepEqual(resets, ["history_trimmed"]);
  assert.equal(invalidated.message, 20, "one invalidation per message event before the gap");
  assert.equal(invalidated.nulls, 2, "both handlers on the reset");
  client.close();
  proxy.close();
  await relay.stop();
});

test("backoff stays within its bounds, and a relay that comes back is found", async () => {
  const port = await freePort();
  const bounds = { min: 100, max: 800 };
  const client = track(new Client({ url: `ws://127.0.0.1:${port}/ws`, token: () => token("alice"), backoff: bounds }));
  const delays = [];
  let lastAt = 0;
  const gaps = [];
  client.on("reconnecting", (r) => {
    delays.push(r.delay);
    lastAt = Date.now();
  });
  client.on("state", (s) => s === "connecting" && lastAt && gaps.push([delays.at(-1), Date.now() - lastAt]));
  await until(() => delays.length >= 8, "eight reconnects", 15_000);
  delays.forEach((d, i) => {
    assert.ok(d >= bounds.min && d <= Math.min(bounds.max, bounds.min * 2 ** i), `attempt ${i}: ${d} ms`);
  });
  for (const [delay, gap] of gaps) assert.ok(gap >= delay - 5, `waited ${gap} ms for a ${delay} ms delay`);
  const { db } = { db: `t${++dbCount}` };
  await pg.psql("postgres", `CREATE DATABASE ${db}`);
  const relay = track(await Relay.start(pg.url(db), { port }));
  await until(() => client.state === "connected", "the client to connect");
  results.backoff = { bounds, delays };
  client.close();
  await relay.stop();
});

test("fatal close codes stop the client with a typed error", async () => {
  const { relay } = await setup({ args: ["--max-connections-per-user", "1"] });
  // 4001 and a provider with nothing else to offer.
  const bad = token("alice", 3600, "some-other-secret-of-enough-bytes");
  const a = track(new Client({ url: relay.ws, token: () => bad, backoff: { min: 10, max: 20 } }));
  const aErrors = [];
  a.on("error", (e) => aErrors.push(e));
  await until(() => a.state === "closed", "4001 to stop the client");
  assert.ok(aErrors.at(-1) instanceof AuthError && aErrors.at(-1).fatal && aErrors.at(-1).code === 4001);
  await sleep(300);
  assert.equal(a.stats.sockets, 1, "no reconnect after a refused token the provider cannot replace");
  // A provider that keeps minting tokens the relay refuses: stops after three.
  const b = track(new Client({ url: relay.ws, token: () => token("alice", 3600, "some-other-secret-of-enough-bytes"), backoff: { min: 10, max: 20 } }));
  await until(() => b.state === "closed", "repeated 4001 to stop the client");
  assert.equal(b.stats.sockets, 3);
  // 1009: a frame over the relay's limit.
  const c = track(new Client({ url: relay.ws, token: () => token("alice"), backoff: { min: 10, max: 20 } }));
  const cErrors = [];
  c.on("error", (e) => cErrors.push(e));
  await until(() => c.state === "connected", "c to connect");
  c.subscribe("x".repeat(70_000));
  await until(() => c.state === "closed", "1009 to stop the client");
  assert.ok(cErrors.at(-1) instanceof ConnectionError && cErrors.at(-1).code === 1009);
  await sleep(300);
  assert.equal(c.stats.sockets, 1);
  // 4029 (one connection per user here): a longer backoff, then in once there is room.
  const d1 = track(new Client({ url: relay.ws, token: () => token("bob"), ...quick }));
  await until(() => d1.state === "connected", "d1 to connect");
  const slow = { min: 400, max: 800 };
  const d2 = track(new Client({ url: relay.ws, token: () => token("bob"), backoff: { min: 10, max: 20 }, slowBackoff: slow }));
  const d2Retries = [];
  d2.on("reconnecting", (r) => d2Retries.push(r));
  await until(() => d2Retries.length >= 2, "d2 to be refused twice");
  for (const r of d2Retries) {
    assert.equal(r.code, 4029);
    assert.ok(r.delay >= slow.min && r.delay <= slow.max, `delay ${r.delay}`);
  }
  d1.close();
  await until(() => d2.state === "connected", "d2 to get in");
  results.fatal = {
    "4001 same token": { sockets: a.stats.sockets, error: aErrors.at(-1).message },
    "4001 new bad tokens": { sockets: b.stats.sockets },
    1009: { sockets: c.stats.sockets, error: cErrors.at(-1).message },
    4029: { delays: d2Retries.map((r) => r.delay) },
  };
  d2.close();
  await relay.stop();
});

test("tokens are refreshed in band before expiry; an expired one is replaced and the stream resumes", async () => {
  const { db, relay } = await setup({ args: ["--jwt-leeway", "0s"] });
  const asked = [];
  const client = track(new Client({
    url: relay.ws,
    token: ({ reason }) => {
      asked.push(reason);
      return token("alice", 3);
    },
    refreshBefore: 1_500,
    ...quick,
  }));
  let authenticated = 0;
  client.on("authenticated", () => authenticated++);
  const sub = client.subscribe("p");
  const got = record(sub);
  await sub.ready();
  await sleep(7_000);
  await insertLoop(pg, db, "p", "bob", 5, 0);
  await until(() => got.ids.length === 5, "messages after the first token expired");
  assert.equal(client.stats.sockets, 1, "the connection outlived its first token");
  assert.ok(authenticated >= 2, `authenticated ${authenticated} times`);
  results.refresh = { asked, authenticated, sockets: client.stats.sockets };
  client.close();

  // A provider that cannot refresh in band: the relay closes with 4002, the
  // SDK asks for a new token, reconnects and resumes from its cursor.
  let current = token("alice", 2);
  const expiring = track(new Client({
    url: relay.ws,
    token: ({ reason }) => (reason === "refused" ? (current = token("alice", 2)) : current),
    ...quick,
  }));
  const sub2 = expiring.subscribe("p");
  const got2 = record(sub2);
  await sub2.ready();
  const writing = insertLoop(pg, db, "p", "bob", 200, 25);
  await writing;
  const expected = (await messageIds(db)).slice(5);
  await until(() => got2.ids.length >= expected.length, "every message across expiries");
  assert.deepEqual(got2.ids, expected);
  assert.ok(expiring.stats.sockets >= 2, "the token expired at least once");
  results.expiry = { ...tally(expected, got2.ids), sockets: expiring.stats.sockets, lastClose: expiring.stats.lastClose };
  expiring.close();
  await relay.stop();
});

test("a bad_request on a subscribe ends exactly that subscription; the others go on", async () => {
  const { db, relay } = await setup();
  const client = track(new Client({ url: relay.ws, token: () => token("alice"), ...quick }));
  const clientErrors = [];
  client.on("error", (e) => clientErrors.push(e));
  const good = client.subscribe("p");
  const got = record(good);
  await good.ready();
  // A project id the relay refuses (over 256 bytes): ready() must reject
  // with the relay's error, not wait forever.
  const long = "x".repeat(300);
  const refused = client.subscribe(long);
  const ended = [];
  refused.on("ended", (e) => ended.push(e));
  const outcome = await Promise.race([
    refused.ready().then(() => "resolved", (e) => e),
    sleep(10_000).then(() => "still pending 10 s after subscribing"),
  ]);
  assert.ok(outcome instanceof SubscriptionError, `ready() gave ${outcome}`);
  assert.equal(outcome.code, "bad_request");
  assert.equal(outcome.project, long);
  assert.ok(outcome.fatal);
  assert.ok(refused.ended);
  assert.deepEqual(ended, [outcome]);
  assert.equal(client.subscriptions.has(long), false, "forgotten: not resubscribed after a reconnect");
  // A stored cursor whose timestamp the relay never sent: a resumed
  // subscription (ready at once, from its cursor) ends the same way.
  const resumed = client.subscribe("q", { cursor: { seq: 3, timestamp: "yesterday" } });
  const resumedEnded = [];
  resumed.on("ended", (e) => resumedEnded.push(e));
  await until(() => resumed.ended, "the resumed subscription with a bad cursor to end", 10_000);
  assert.equal(resumedEnded[0]?.code, "bad_request");
  assert.equal(resumedEnded[0]?.project, "q");
  // The other subscription and the connection go on, and the app saw no
  // client-level error: the errors were the subscriptions'.
  await insertLoop(pg, db, "p", "bob", 5, 0, "after the refusals");
  const expected = await messageIds(db);
  await until(() => got.ids.length >= expected.length, "the messages after the refusals");
  assert.deepEqual(got.ids, expected);
  assert.equal(good.state, "subscribed");
  assert.equal(client.state, "connected");
  assert.equal(client.stats.sockets, 1);
  assert.deepEqual(clientErrors.map((e) => e.message), []);
  results.badRequest = { refused: outcome.code, resumed: resumedEnded[0].code, others: got.ids.length };
});

test("outbox: a 503 while Postgres is down is retried until it succeeds, once", async () => {
  const { db, relay } = await setup();
  const client = track(new Client({ url: relay.ws, token: () => token("alice"), ...quick }));
  const sub = client.subscribe("p");
  const got = record(sub);
  await sub.ready();
  await until(() => client.state === "connected", "connected");
  const outbox = track(new Outbox({ api: new ChatApi({ client }), client, storage: null, backoff: { min: 200, max: 400 }, maxAttempts: 50 }));
  const statuses = [];
  outbox.on("change", (i) => statuses.push(`${i.status}:${i.error?.status ?? ""}`));
  await pg.stop();
  const item = outbox.send("p", "written while the database was down");
  await until(() => item.attempts >= 3, "three failed attempts", 30_000);
  assert.equal(item.status, "pending");
  assert.equal(item.error.status, 503);
  await pg.boot();
  await until(() => item.status === "sent", "the send to succeed", 30_000);
  await until(() => got.ids.length === 1, "its event");
  const rows = await pg.psql(db, `SELECT count(*) FROM chat.messages WHERE client_generated_id = '${item.id}'`);
  assert.deepEqual(rows, ["1"]);
  results.outbox503 = { attempts: item.attempts, statuses: [...new Set(statuses)], rows: Number(rows[0]), events: got.ids.length };
  outbox.stop();
  client.close();
  await relay.stop();
});

test("outbox: 403 and 409 are not retried, and later items still go, in order", async () => {
  const { db, relay } = await setup();
  await pg.psql(db, "INSERT INTO chat.projects (id, name) VALUES ('closed', 'closed')");
  let calls = 0;
  const counting = (...args) => {
    calls++;
    return fetch(...args);
  };
  const api = new ChatApi({ baseUrl: relay.http, token: () => token("alice"), fetch: counting });
  const outbox = track(new Outbox({ api, storage: null, backoff: { min: 50, max: 100 } }));
  const { message } = await api.send("p", "original", "c-orig");
  calls = 0;
  const forbidden = outbox.send("closed", "not a member");
  const stale = outbox.edit({ ...message, version: message.version + 5 }, "edited from a stale copy");
  const last = outbox.send("p", "after the failures");
  await until(() => last.status === "sent", "the last item");
  assert.equal(forbidden.status, "failed");
  assert.equal(forbidden.error.status, 403);
  assert.equal(forbidden.attempts, 1);
  assert.equal(stale.status, "failed");
  assert.equal(stale.error.status, 409);
  assert.equal(stale.error.code, "version_conflict");
  assert.equal(calls, 3, "one request per item");
  results.noRetry = { requests: calls, forbidden: forbidden.error, conflict: stale.error };
  outbox.stop();
  await relay.stop();
});

/** Connected clients of `users`, each subscribed to `p` (with `options`), once subscribed. */
async function subscribers(relay, users, options = {}) {
  const out = [];
  for (const user of users) {
    const client = track(new Client({ url: relay.ws, token: () => token(user), ...quick }));
    out.push({ user, client, sub: client.subscribe("p", options) });
  }
  await until(() => out.every((x) => x.sub.state === "subscribed"), "every client subscribed");
  return out;
}

/** Records the broadcasts a subscription receives. */
function heard(sub) {
  const got = [];
  sub.on("broadcast", (b) => got.push(b));
  return got;
}

test("broadcast: to the others, to oneself, acknowledged, refused with its id, from SQL", async () => {
  const { db, relay } = await setup();
  const [alice, bob] = await subscribers(relay, ["alice", "bob"]);
  const toAlice = heard(alice.sub);
  const toBob = heard(bob.sub);
  const aliceErrors = [];
  alice.sub.on("error", (e) => aliceErrors.push(e));

  // Fire and forget: bob hears it, stamped with alice's id; alice does not.
  assert.equal(alice.sub.broadcast("typing", { draft: "he" }), true);
  await until(() => toBob.length === 1, "bob to hear alice's typing");
  assert.deepEqual(toBob[0], { type: "broadcast", project_id: "p", event: "typing", from: "alice", payload: { draft: "he" } });

  // Acknowledged and to oneself too: the promise resolves, both hear it.
  await alice.sub.broadcast("cursor", [1, 2], { self: true, ack: true });
  await until(() => toAlice.length === 1 && toBob.length === 2, "both to hear the self broadcast");
  assert.deepEqual([toAlice[0].event, toAlice[0].from, toAlice[0].payload], ["cursor", "alice", [1, 2]]);
  assert.equal(toBob[1].event, "cursor");

  // Over the payload limit, acknowledged: rejected with the relay's code and the broadcast's id; no one hears it.
  const big = "x".repeat(7_000);
  const refused = await alice.sub.broadcast("big", big, { ack: true }).then(() => null, (e) => e);
  assert.equal(refused?.name, "SignalError", `got ${refused}`);
  assert.equal(refused.code, "too_large");
  assert.equal(refused.action, "broadcast");
  assert.equal(refused.project, "p");
  assert.match(refused.id, /\S/);
  assert.equal(refused.fatal, false);
  // The same without ack: an error event on the subscription, which goes on.
  assert.equal(alice.sub.broadcast("big", big), true);
  await until(() => aliceErrors.length === 1, "the refusal as an error event");
  assert.deepEqual([aliceErrors[0].name, aliceErrors[0].code, aliceErrors[0].id], ["SignalError", "too_large", null]);
  assert.equal(alice.sub.state, "subscribed");

  // From SQL: `from` is null, everyone subscribed hears it.
  await pg.psql(db, `SELECT relay.broadcast('p', 'ring', '{"call": 7}'::jsonb)`);
  await until(() => toAlice.length === 2 && toBob.length === 3, "the SQL broadcast");
  assert.deepEqual([toBob[2].event, toBob[2].from, toBob[2].payload], ["ring", null, { call: 7 }]);
  // Nothing else arrived: alice never heard her own non-self broadcasts, no one heard the refused ones.
  await sleep(300);
  assert.deepEqual(toAlice.map((b) => b.event), ["cursor", "ring"]);
  assert.deepEqual(toBob.map((b) => b.event), ["typing", "cursor", "ring"]);
  // The acknowledged broadcast of a closed connection is rejected, not left pending.
  const pending = alice.sub.broadcast("late", null, { ack: true });
  alice.client.close();
  await assert.rejects(pending, (e) => e.name === "SignalError" && ["disconnected", "ended"].includes(e.code));
  await assert.rejects(alice.sub.broadcast("after", null, { ack: true }), (e) => e.code === "ended");
  assert.equal(alice.sub.broadcast("after"), false);
  results.broadcast = { bob: toBob.map((b) => `${b.event}:${b.from}`), alice: toAlice.map((b) => b.event), refused: refused.code };
});

test("presence: two tabs of one user join, update and leave; joined again after the relay is killed and restarts", async () => {
  const { db, relay } = await setup();
  const [tab1, tab2, bob] = await subscribers(relay, ["alice", "alice", "bob"], { presence: true });
  const seen = [];
  for (const e of ["join", "update", "leave"]) bob.sub.presence.on(e, (c) => c.user === "alice" && seen.push([e, c.connections.map((x) => x.state.tab).sort().join()]));
  const aliceOnBob = () => (bob.sub.presence.members.get("alice") ?? []).map((c) => JSON.stringify(c.state)).sort().join(" ");

  bob.sub.presence.join({ name: "Bob" });
  tab1.sub.presence.join({ tab: 1 });
  await until(() => aliceOnBob() === `{"tab":1}`, "alice's first tab on bob's list");
  tab2.sub.presence.join({ tab: 2 });
  await until(() => aliceOnBob() === `{"tab":1} {"tab":2}`, "both of alice's tabs");
  tab1.sub.presence.update({ tab: 1, typing: true });
  await until(() => aliceOnBob() === `{"tab":1,"typing":true} {"tab":2}`, "tab 1's new state");
  // Every page sees the same: one user alice with two connections, bob with one.
  await until(() => tab2.sub.presence.members.get("alice")?.length === 2 && tab2.sub.presence.members.get("bob")?.length === 1, "tab 2's list");
  await until(() => tab1.sub.presence.connection !== null, "tab 1's connection key");
  assert.ok(tab1.sub.presence.members.get("alice").some((c) => c.connection === tab1.sub.presence.connection), "tab 1 finds itself by its key");
  tab1.sub.presence.leave();
  await until(() => aliceOnBob() === `{"tab":2}`, "tab 1 gone, alice still online");
  assert.ok(bob.sub.presence.members.has("alice"));
  tab2.client.close(); // the last tab: alice leaves
  await until(() => !bob.sub.presence.members.has("alice"), "alice to leave");
  assert.deepEqual(seen, [["join", "1"], ["update", "1,2"], ["update", "1,2"], ["update", "2"], ["leave", ""]]);
  assert.equal(tab1.sub.state, "subscribed", "leaving the presence kept the subscription");

  // A relay killed and restarted (same address): both clients reconnect, and the
  // SDK joins each again with its last state; no ghost of the killed relay stays.
  tab1.sub.presence.join({ tab: 1, status: "here" });
  tab1.sub.presence.update({ tab: 1, status: "away" });
  await until(() => aliceOnBob() === `{"status":"away","tab":1}` || aliceOnBob() === `{"tab":1,"status":"away"}`, "alice's last state");
  const syncs = { alice: 0, bob: 0 };
  tab1.sub.presence.on("sync", () => syncs.alice++);
  bob.sub.presence.on("sync", () => syncs.bob++);
  const sockets = [tab1.client.stats.sockets, bob.client.stats.sockets];
  await relay.stop("SIGKILL");
  await relay.boot();
  await until(() => tab1.client.stats.sockets > sockets[0] && bob.client.stats.sockets > sockets[1] && syncs.alice > 0 && syncs.bob > 0, "both to resubscribe and get a snapshot");
  const rows = () => pg.psql(db, "SELECT user_id || ' ' || state::text FROM relay.presence WHERE scope = 'p' ORDER BY user_id");
  const expectedRows = [`alice {"tab": 1, "status": "away"}`, `bob {"name": "Bob"}`];
  await until(async () => (await rows()).join() === expectedRows.join(), "relay.presence to hold the two live connections, with their last states", 20_000);
  await until(() => aliceOnBob() !== "" && bob.sub.presence.members.get("bob")?.length === 1 && tab1.sub.presence.members.get("bob")?.length === 1, "both present again on both lists");
  assert.deepEqual(JSON.parse(aliceOnBob()), { tab: 1, status: "away" });
  assert.equal(bob.sub.presence.members.get("alice").length, 1, "one connection of alice: no ghost of the killed relay");
  assert.deepEqual([...bob.sub.presence.members.keys()].sort(), ["alice", "bob"]);
  assert.deepEqual([...tab1.sub.presence.members.keys()].sort(), ["alice", "bob"]);
  results.presence = { aliceOnBob: seen, afterRestart: await rows(), sockets: [tab1.client.stats.sockets, bob.client.stats.sockets] };
});

// ---- resource filters (G10) ---------------------------------------------------

/** A second tracked table, `task`, beside chat's `message`. */
async function trackTasks(db) {
  await pg.psql(
    db,
    `CREATE TABLE public.tasks (id bigserial PRIMARY KEY, project_id text NOT NULL, title text);
     SELECT relay.enable('public.tasks', 'task', 'project_id', 'id')`,
  );
}

/** `n` rounds of one message then two tasks in `p` (each its own transaction), `pauseMs` apart, from psql. */
function mixLoop(db, n, pauseMs = 0, prefix = "m") {
  return pg.psql(
    db,
    `DO $$ BEGIN FOR i IN 1..${n} LOOP
       INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('p', 'bob', '${prefix}' || i); COMMIT;
       INSERT INTO public.tasks (project_id, title) VALUES ('p', 't' || i || 'a'), ('p', 't' || i || 'b'); COMMIT;
       PERFORM pg_sleep(${pauseMs / 1000}); END LOOP; END $$`,
  );
}

/** The seqs of `resources`' events in `p` after `after`, from the log. */
async function seqsOf(db, resources, after) {
  const names = resources.map((r) => `'${r}'`).join(", ");
  return (await pg.psql(db, `SELECT seq FROM relay.events WHERE scope = 'p' AND resource IN (${names}) AND seq > ${after} ORDER BY seq`)).map(Number);
}

async function latestSeq(db) {
  return Number((await pg.psql(db, "SELECT coalesce(max(seq), 0) FROM relay.events WHERE scope = 'p'"))[0]);
}

/**
 * What a filtered subscription hands the app: its events' seqs and
 * resources, every seq it accounted for (an event's, or each of a skipped
 * range's), its `subscribed` infos, and the cursor as an app would store
 * it, after every event and every skipped range.
 */
function view(sub) {
  const v = { seqs: [], resources: [], covered: [], infos: [], stored: null };
  const store = () => (v.stored = JSON.stringify(sub.cursor));
  sub.on("subscribed", (info) => v.infos.push(info));
  sub.on("event", (e) => {
    v.seqs.push(e.seq);
    v.resources.push(e.resource);
    v.covered.push(e.seq);
    store();
  });
  sub.on("skipped", (s) => {
    for (let seq = s.after + 1; seq <= s.seq; seq++) v.covered.push(seq);
    store();
  });
  return v;
}

const seqRange = (from, to) => Array.from({ length: Math.max(0, to - from + 1) }, (_, i) => from + i);

test("a filtered subscription gets exactly its resources, once each, in order, across cuts and a relay restart; skipped moves the stored cursor", async () => {
  const { db, relay } = await setup();
  await trackTasks(db);
  const proxy = track(await Proxy.start(relay.port));
  const client = track(new Client({ url: proxy.ws, token: () => token("alice"), ...quick }));
  const sub = client.subscribe("p", { resources: ["message"] });
  const messages = view(sub);
  // Another view of the project, on its own connection: tasks, and a resource no table is tracked as.
  const other = track(new Client({ url: relay.ws, token: () => token("bob"), ...quick }));
  const tasksSub = other.subscribe("p", { resources: ["task", "invoice"] });
  const tasks = view(tasksSub);
  await Promise.all([sub.ready(), tasksSub.ready()]);
  assert.deepEqual(messages.infos[0].untracked, []);
  assert.deepEqual(tasks.infos[0], { seq: tasksSub.cursor.seq, resources: ["task", "invoice"], untracked: ["invoice"] });
  assert.deepEqual(tasksSub.untracked, ["invoice"]);
  const start = sub.cursor.seq;
  const tasksStart = tasksSub.cursor.seq;

  const writing = mixLoop(db, 150, 10);
  let done = false;
  void writing.finally(() => (done = true));
  let rounds = 0;
  let restartedWhileWriting = false;
  while (!done) {
    await sleep(300);
    proxy.cut();
    if (++rounds === 2) {
      restartedWhileWriting = !done;
      await relay.restart(); // SIGTERM: 1001, both clients resume with their filters
    }
  }
  await writing;
  const latest = await latestSeq(db);
  await until(() => sub.cursor.seq === latest && tasksSub.cursor.seq === latest, "both cursors at the latest event (the last is a task)");
  await sleep(300); // room for a late duplicate to show
  const expected = await seqsOf(db, ["message"], start);
  assert.equal(expected.length, 150);
  assert.deepEqual(messages.seqs, expected, "every message once, in order");
  assert.deepEqual([...new Set(messages.resources)], ["message"], "nothing else");
  assert.deepEqual(messages.covered, seqRange(start + 1, latest), "every seq accounted for once: an event or a skipped range");
  assert.deepEqual(tasks.seqs, await seqsOf(db, ["task"], tasksStart));
  assert.deepEqual([...new Set(tasks.resources)], ["task"]);
  assert.deepEqual(tasks.covered, seqRange(tasksStart + 1, latest));
  assert.ok(sub.stats.skipped >= 150, `skipped ${sub.stats.skipped}`);
  assert.deepEqual(JSON.parse(messages.stored), sub.cursor, "the cursor stored on the last skipped range");
  assert.ok(proxy.cuts >= 3 && client.stats.sockets >= 4, `cuts ${proxy.cuts}, sockets ${client.stats.sockets}`);
  results.filtered = { messages: messages.seqs.length, latest, cuts: proxy.cuts, restartedWhileWriting, sockets: client.stats.sockets, sdk: sub.stats, tasks: tasks.seqs.length };
  client.close();

  // Resumed later, from the stored cursor, on a new connection: every
  // message written meanwhile, once, in order, and nothing else.
  const stored = JSON.parse(messages.stored);
  await mixLoop(db, 20, 0, "while away ");
  const again = track(new Client({ url: relay.ws, token: () => token("alice"), ...quick }));
  const resumed = again.subscribe("p", { resources: ["message"], cursor: stored });
  const later = view(resumed);
  const latest2 = await latestSeq(db);
  await until(() => resumed.cursor?.seq === latest2, "the resumed cursor at the latest event");
  await sleep(300);
  assert.deepEqual(later.seqs, await seqsOf(db, ["message"], stored.seq));
  assert.equal(later.seqs.length, 20);
  assert.deepEqual([...new Set(later.resources)], ["message"]);
  assert.deepEqual(later.covered, seqRange(stored.seq + 1, latest2));
  results.filteredResume = { from: stored.seq, messages: later.seqs.length, latest: latest2, sdk: resumed.stats };
});

test("a collection over a filtered view equals the database, through a trim reset; a filter that leaves it out, or another filter, is refused", async () => {
  const { db, relay } = await setup();
  await trackTasks(db);
  const proxy = track(await Proxy.start(relay.port));
  const client = track(new Client({ url: proxy.ws, token: () => token("alice"), ...quick }));
  const api = new ChatApi({ client });
  const sub = client.subscribe("p", { resources: ["message"] });
  const load = () => api.recentMessages("p", 500);
  const messages = collection(client, "p", "message", { load, sort: (a, b) => a.seq - b.seq });
  assert.equal(messages.subscription, sub, "the collection shares the filtered subscription");
  assert.throws(() => collection(client, "p", "task", { load }), (e) => e instanceof PgRelayError && e.code === "filtered_out");
  assert.throws(() => client.subscribe("p"), (e) => e instanceof PgRelayError && e.code === "filter_conflict");
  assert.throws(() => client.subscribe("p", { resources: [] }), TypeError);
  const got = view(sub);
  const resets = [];
  messages.on("reset", (r) => resets.push(r.reason));
  await mixLoop(db, 20, 0, "before");
  await messages.ready;
  await until(async () => sub.cursor.seq === (await latestSeq(db)) && messages.size === 20, "the first 20 messages");
  // Away while history is written, changed and trimmed: the resume gets a reset.
  proxy.refuse();
  await mixLoop(db, 30, 0, "gap");
  await pg.psql(db, "DELETE FROM chat.messages WHERE body IN ('before1', 'gap1')");
  await pg.psql(db, "UPDATE chat.messages SET body = 'edited', version = version + 1 WHERE body = 'gap2'");
  await pg.psql(db, "SELECT relay.trim(0, '0 seconds', 100000)");
  proxy.allow();
  await until(() => resets.length > 0, "a reset");
  await mixLoop(db, 5, 0, "after");
  const rows = () => pg.psql(db, "SELECT id || ':' || version FROM chat.messages WHERE project_id = 'p' ORDER BY seq");
  const expected = await rows();
  const latest = await latestSeq(db);
  await until(() => !messages.loading && messages.values().map((m) => `${m.id}:${m.version}`).join() === expected.join(), "the collection to equal the database");
  await until(() => sub.cursor.seq === latest, "the cursor at the latest event");
  assert.deepEqual(resets, ["history_trimmed"]);
  assert.deepEqual([...new Set(got.resources)], ["message"], "only messages, before and after the reset");
  assert.equal(expected.length, 53);
  results.filteredCollection = { resets, rows: expected.length, collection: messages.size, sdk: sub.stats };
});
