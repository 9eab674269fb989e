// The demo page (built on the SDK, served by the relay) in headless
// Chromium: two users in two browser contexts against the real relay
// binary and a private Postgres.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync } from "node:fs";
import { chromium } from "playwright-core";
import { Postgres, Relay, seed, token, until, sleep, insertLoop, tally, output } from "./harness.js";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const out = new URL("../test-output/", import.meta.url);
let pg, relay, browser, alice, bob;
const db = "browser";
const results = {};

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

after(async () => {
  output("browser-results.json", JSON.stringify(results, null, 2) + "\n");
  await browser?.close();
  await relay?.stop();
  await pg?.close();
});

/** A browser context of its own (storage, network) with the demo page open as `user`. */
async function open(user) {
  const context = await browser.newContext({ viewport: { width: 720, height: 640 } });
  const page = await context.newPage();
  page.on("pageerror", (e) => console.error(`${user}'s page:`, e));
  const url = `${relay.http}/?token=${token(user)}`;
  await load(page, url);
  return { user, context, page, url };
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

/** Waits until the page shows exactly the database's messages and nothing pending; returns the tally. */
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
  const seqs = last.events;
  const ordered = seqs.every((s, i) => i === 0 || s > seqs[i - 1]);
  return { ...tally(expected, last.ids), appEventsInOrderOnce: ordered && new Set(seqs).size === seqs.length };
}

async function type(page, texts) {
  for (const t of texts) {
    await page.fill("#text", t);
    await page.press("#text", "Enter");
  }
}

test("the second page opens while psql inserts: every message once, in order", async () => {
  const writing = insertLoop(pg, db, "demo", "bob", 300, 5, "race");
  await sleep(300);
  await bob.page.close();
  bob.page = await bob.context.newPage();
  await load(bob.page, bob.url); // history and live meet mid-stream
  await writing;
  results.race = { alice: await converged(alice, "race"), bob: await converged(bob, "race") };
  for (const r of Object.values(results.race)) {
    assert.equal(r.duplicates + r.outOfOrder + r.missing, 0);
    assert.ok(r.appEventsInOrderOnce);
  }
});

test("one page offline while the other sends 50", async () => {
  await alice.context.setOffline(true);
  await until(() => alice.page.evaluate(() => window.demo.client.state !== "connected"), "alice to notice she is offline");
  const texts = Array.from({ length: 50 }, (_, i) => `from bob ${i + 1}`);
  await type(bob.page, texts);
  const bobSees = await converged(bob, "bob's 50");
  await alice.context.setOffline(false);
  const aliceSees = await converged(alice, "after coming back");
  const bodies = await pg.psql(db, "SELECT body FROM chat.messages WHERE body LIKE 'from bob %' ORDER BY seq");
  results.offlineReceiver = { sent: 50, stored: bodies.length, storedInOrder: bodies.join() === texts.join(), bob: bobSees, alice: aliceSees };
  assert.deepEqual(bodies, texts);
  assert.equal(aliceSees.duplicates + aliceSees.outOfOrder + aliceSees.missing, 0);
});

test("the relay restarts with both pages open; a send made meanwhile goes once", async () => {
  await relay.stop();
  await until(() => bob.page.evaluate(() => window.demo.client.state !== "connected"), "bob to see the relay go");
  await insertLoop(pg, db, "demo", "alice", 10, 0, "while the relay was down ");
  await type(bob.page, ["sent while the relay was down"]);
  await relay.boot();
  results.relayRestart = { alice: await converged(alice, "restart"), bob: await converged(bob, "restart") };
  const rows = await pg.psql(db, "SELECT count(*) FROM chat.messages WHERE body = 'sent while the relay was down'");
  assert.deepEqual(rows, ["1"]);
  for (const r of Object.values(results.relayRestart)) assert.equal(r.duplicates + r.outOfOrder + r.missing, 0);
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
  await alice.context.setOffline(false);
  const aliceSees = await converged(alice, "alice's offline sends");
  const bobSees = await converged(bob, "alice's offline sends");
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
  const pendingBeforeReload = (await shown(alice.page)).pending;
  await alice.page.unroute("**/v1/projects/demo/messages");
  await load(alice.page, alice.url);
  const aliceSees = await converged(alice, "after the reload");
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
