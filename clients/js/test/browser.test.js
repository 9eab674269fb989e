// The demo page (built on the SDK, served by the relay) in headless
// Chromium: two users in two browser contexts against the real relay
// binary and a private Postgres.

import { test, before, after, afterEach } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync } from "node:fs";
import { chromium } from "playwright-core";
import { Postgres, Relay, seed, token, until, sleep, insertLoop, output } from "./harness.js";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const out = new URL("../test-output/", import.meta.url);
let pg, relay, browser, alice, bob;
const db = "browser";
const results = {};
/** Uncaught errors of any page: each fails the test it happened in. */
const pageErrors = [];

before(async () => {
  if (!existsSync(CHROMIUM)) throw new Error(`${CHROMIUM} not found: apt-get install -y chromium (or set CHROMIUM)`);
  mkdirSync(out, { recursive: true });
  pg = await Postgres.start();
  await pg.psql("postgres", `CREATE DATABASE ${db}`);
  relay = await Relay.start(pg.url(db));
  await seed(pg, db, "demo", ["alice", "bob"]);
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking"] });
  alice = await open("alice");
  bob = await open("bob");
});

afterEach(() => {
  assert.deepEqual(pageErrors.splice(0), [], "errors thrown in a page");
});

after(async () => {
  output("browser-results.json", JSON.stringify(results, null, 2) + "\n");
  await browser?.close();
  await relay?.stop();
  await pg?.close();
});

/** A browser context of its own (storage, network) with the demo page open as `user`. */
async function open(user) {
  const context = await browser.newContext({ viewport: { width: 720, height: 640 } });
  const page = watch(await context.newPage(), user);
  const url = `${relay.http}/?token=${token(user)}`;
  await load(page, url);
  return { user, context, page, url };
}

/** Records the page's uncaught errors in `pageErrors`. */
function watch(page, user) {
  page.on("pageerror", (e) => {
    console.error(`${user}'s page:`, e);
    pageErrors.push(`${user}'s page: ${e.stack ?? e}`);
  });
  return page;
}

async function load(page, url) {
  await page.goto(url);
  await page.waitForFunction(() => window.demo?.client.state === "connected" && !window.demo.messages.loading, null, { timeout: 20_000 });
}

/** What a page shows: message ids in order, and pending sends. */
function shown(page) {
  return page.evaluate(() => ({
    ids: [...document.querySelectorAll("#log .msg[data-id]")].map((e) => e.dataset.id),
    pending: document.querySelectorAll("#log .msg[data-pending]").length,
    events: window.demo.events.slice(),
  }));
}

const dbIds = () => pg.psql(db, "SELECT id FROM chat.messages WHERE project_id = 'demo' ORDER BY seq");

/**
 * Waits (bounded) until the page shows exactly the database's messages, in
 * seq order, each once, and nothing pending; a page that never does fails
 * here. Returns what it shows and the seqs of every event its app got.
 */
async function converged(who, what) {
  let expected;
  let last;
  try {
    await until(async () => {
      expected = await dbIds();
      last = await shown(who.page);
      return last.pending === 0 && last.ids.join() === expected.join();
    }, `${who.user}'s page to show every message (${what})`, 30_000);
  } catch (err) {
    const extra = last?.ids.filter((id) => !expected.includes(id));
    const dups = last?.ids.filter((id, i) => last.ids.indexOf(id) !== i);
    err.message += `: shows ${last?.ids.length} of ${expected.length}, ${last?.pending} pending, extra ${extra}, twice ${dups}`;
    throw err;
  }
  return { shown: last.ids.length, events: last.events };
}

/**
 * The app of `who`'s page got every event since it loaded once, in order,
 * with no gap: each seq one more than the one before (no reset happens in
 * these scenarios, so the stream never jumps). `live`: the scenario wrote
 * while the page was open, so its app must have got events.
 */
