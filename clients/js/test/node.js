// Starts real Herald nodes (the binary in HERALD_BIN) and, for cluster
// tests, a private redis-server, for the client tests; signs their tokens.
import { spawn } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { mkdtempSync, writeFileSync } from "node:fs";
import { connect, createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

// Drawn at random for each run: no secret written in Herald's files starts
// a node.
export const SECRET = randomBytes(32).toString("base64");

const b64url = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");

/** An HS256 token for the test secret. */
export function token(claims) {
  const body = { exp: Math.floor(Date.now() / 1000) + 3600, ...claims };
  const unsigned = `${b64url({ alg: "HS256", typ: "JWT" })}.${b64url(body)}`;
  const signature = createHmac("sha256", SECRET).update(unsigned).digest("base64url");
  return `${unsigned}.${signature}`;
}

export const subscriber = (claims = {}) => token({ sub: "js-sub", topics: [">"], ...claims });
export const publisher = () => token({ sub: "js-pub", publish: [">"] });

async function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
    server.on("error", reject);
  });
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Polls `check` until it holds (at most `ms`). */
export async function eventually(what, check, ms = 10000) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (await check()) return;
    await sleep(25);
  }
  throw new Error(`timed out waiting until ${what}`);
}

/** One node with its own SQLite store, unless `env` names others (e.g.
 * HERALD__STORE__URL), with `config` (TOML) as its settings file when
 * given; `restart()` keeps port and store. */
export class Node {
  static async start(env = {}, config = undefined) {
    const bin = process.env.HERALD_BIN;
    if (!bin) throw new Error("set HERALD_BIN to the herald binary (cargo test does)");
    const dir = mkdtempSync(join(tmpdir(), "herald-js-"));
    if (config !== undefined) writeFileSync(join(dir, "herald.toml"), config);
    const node = new Node(bin, await freePort(), dir, env, config !== undefined);
    await node.restart();
    return node;
  }

  constructor(bin, port, dir, env, config) {
    this.bin = bin;
    this.port = port;
    this.dir = dir;
    this.env = env;
    this.config = config;
    this.url = `ws://127.0.0.1:${port}/ws`;
    this.http = `http://127.0.0.1:${port}`;
  }

  async restart() {
    this.child = spawn(this.bin, this.config ? ["serve", "--config", "herald.toml"] : ["serve"], {
      cwd: this.dir,
      env: {
        ...process.env,
        HERALD__AUTH__JWT_SECRET: SECRET,
        HERALD__SERVER__BIND: `127.0.0.1:${this.port}`,
        RUST_LOG: "warn",
        ...this.env,
      },
      stdio: ["ignore", "ignore", "inherit"],
    });
    await eventually("the node answers", async () => {
      try {
        return (await fetch(`${this.http}/healthz`)).ok;
      } catch {
        return false;
      }
    });
  }

  /** Kills the process at once (SIGKILL) and waits for it to exit. */
  async kill() {
    const exited = new Promise((resolve) => this.child.once("exit", resolve));
    this.child.kill("SIGKILL");
    await exited;
  }

  async stop() {
    if (this.child.exitCode === null && this.child.signalCode === null) {
      const exited = new Promise((resolve) => this.child.once("exit", resolve));
      this.child.kill("SIGTERM");
      await exited;
    }
  }

  /** Publishes over HTTP and returns the offset. */
  async publish(topic, data) {
    const response = await fetch(`${this.http}/api/v1/topics/${topic}/events`, {
      method: "POST",
      headers: { authorization: `Bearer ${publisher()}`, "content-type": "application/json" },
      body: JSON.stringify(data),
    });
    if (response.status !== 201) throw new Error(`publish answered ${response.status}`);
    return (await response.json()).offset;
  }
}

/** A redis-server of the test's own on a free port, keeping nothing on
 * disk: `restart()` brings it back on the same port, empty. */
export class Redis {
  static async start() {
    const redis = new Redis(await freePort());
    await redis.restart();
    return redis;
  }

  constructor(port) {
    this.port = port;
    this.url = `redis://127.0.0.1:${port}`;
  }

  async restart() {
    this.child = spawn("redis-server", ["--port", `${this.port}`, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], {
      stdio: "ignore",
    });
    await eventually("redis-server answers", () =>
      new Promise((resolve) => {
        const socket = connect(this.port, "127.0.0.1");
        socket.once("connect", () => (socket.destroy(), resolve(true)));
        socket.once("error", () => resolve(false));
      }),
    );
  }

  async kill() {
    if (this.child.exitCode === null && this.child.signalCode === null) {
      const exited = new Promise((resolve) => this.child.once("exit", resolve));
      this.child.kill("SIGKILL");
      await exited;
    }
  }
}

/** A TCP proxy in front of a node that refuses WebSocket upgrades (403,
 * or no answer at all when `hanging`) while `refusing` is true, as some
 * corporate proxies do; every other request passes through untouched. */
export class UpgradeRefusingProxy {
  static async start(targetPort) {
    const proxy = new UpgradeRefusingProxy(targetPort);
    await new Promise((resolve) => proxy.server.listen(0, "127.0.0.1", resolve));
    proxy.port = proxy.server.address().port;
    proxy.url = `ws://127.0.0.1:${proxy.port}/ws`;
    return proxy;
  }

  constructor(targetPort) {
    this.refusing = true;
    /** Leave refused upgrades unanswered rather than answer 403. */
    this.hanging = false;
    this.refused = 0;
    this.sockets = new Set();
    this.server = createServer((client) => {
      this.sockets.add(client);
      client.on("close", () => this.sockets.delete(client));
      client.on("error", () => client.destroy());
      client.once("data", (first) => {
        if (this.refusing && /^upgrade:\s*websocket/im.test(first.toString("latin1"))) {
          this.refused += 1;
          // Some proxies never answer at all.
          if (this.hanging) return;
          const body = "WebSocket is not allowed here.\n";
          client.end(`HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: ${body.length}\r\nconnection: close\r\n\r\n${body}`);
          return;
        }
        const upstream = connect(targetPort, "127.0.0.1");
        this.sockets.add(upstream);
        upstream.on("close", () => (this.sockets.delete(upstream), client.destroy()));
        upstream.on("error", () => upstream.destroy());
        client.on("close", () => upstream.destroy());
        upstream.write(first);
        client.pipe(upstream);
        upstream.pipe(client);
      });
    });
  }

  async close() {
    for (const socket of this.sockets) socket.destroy();
    await new Promise((resolve) => this.server.close(resolve));
  }
}
