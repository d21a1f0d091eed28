// The console page in headless Chromium against a real `herald serve --dev`:
// it connects, shows an event published over HTTP, and after the node is
// restarted while events are published it shows every missed event once,
// in order. Screenshots are kept in HERALD_TEST_ARTIFACTS (the build
// folder's test-env/artifacts under scripts/test.sh).
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { chromium } from "playwright-core";

import { UpgradeRefusingProxy } from "../../clients/js/test/node.js";

const ARTIFACTS = process.env.HERALD_TEST_ARTIFACTS ?? mkdtempSync(join(tmpdir(), "herald-browser-artifacts-"));
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";

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

/** `herald serve --dev` in `dir` on `port`; resolves with its banner lines. */
function startDev(dir, port) {
  const bin = process.env.HERALD_BIN;
  if (!bin) throw new Error("set HERALD_BIN to the herald binary (cargo test does)");
  const child = spawn(bin, ["serve", "--dev"], {
    cwd: dir,
    env: { ...process.env, HERALD__SERVER__BIND: `127.0.0.1:${port}`, RUST_LOG: "warn" },
    stdio: ["ignore", "pipe", "inherit"],
  });
  return new Promise((resolve, reject) => {
    let out = "";
    child.stdout.on("data", (chunk) => {
      out += chunk;
      if (out.includes("More tokens:")) resolve({ child, banner: out.split("\n") });
    });
    child.once("exit", (code) => reject(new Error(`herald exited with ${code}`)));
  });
}

const after_ = (banner, heading) => banner[banner.findIndex((l) => l.startsWith(heading)) + 1].trim();

let browser;
let node;
let dir;
let port;

before(async () => {
  dir = mkdtempSync(join(tmpdir(), "herald-browser-"));
  port = await freePort();
  node = await startDev(dir, port);
  // A fresh profile every run (Playwright's way to pass --user-data-dir).
  browser = await chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), "herald-chromium-")), {
    executablePath: CHROMIUM,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
});

after(async () => {
  await browser?.close();
  node?.child.kill("SIGTERM");
});

async function publish(publisher, topic, data) {
  const response = await fetch(`http://127.0.0.1:${port}/api/v1/topics/${topic}/events`, {
    method: "POST",
    headers: { authorization: `Bearer ${publisher}`, "content-type": "application/json" },
    body: JSON.stringify(data),
  });
  assert.equal(response.status, 201);
  return (await response.json()).offset;
}

const offsetsOnPage = (page) =>
  page.$$eval("#events tr", (rows) => rows.map((r) => Number(r.dataset.offset)).reverse());

test("the console shows live events and every event missed across a node restart, once, in order", async () => {
  const consoleUrl = after_(node.banner, "Console");
  const publisher = after_(node.banner, "Publisher token");
  const page = await browser.newPage();
  await page.goto(consoleUrl);
  await page.waitForSelector('#state[data-state="open"]');

  await page.fill("#topic", "alerts");
  await page.click("#subscribe-form button");
  // The page's own publish (same connection, answered after the subscribe).
  await page.fill("#publish-topic", "alerts");
  await page.click("#publish-form button");
  await page.waitForSelector("text=Published at offset 1.");
  await page.waitForSelector('#events tr[data-offset="1"]');

  // An event published with curl-style HTTP appears.
  assert.equal(await publish(publisher, "alerts", { from: "http" }), 2);
  await page.waitForSelector('#events tr[data-offset="2"]');
  assert.match(await page.textContent('#events tr[data-offset="2"] td.payload'), /http/);

  // A refused topic gets no chip; its reason shows by the subscribe form.
  await page.fill("#topic", "bad..topic");
  await page.click("#subscribe-form button");
  await page.waitForSelector("#subscribe-notice:has-text('bad..topic')");
  assert.deepEqual(await page.$$eval("#topics .chip", (chips) => chips.map((c) => c.firstChild.textContent)), ["alerts"]);
  // The page has its icon.
  assert.equal((await fetch(`http://127.0.0.1:${port}/favicon.ico`)).status, 200);

  // Restart the node, after several seconds down (the page retries
  // against a refused port meanwhile), while events keep being published.
  node.child.kill("SIGKILL");
  await new Promise((resolve) => node.child.once("exit", resolve));
  await page.waitForSelector('#state[data-state="reconnecting"]');
  await new Promise((resolve) => setTimeout(resolve, 3000));
  node = await startDev(dir, port);
  await publish(publisher, "alerts", { n: 3 });
  await publish(publisher, "alerts", { n: 4 });
  await page.waitForSelector('#state[data-state="open"]');
  await publish(publisher, "alerts", { n: 5 });
  await page.waitForSelector('#events tr[data-offset="5"]');
  assert.deepEqual(await offsetsOnPage(page), [1, 2, 3, 4, 5]);

  mkdirSync(ARTIFACTS, { recursive: true });
  await page.screenshot({ path: join(ARTIFACTS, "console.png"), fullPage: true });
});