function onceInOrder(who, seen, what, { live = true } = {}) {
  const seqs = seen.events;
  const wrong = seqs.findIndex((s, i) => i > 0 && s !== seqs[i - 1] + 1);
  if (live) assert.ok(seqs.length > 0, `${who.user}'s app got no event (${what})`);
  assert.equal(wrong, -1, `${who.user}'s app got seq ${seqs[wrong]} after ${seqs[wrong - 1]} (${what}): ${seqs.join()}`);
  return { shown: seen.shown, events: seqs.length, firstSeq: seqs[0], lastSeq: seqs.at(-1) };
}

/** The ids of the messages whose body starts with `prefix`, in seq order. */
const idsLike = (prefix) => pg.psql(db, `SELECT id FROM chat.messages WHERE body LIKE '${prefix}%' ORDER BY seq`);

async function type(page, texts) {
  for (const t of texts) {
    await page.fill("#text", t);
    await page.press("#text", "Enter");
  }
}

test("the second page opens while psql inserts: every message once, in order", async () => {
  const writing = insertLoop(pg, db, "demo", "bob", 300, 20, "race");
  await until(async () => (await idsLike("race")).length > 0, "psql's first insert");
  await bob.page.close();
  bob.page = watch(await bob.context.newPage(), "bob");
  await load(bob.page, bob.url); // history and live meet mid-stream
  const writtenAtLoad = (await idsLike("race")).length;
  await writing;
  // The page's history load ended while psql was still writing: the rest
  // reached it only as live events, merged with the history it loaded.
  assert.ok(writtenAtLoad < 300, `psql had written all 300 before the page loaded: no race was tested`);
  results.race = {
    writtenAtLoad,
    alice: onceInOrder(alice, await converged(alice, "race"), "race"),
    bob: onceInOrder(bob, await converged(bob, "race"), "race"),
  };
});

test("one page offline while the other sends 50", async () => {
  await alice.context.setOffline(true);
  await until(() => alice.page.evaluate(() => window.demo.client.state !== "connected"), "alice to notice she is offline");
  const texts = Array.from({ length: 50 }, (_, i) => `from bob ${i + 1}`);
  await type(bob.page, texts);
  // Bob's page shows his 50 as sent (nothing pending), each once, in order.
  const bobSees = onceInOrder(bob, await converged(bob, "bob's 50"), "bob's 50");
  const sent = await idsLike("from bob ");
  assert.equal(sent.length, 50);
  // Alice was really offline: none of them reached her page yet.
  const whileOffline = await shown(alice.page);
  assert.deepEqual(sent.filter((id) => whileOffline.ids.includes(id)), [], "alice's offline page got bob's messages");
  await alice.context.setOffline(false);
  // Back online, she resumes from her cursor: the 50 once each, in order, no gap.
  const aliceSees = onceInOrder(alice, await converged(alice, "after coming back"), "after coming back");
  const bodies = await pg.psql(db, "SELECT body FROM chat.messages WHERE body LIKE 'from bob %' ORDER BY seq");
  assert.deepEqual(bodies, texts);
  results.offlineReceiver = { sent: 50, stored: bodies.length, aliceShowedWhileOffline: whileOffline.ids.length, bob: bobSees, alice: aliceSees };
});

test("the relay restarts with both pages open; a send made meanwhile goes once", async () => {
  await relay.stop();
  for (const who of [alice, bob]) {
    await until(() => who.page.evaluate(() => window.demo.client.state !== "connected"), `${who.user} to see the relay go`);
  }
  await insertLoop(pg, db, "demo", "alice", 10, 0, "while the relay was down ");
  await type(bob.page, ["sent while the relay was down"]);
  await relay.boot();
  results.relayRestart = {
    alice: onceInOrder(alice, await converged(alice, "restart"), "restart"),
    bob: onceInOrder(bob, await converged(bob, "restart"), "restart"),
  };
  const rows = await pg.psql(db, "SELECT count(*) FROM chat.messages WHERE body = 'sent while the relay was down'");
  assert.deepEqual(rows, ["1"]);
});

