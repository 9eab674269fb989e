// The test harness: a private Postgres, the relay binary as a process, a
// TCP proxy that can cut connections, tokens. Real parts only: no mock of
// the relay or the database.

import { spawn, execFile } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, chownSync, writeFileSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { promisify } from "node:util";
import { fileURLToPath } from "node:url";

const run = promisify(execFile);

// Node 20 has a WebSocket with --experimental-websocket (22 without); older
// ones get the `ws` package's, which the SDK accepts as well.
if (typeof globalThis.WebSocket !== "function") globalThis.WebSocket = (await import("ws")).WebSocket;
const here = fileURLToPath(new URL(".", import.meta.url));
export const SECRET = "js-test-secret-of-enough-bytes";

/** Every process started here, stopped when the test process exits whatever happens. */
const children = new Set();
function reap() {
  for (const c of children) {
    try {
      c.kill("SIGKILL");
    } catch {}
  }
}
process.on("exit", reap);
for (const sig of ["SIGINT", "SIGTERM"]) {
  process.on(sig, () => {
    reap();
    process.exit(1);
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Waits until `check()` is truthy (polling), or throws `what` after `ms`. */
export async function until(check, what, ms = 20_000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await check();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(50);
  }
}

export async function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.unref();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

// ---- Postgres ----------------------------------------------------------------

function pgBinDir() {
  for (const dir of (process.env.PATH ?? "").split(":")) {
    if (dir && existsSync(join(dir, "initdb")) && existsSync(join(dir, "postgres"))) return dir;
  }
  const root = "/usr/lib/postgresql";
  if (existsSync(root)) {
    const versions = readdirSync(root)
      .filter((v) => existsSync(join(root, v, "bin", "initdb")))
      .sort((a, b) => Number(b) - Number(a));
    if (versions.length) return join(root, versions[0], "bin");
  }
  throw new Error("PostgreSQL server binaries not found (Debian/Ubuntu: apt-get install postgresql)");
}

/** The uid/gid to run Postgres as: the `postgres` user when we are root (Postgres refuses root). */
function serverUser() {
  if (process.getuid?.() !== 0) return {};
  const line = readFileSync("/etc/passwd", "utf8")
    .split("\n")
    .find((l) => l.startsWith("postgres:"));
  if (!line) throw new Error("running as root without a `postgres` user to run the server as");
  const [, , uid, gid] = line.split(":");
  return { uid: Number(uid), gid: Number(gid) };
}

export class Postgres {
  static async start() {
    const pg = new Postgres();
    pg.bin = pgBinDir();
    pg.user = serverUser();
    pg.dir = mkdtempSync(join(tmpdir(), "pgrelay-js-pg-"));
    if (pg.user.uid !== undefined) chownSync(pg.dir, pg.user.uid, pg.user.gid);
    pg.data = join(pg.dir, "data");
    await run(join(pg.bin, "initdb"), ["-D", pg.data, "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"], {
      ...pg.user,
      cwd: pg.dir,
    });
    pg.port = await freePort();
    await pg.boot();
    return pg;
  }

  async boot() {
    const args = ["-D", this.data, "-p", String(this.port), "-k", this.dir, "-c", "listen_addresses=127.0.0.1"];
    for (const s of ["fsync=off", "synchronous_commit=off", "full_page_writes=off", "max_connections=200"]) args.push("-c", s);
    rmSync(join(this.data, "postmaster.pid"), { force: true });
    const child = spawn(join(this.bin, "postgres"), args, { ...this.user, cwd: this.dir, stdio: ["ignore", "ignore", "pipe"] });
    let log = "";
    child.stderr.on("data", (d) => (log = (log + d).slice(-4000)));
    children.add(child);
    child.on("exit", () => children.delete(child));
    this.child = child;
    await until(async () => {
      if (child.exitCode !== null) throw new Error(`postgres exited: ${log}`);
      try {
        await this.psql("postgres", "SELECT 1");
        return true;
      } catch {
        return false;
      }
    }, "postgres to accept connections", 30_000);
  }

  /** Fast shutdown: what a database outage looks like to the relay. */
  async stop() {
    const child = this.child;
    if (!child || child.exitCode !== null) return;
    const exited = new Promise((r) => child.once("exit", r));
    child.kill("SIGINT");
    await exited;
  }

  async close() {
    await this.stop();
    rmSync(this.dir, { recursive: true, force: true });
  }

  url(db) {
    return `postgresql://postgres@127.0.0.1:${this.port}/${db}`;
  }

  /** Runs SQL with psql; resolves with its unaligned output, rows split. */
  async psql(db, sql) {
    const { stdout } = await run("psql", ["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", this.url(db), "-c", sql], {
      maxBuffer: 64 << 20,
    });
    return stdout.split("\n").filter((l) => l !== "");
  }

  /** A fresh database with a project and its members. */
  async database(name, project, members) {
    await this.psql("postgres", `CREATE DATABASE ${name}`);
    return { name, url: this.url(name), project, members };
  }
}

/** Creates the chat project and members (after the relay migrated the database). */
export async function seed(pg, db, project, members) {
  await pg.psql(db, `INSERT INTO chat.projects (id, name) VALUES ('${project}', '${project}')`);
  for (const m of members) {
    await pg.psql(db, `INSERT INTO chat.project_members (project_id, user_id) VALUES ('${project}', '${m}')`);
  }
}

// ---- the relay ----------------------------------------------------------------

export function relayBinary() {
  const bin = process.env.PGRELAY_BIN ?? resolve(here, "../../../target/debug/pgrelay");
  if (!existsSync(bin)) throw new Error(`relay binary ${bin} not found: run \`cargo build\` or set PGRELAY_BIN`);
  return bin;
}

export class Relay {
  /**
   * Starts `pgrelay serve` against `databaseUrl` and waits for `/healthz`.
   * @param {string} databaseUrl
   * @param {{port?: number, args?: string[], env?: Record<string, string>}} [opts]
   */
  static async start(databaseUrl, opts = {}) {
    const relay = new Relay();
    relay.databaseUrl = databaseUrl;
    relay.port = opts.port ?? (await freePort());
    relay.args = opts.args ?? [];
    relay.env = opts.env ?? {};
    await relay.boot();
    return relay;
  }

  get http() {
    return `http://127.0.0.1:${this.port}`;
  }

  get ws() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  async boot() {
    const child = spawn(relayBinary(), ["serve", "--listen", `127.0.0.1:${this.port}`, "--no-retention", "--chat", ...this.args], {
      env: { ...process.env, DATABASE_URL: this.databaseUrl, PGRELAY_JWT_SECRET: SECRET, RUST_LOG: "warn", NO_COLOR: "1", ...this.env },
      stdio: ["ignore", "ignore", "pipe"],
    });
    let log = "";
    child.stderr.on("data", (d) => (log = (log + d).slice(-4000)));
    children.add(child);
    child.on("exit", () => children.delete(child));
    this.child = child;
    this.log = () => log;
    await until(async () => {
      if (child.exitCode !== null) throw new Error(`the relay exited (${child.exitCode}): ${log}`);
      try {
        return (await fetch(`${this.http}/healthz`)).status === 200;
      } catch {
        return false;
      }
    }, "the relay to be ready", 30_000);
  }

  /** SIGTERM: the relay closes every socket with 1001 and exits. */
  async stop(signal = "SIGTERM") {
    const child = this.child;
    if (!child || child.exitCode !== null) return;
    const exited = new Promise((r) => child.once("exit", r));
    child.kill(signal);
    await exited;
  }

  async restart() {
    await this.stop();
    await this.boot();
  }
}

// ---- tokens -------------------------------------------------------------------

const b64url = (buf) => Buffer.from(buf).toString("base64url");

/** An HS256 token for `user`, valid for `ttlSeconds`. */
export function token(user, ttlSeconds = 3600, secret = SECRET) {
  const now = Math.floor(Date.now() / 1000);
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify({ sub: user, iat: now, exp: now + ttlSeconds, jti: Math.random().toString(36).slice(2) }));
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

// ---- a TCP proxy that can cut connections -----------------------------------------

export class Proxy {
  /** @param {number} targetPort */
  static async start(targetPort) {
    const p = new Proxy();
    p.target = targetPort;
    p.sockets = new Set();
    p.refusing = false;
    p.cuts = 0;
    p.server = net.createServer((client) => {
      if (p.refusing) return client.destroy();
      const upstream = net.connect(p.target, "127.0.0.1");
      for (const s of [client, upstream]) {
        p.sockets.add(s);
        s.on("close", () => p.sockets.delete(s));
        s.on("error", () => {});
      }
      client.pipe(upstream);
      upstream.pipe(client);
      client.on("close", () => upstream.destroy());
      upstream.on("close", () => client.destroy());
    });
    p.port = await new Promise((r) => p.server.listen(0, "127.0.0.1", () => r(p.server.address().port)));
    return p;
  }

  get ws() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  /** Drops every connection at once, with no close frame (what a network loss looks like). */
  cut() {
    this.cuts++;
    for (const s of this.sockets) s.destroy();
  }

  /** Cuts and refuses new connections until `allow()`. */
  refuse() {
    this.refusing = true;
    this.cut();
  }

  allow() {
    this.refusing = false;
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    this.cut();
    this.server.close();
  }
}

/** Inserts `n` messages, one transaction each, `pauseMs` apart, from psql. */
export function insertLoop(pg, db, project, sender, n, pauseMs = 2, prefix = "m") {
  const sql = `DO $$ BEGIN FOR i IN 1..${n} LOOP
      INSERT INTO chat.messages (project_id, sender_id, body) VALUES ('${project}', '${sender}', '${prefix}' || i);
      COMMIT; PERFORM pg_sleep(${pauseMs / 1000}); END LOOP; END $$`;
  return pg.psql(db, sql);
}

/** Writes `text` to test-output/NAME (for the report). */
export function output(name, text) {
  writeFileSync(resolve(here, "../test-output", name), text);
}

/**
 * Sent vs received: how many of `expected` (ordered) arrived, duplicates,
 * out-of-order arrivals, and whether the two lists are identical.
 */
export function tally(expected, received) {
  const seen = new Set();
  let duplicates = 0;
  let outOfOrder = 0;
  let last = -Infinity;
  const index = new Map(expected.map((v, i) => [v, i]));
  for (const v of received) {
    if (seen.has(v)) duplicates++;
    seen.add(v);
    const i = index.get(v) ?? -1;
    if (i < last) outOfOrder++;
    last = Math.max(last, i);
  }
  const missing = expected.filter((v) => !seen.has(v)).length;
  return { sent: expected.length, received: received.length, missing, duplicates, outOfOrder };
}