test("two tabs see who is in a topic live, one user in two tabs counts once", async () => {
  const consoleUrl = after_(node.banner, "Console");
  const subscriber = after_(node.banner, "Subscriber token");
  const enter = async (url) => {
    const page = await browser.newPage();
    await page.goto(url);
    await page.waitForSelector('#state[data-state="open"]');
    await page.fill("#topic", "room.lobby");
    await page.check("#presence");
    await page.click("#subscribe-form button");
    return page;
  };
  const members = (page) => page.$$eval('.room[data-topic="room.lobby"] li', (items) => items.map((i) => i.dataset.sub));
  // Two tabs of the console's user: one member.
  const first = await enter(consoleUrl);
  const second = await enter(consoleUrl);
  for (const page of [first, second]) {
    await page.waitForSelector("text=Who is in room.lobby: 1 member");
    assert.deepEqual(await members(page), ["dev-console"]);
  }
  // Another user (the subscriber token) in a third tab: both tabs see it.
  const other = await enter(consoleUrl.replace(/#token=.*/, `#token=${subscriber}`));
  for (const page of [first, second, other]) {
    await page.waitForSelector("text=Who is in room.lobby: 2 members");
    assert.deepEqual((await members(page)).sort(), ["dev-console", "dev-subscriber"]);
  }
  mkdirSync(ARTIFACTS, { recursive: true });
  await first.screenshot({ path: join(ARTIFACTS, "console-presence.png"), fullPage: true });
  // It leaves: the others see it go. One of the two console tabs closes:
  // the user is still there.
  await other.close();
  await second.close();
  await first.waitForSelector("text=Who is in room.lobby: 1 member");
  await new Promise((resolve) => setTimeout(resolve, 600));
  assert.deepEqual(await members(first), ["dev-console"]);
  await first.close();
});

test("behind a proxy that refuses WebSocket, the console shows live events over SSE and publishes over HTTP", async () => {
  const proxy = await UpgradeRefusingProxy.start(port);
  try {
    const direct = after_(node.banner, "Console");
    const consoleUrl = direct.replace(`127.0.0.1:${port}`, `127.0.0.1:${proxy.port}`);
    assert.notEqual(consoleUrl, direct);
    const publisher = after_(node.banner, "Publisher token");
    const page = await browser.newPage();
    await page.goto(consoleUrl);
    await page.waitForSelector('#state[data-state="open"][data-transport="sse"]', { timeout: 5000 });
    assert.ok(proxy.refused >= 1, "the page tried WebSocket first");
    assert.equal(await page.textContent("#state"), "open (SSE)");

    await page.fill("#topic", "alerts.sse");
    await page.click("#subscribe-form button");
    // The page's own publish goes over HTTP POST, after its subscribe.
    await page.fill("#publish-topic", "alerts.sse");
    await page.click("#publish-form button");
    await page.waitForSelector("text=Published at offset 1.");
    await page.waitForSelector('#events tr[data-topic="alerts.sse"][data-offset="1"]');
    // An event published with curl-style HTTP arrives live on the stream.
    assert.equal(await publish(publisher, "alerts.sse", { via: "curl" }), 2);
    await page.waitForSelector('#events tr[data-topic="alerts.sse"][data-offset="2"]');
    const offsets = await page.$$eval('#events tr[data-topic="alerts.sse"]', (rows) => rows.map((r) => Number(r.dataset.offset)).reverse());
    assert.deepEqual(offsets, [1, 2]);
    mkdirSync(ARTIFACTS, { recursive: true });
    await page.screenshot({ path: join(ARTIFACTS, "console-sse.png"), fullPage: true });
    await page.close();
  } finally {
    await proxy.close();
  }
});

test("an app on another origin, behind a proxy that refuses WebSocket, streams and publishes through the client", async () => {
  const proxy = await UpgradeRefusingProxy.start(port);
  try {
    const token = after_(node.banner, "Console").split("#token=")[1];
    const page = await browser.newPage();
    // The app's own origin: the node's address by IP; Herald is reached by
    // name through the proxy, another origin (CORS).
    await page.goto(`http://127.0.0.1:${port}/healthz`);
    const base = `http://localhost:${proxy.port}`;
    const result = await page.evaluate(
      async ({ base, token }) => {
        const { Herald } = await import(`${base}/herald.js`);
        const h = new Herald({ url: `${base.replace("http", "ws")}/ws`, token });
        const got = [];
        h.subscribe("cross.origin", (data, meta) => got.push(meta.offset));
        const offset = await h.publish("cross.origin", { from: "another origin" });
        const deadline = Date.now() + 5000;
        while (got.length === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
        const transport = h.transport;
        h.close();
        return { offset, got, transport, origin: location.origin };
      },
      { base, token },
    );
    assert.equal(result.origin, `http://127.0.0.1:${port}`);
    assert.equal(result.transport, "sse");
    assert.deepEqual(result.got, [result.offset]);
    assert.ok(proxy.refused >= 1, "WebSocket was tried first");
    await page.close();
  } finally {
    await proxy.close();
  }
});

test("a token the node refuses is said by the token field, and the page does not fall back", async () => {
  const consoleUrl = after_(node.banner, "Console").replace(/#token=.*/, "#token=garbage");
  const page = await browser.newPage();
  try {
    await page.goto(consoleUrl);
    await page.waitForSelector('#state[data-state="unauthorized"]', { timeout: 10000 });
    assert.equal(await page.getAttribute("#token", "aria-invalid"), "true");
    assert.match(await page.textContent("#notice"), /refused this token: malformed token/);
    assert.equal(await page.getAttribute("#state", "data-transport"), "");
  } finally {
    await page.close();
  }
});