test("sends made offline are delivered once each, in order, after coming back", async () => {
  await alice.context.setOffline(true);
  await until(() => alice.page.evaluate(() => window.demo.client.state !== "connected"), "alice offline");
  const texts = Array.from({ length: 10 }, (_, i) => `offline from alice ${i + 1}`);
  await type(alice.page, texts);
  // Rendering trails the last keystroke by a frame: wait for it (bounded),
  // then check; a page that never shows all ten still fails here.
  let pendingWhileOffline = 0;
  try {
    await until(async () => (pendingWhileOffline = (await shown(alice.page)).pending) >= 10, "ten pending sends shown");
  } finally {
    if (pendingWhileOffline !== 10) await alice.context.setOffline(false);
  }
  assert.equal(pendingWhileOffline, 10, "shown as pending at once");
  assert.deepEqual(await idsLike("offline from alice "), [], "nothing was sent while offline");
  await alice.context.setOffline(false);
  const aliceSees = onceInOrder(alice, await converged(alice, "alice's offline sends"), "alice's offline sends");
  const bobSees = onceInOrder(bob, await converged(bob, "alice's offline sends"), "alice's offline sends");
  const bodies = await pg.psql(db, "SELECT body FROM chat.messages WHERE body LIKE 'offline from alice %' ORDER BY seq");
  assert.deepEqual(bodies, texts);
  // Bob's page is visible, so it marks them read: alice's ticks follow.
  await alice.page.waitForFunction(() => document.querySelector("#log .msg.mine:last-child .ticks.read"), null, { timeout: 20_000 });
  results.offlineSender = { sent: 10, pendingWhileOffline, stored: bodies.length, alice: aliceSees, bob: bobSees, readTicks: true };
});

test("a reload with pending sends sends each once", async () => {
  // The first POST reaches the relay but its answer never reaches the page.
  let held = 0;
  await alice.page.route("**/v1/projects/demo/messages", async (route) => {
    if (route.request().method() !== "POST") return route.continue();
    held++;
    await route.fetch().catch(() => {});
    // never fulfilled: the page is reloaded while it waits
  });
  const texts = Array.from({ length: 5 }, (_, i) => `before reload ${i + 1}`);
  await type(alice.page, texts);
  await until(async () => (await pg.psql(db, "SELECT count(*) FROM chat.messages WHERE body LIKE 'before reload %'"))[0] === "1", "the first send to reach the database");
  // The first is stored and its event shows it once (its answer withheld,
  // its outbox item still unfinished); the four queued behind it, one send
  // at a time, are shown pending when the page goes.
  const [first] = await idsLike("before reload ");
  let beforeReload = { pending: 0, ids: [] };
  await until(async () => {
    beforeReload = await shown(alice.page);
    return beforeReload.pending >= 4 && beforeReload.ids.includes(first);
  }, "the first shown from its event, four pending").catch(() => {});
  await alice.page.unroute("**/v1/projects/demo/messages");
  const pendingBeforeReload = beforeReload.pending;
  assert.equal(pendingBeforeReload, 4, "pending before the reload");
  assert.equal(beforeReload.ids.filter((id) => id === first).length, 1, "the first message shown once before the reload");
  assert.equal(held, 1, "one POST, its answer withheld, before the reload");
  await load(alice.page, alice.url);
  // The reloaded page sends from its stored outbox: the first again (the
  // relay knows it by its client_generated_id), then the other four.
  // (They may all be stored before the reloaded page has its cursor: then
  // its history brings them and no event follows.)
  const aliceSees = onceInOrder(alice, await converged(alice, "after the reload"), "after the reload", { live: false });
  const bodies = await pg.psql(db, "SELECT body FROM chat.messages WHERE body LIKE 'before reload %' ORDER BY seq");
  assert.deepEqual(bodies, texts, "each once, in order");
  results.reloadWithPending = { sent: 5, answersWithheld: held, pendingBeforeReload, stored: bodies.length, alice: aliceSees };
});

test("edits and deletes reach the other page; a version conflict is shown", async () => {
  const mine = async () => alice.page.locator("#log .msg.mine").last();
  await (await mine()).getByRole("button", { name: "edit" }).click();
  await alice.page.fill("#text", "edited in the page");
  await alice.page.press("#text", "Enter");
  await bob.page.waitForFunction(() => [...document.querySelectorAll("#log .msg .body")].some((b) => b.textContent === "edited in the page"), null, { timeout: 20_000 });
  // Start an edit, let someone else change the message first, then save.
  await (await mine()).getByRole("button", { name: "edit" }).click();
  await pg.psql(db, "UPDATE chat.messages SET body = 'changed elsewhere', version = version + 1 WHERE body = 'edited in the page'");
  await alice.page.fill("#text", "my stale edit");
  await alice.page.press("#text", "Enter");
  await alice.page.waitForFunction(() => document.getElementById("notice").textContent.includes("conflict"), null, { timeout: 20_000 });
  await alice.page.waitForFunction(() => [...document.querySelectorAll("#log .msg .body")].some((b) => b.textContent === "changed elsewhere"), null, { timeout: 20_000 });
  // Delete: gone from bob's page as a tombstone.
  const before = await pg.psql(db, "SELECT id FROM chat.messages WHERE body = 'before reload 4'");
  await alice.page.locator(`#log .msg[data-id="${before[0]}"]`).getByRole("button", { name: "delete" }).click();
  await bob.page.waitForFunction((id) => document.querySelector(`#log .msg[data-id="${id}"] .body`)?.textContent === "(deleted)", before[0], { timeout: 20_000 });
  const notice = await alice.page.textContent("#notice");
  results.editDelete = { conflictShown: notice };
  await alice.page.evaluate(() => (document.getElementById("log").scrollTop = 1e9));
  await alice.page.screenshot({ path: new URL("demo.png", out).pathname });
});

/** The users a page shows online, and its "… is typing" line. */
const online = (who) => who.page.evaluate(() => document.getElementById("online").textContent);
const typingLine = (who) => who.page.evaluate(() => document.getElementById("typing").textContent);

test("who is online and \"… is typing\"; a closed page leaves", async () => {
  // Both pages show both users online (each page joined the presence).
  for (const who of [alice, bob]) {
    await until(async () => (await online(who)) === "alice, bob", `${who.user}'s page to show alice and bob online`);
  }
  assert.equal(await typingLine(alice), "");
  // Bob types for ~6 s: alice's page shows it all along, from typing
  // broadcasts sent at most once every 2 s.
  const heardBefore = await alice.page.evaluate(() => window.demo.typingHeard);
  const started = Date.now();
  let shownAt = null;
  let gaps = 0;
  await bob.page.focus("#text");
  while (Date.now() - started < 6_000) {
    await bob.page.keyboard.type("x");
    const line = await typingLine(alice);
    if (line === "bob is typing…") shownAt ??= Date.now();
    else if (shownAt !== null) gaps++;
    await sleep(250);
  }
  const typedFor = Date.now() - started;
  const heard = (await alice.page.evaluate(() => window.demo.typingHeard)) - heardBefore;
  assert.ok(shownAt !== null, "alice's page never showed \"bob is typing…\"");
  assert.equal(gaps, 0, "the typing line went away while bob kept typing");
  assert.ok(heard >= 2, `one typing broadcast heard in ${typedFor} ms of typing: not kept alive`);
  assert.ok(heard <= Math.floor(typedFor / 2_000) + 1, `${heard} typing broadcasts in ${typedFor} ms: not throttled to one per 2 s`);
  assert.equal(await typingLine(bob), "", "bob's own typing is not shown to him");
  await alice.page.screenshot({ path: new URL("demo.png", out).pathname });
  // Silence: the line clears after a few seconds (bounded here, generously).
  const stopped = Date.now();
  await until(async () => (await typingLine(alice)) === "", "the typing line to clear after bob stopped", 15_000);
  const clearedAfter = Date.now() - stopped;
  // Bob's page closes: its socket closes and he leaves alice's list at once (bounded generously).
  await bob.page.close();
  const closed = Date.now();
  await until(async () => (await online(alice)) === "alice", "bob to leave alice's online list", 15_000);
  results.presenceAndTyping = { typedForMs: typedFor, typingBroadcastsHeard: heard, clearedAfterMs: clearedAfter, leftAfterMs: Date.now() - closed };
});
