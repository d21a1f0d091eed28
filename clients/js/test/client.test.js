import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { WebSocket as WsWebSocket } from "ws";

import { Herald } from "../herald.js";
import { Node, Redis, UpgradeRefusingProxy, eventually, sleep, subscriber, token } from "./node.js";

let node;
before(async () => {
  node = await Node.start();
});
after(async () => {
  await node?.stop();
});

/** A client plus the events it received, per topic. */
function client(options = {}) {
  const h = new Herald({ url: node.url, token: token({ sub: "js", topics: [">"], publish: [">"] }), ...options });
  const received = [];
  const states = [];
  h.on("state", (s) => states.push(s));
  return { h, received, states };
}

const opened = (h) => eventually("the client is open", () => h.state === "open");

/** Resolves once the client's earlier requests (subscribes) were answered:
 * the node answers each connection's frames in order. */
const synced = (h) => h.publish("js.sync", null);

test("publish resolves with the offset and subscribers receive data in order", async () => {
  const { h, received } = client();
  h.subscribe("js.basic", (data, meta) => received.push({ data, ...meta }));
  await synced(h);
  const first = await h.publish("js.basic", { n: 1 });
  const second = await h.publish("js.basic", new Uint8Array([0, 1, 255]));
  assert.equal(second, first + 1);
  await eventually("both events arrive", () => received.length === 2);
  assert.deepEqual(received[0].data, { n: 1 });
  assert.equal(received[0].topic, "js.basic");
  assert.ok(received[1].data instanceof Uint8Array);
  assert.deepEqual([...received[1].data], [0, 1, 255]);
  assert.deepEqual(received.map((e) => e.offset), [first, second]);
  h.close();
  assert.equal(h.state, "closed");
});

test("unsubscribe stops delivery", async () => {
  const { h, received } = client();
  const off = h.subscribe("js.unsub", (data) => received.push(data));
  const marker = [];
  h.subscribe("js.unsub-marker", (data) => marker.push(data));
  await synced(h);
  await node.publish("js.unsub", "one");
  await eventually("the first event", () => received.length === 1);
  off();
  await synced(h);
  await node.publish("js.unsub", "two");
  await node.publish("js.unsub-marker", "after");
  await eventually("the marker", () => marker.length === 1);
  assert.deepEqual(received, ["one"]);
  h.close();
});

// Every WebSocket the README names for Node.js (the browser's is tested
// by tests/browser): implementations differ in the events they fire when
// a connection is refused or drops.
const IMPLEMENTATIONS = [
  ["Node's built-in WebSocket", globalThis.WebSocket],
  ["the ws package", WsWebSocket],
];

for (const [name, WebSocket] of IMPLEMENTATIONS) {
  for (const [down, downMs] of [
    ["restarts at once", 0],
    ["stays down for 3 s", 3000],
  ]) {
    test(`with ${name}, after the node ${down} the client reconnects and gets every missed event once, in order`, async () => {
      assert.ok(WebSocket, `${name} is available`);
      const { h, received, states } = client({ WebSocket, minDelay: 300, maxDelay: 1000 });
      const topic = `js.resume.${IMPLEMENTATIONS.findIndex(([n]) => n === name)}.${downMs}`;
      h.subscribe(topic, (data, meta) => received.push(meta.offset));
      await synced(h);
      const first = await node.publish(topic, 1);
      await eventually("the first event", () => received.length === 1);

      await node.kill();
      await eventually("the client noticed", () => h.state === "reconnecting");
      await sleep(downMs);
      await node.restart();
      // Published while the client is still away.
      const missed = [await node.publish(topic, 2), await node.publish(topic, 3)];
      await eventually("the client is back", () => states.includes("reconnecting") && h.state === "open");
      const live = await node.publish(topic, 4);
      await eventually("all four events", () => received.length >= 4);
      await sleep(200);
      assert.deepEqual(received, [first, ...missed, live]);
      h.close();
    });
  }
}

test("a short-lived token is refreshed before it expires and the connection stays", async () => {
  let calls = 0;
  const getToken = () => {
    calls += 1;
    return token({ sub: "js-refresh", topics: [">"], publish: [">"], exp: Math.floor(Date.now() / 1000) + 3 });
  };
  const { h, states, received } = client({ token: undefined, getToken, refreshBefore: 2000 });
  h.subscribe("js.refresh", (data) => received.push(data));
  await synced(h);
  await sleep(4500);
  assert.ok(calls >= 2, `getToken was called ${calls} times`);
  assert.ok(!states.includes("reconnecting"), `states: ${states}`);
  await node.publish("js.refresh", "still here");
  await eventually("the event", () => received.length === 1);
  h.close();
});

test("a resume that cannot be complete is reported as truncated", async () => {
  const { h } = client();
  const truncated = [];
  h.on("truncated", (info) => truncated.push(info));
  h.subscribe("js.truncated", () => {}, { since: 5, epoch: "not-the-current-epoch" });
  await eventually("truncated is reported", () => truncated.length === 1);
  assert.equal(truncated[0].topic, "js.truncated");
  assert.ok(truncated[0].epoch);
  h.close();
});

test("a refused subscription is reported as an error", async () => {
  const h = new Herald({ url: node.url, token: subscriber({ topics: ["only.this"] }) });
  const errors = [];
  h.on("error", (e) => errors.push(e));
  h.subscribe("not.granted", () => {});
  await eventually("the error", () => errors.length === 1);
  assert.equal(errors[0].code, "forbidden");
  assert.equal(errors[0].topic, "not.granted");
  // Forgotten: a reconnect does not ask again.
  assert.equal(h._topics.has("not.granted"), false);
  h.close();
});

test("events of a topic without history keep arriving after the cluster's Redis restarts", async () => {
  const store = process.env.HERALD_TEST_STORE_URL;
  if (!store) throw new Error("set HERALD_TEST_STORE_URL to an empty PostgreSQL database (cargo test does)");
  const redis = await Redis.start();
  const clustered = await Node.start({
    HERALD__REDIS__URL: redis.url,
    HERALD__STORE__URL: store,
    HERALD__RETENTION__HISTORY: "false",
  });
  try {
    const h = new Herald({ url: clustered.url, token: token({ sub: "js", topics: [">"], publish: [">"] }) });
    const received = [];
    h.subscribe("js.volatile", (data, meta) => received.push(meta.offset));
    await h.publish("js.sync", null);
    for (const n of [1, 2, 3]) await clustered.publish("js.volatile", n);
    await eventually("three events", () => received.length === 3);

    // A Redis that restarts has forgotten every topic's numbering.
    await redis.kill();
    await redis.restart();
    await eventually("the node is ready again", async () => (await fetch(`${clustered.http}/readyz`)).ok);
    let offset;
    await eventually("a publish is accepted", async () => {
      try {
        offset = await clustered.publish("js.volatile", 4);
        return true;
      } catch {
        return false;
      }
    });
    assert.equal(offset, 1, "the numbering started again");
    await eventually("the event published after the restart", () => received.length === 4);
    assert.deepEqual(received, [1, 2, 3, 1]);
    h.close();
  } finally {
    await clustered.stop();
    await redis.kill();
  }
});

test("presence keeps the members exact, counts a user once, and a quick reconnect changes nothing", async () => {
  const config = `
[presence]
batch_interval = "1s"
[[topics]]
pattern = "js.room.>"
presence = true
`;
  const room = await Node.start({}, config);
  const as = (sub, info) => {
    const claims = { sub, topics: ["js.room.>"] };
    if (info) claims.presence_info = info;
    return new Herald({ url: room.url, token: token(claims), minDelay: 20, maxDelay: 50 });
  };
  const ada = as("ada", { name: "Ada" });
  const bo = as("bo");
  const boAgain = as("bo");
  try {
    const changes = [];
    const view = ada.presence("js.room.1", (members, change) => changes.push(change));
    const boView = bo.presence("js.room.1");
    await eventually("both are in", () => view.count === 2, 5000);
    assert.deepEqual(view.members.get("ada"), { name: "Ada" });
    assert.equal(view.members.get("bo"), undefined);
    assert.ok(view.members.has("bo"));
    const boAgainView = boAgain.presence("js.room.1");
    await eventually("bo's second client sees both", () => boAgainView.count === 2, 5000);

    // Ada's connection drops and comes back within the batch interval:
    // nobody (Ada included) is told anything.
    const before = changes.length;
    const boChanges = [];
    const boWatch = bo.presence("js.room.1", (members, change) => boChanges.push(change));
    await eventually("bo's second watcher is told the members", () => boChanges.length === 1);
    const states = [];
    ada.on("state", (state) => states.push(state));
    ada._socket.close();
    await eventually("ada reconnects", () => states.join() === "reconnecting,open", 5000);
    await sleep(1500);
    assert.equal(changes.length, before, JSON.stringify(changes.slice(before)));
    assert.equal(boChanges.length, 1, JSON.stringify(boChanges));
    assert.equal(view.count, 2);

    // Bo leaves from one client (both its views): still in. From the
    // other: out.
    boView.close();
    boWatch.close();
    await sleep(1500);
    assert.ok(view.members.has("bo"));
    boAgainView.close();
    await eventually("bo left", () => !view.members.has("bo"), 5000);
    assert.deepEqual(changes.at(-1), { joins: [], leaves: [{ sub: "bo", info: undefined }] });
  } finally {
    ada.close();
    bo.close();
    boAgain.close();
    await room.stop();
  }
});

test("behind a proxy that refuses WebSocket, the client falls back to SSE, loses nothing across a restart, publishes, and returns to WebSocket", async () => {
  const proxy = await UpgradeRefusingProxy.start(node.port);
  const h = new Herald({
    url: proxy.url,
    token: token({ sub: "js-fallback", topics: [">"], publish: [">"] }),
    minDelay: 100,
    maxDelay: 500,
    websocketRetry: 500,
  });
  try {
    const states = [];
    h.on("state", (state, { transport }) => states.push(transport ? `${state}:${transport}` : state));
    const received = [];
    const started = Date.now();
    h.subscribe("js.fallback", (data, meta) => received.push(meta.offset));
    await eventually("open on the stream", () => h.state === "open" && h.transport === "sse", 3000);
    assert.ok(Date.now() - started < 3000, `fell back after ${Date.now() - started} ms`);
    assert.ok(proxy.refused >= 1, "WebSocket was tried first");
    assert.deepEqual(states, ["reconnecting", "open:sse"]);

    // Publishing goes over HTTP; the stream receives.
    const first = await h.publish("js.fallback", { n: 1 });
    await eventually("the first event", () => received.length === 1);

    await node.kill();
    await eventually("the client noticed", () => h.state === "reconnecting");
    await node.restart();
    const missed = [await node.publish("js.fallback", 2), await node.publish("js.fallback", 3)];
    await eventually("open on the stream again", () => h.state === "open" && h.transport === "sse", 5000);
    const live = await node.publish("js.fallback", 4);
    await eventually("four events", () => received.length >= 4);
    // Another topic joins the stream without losing the first one's place.
    // Published right after subscribing: it comes after the subscribe, as
    // on a WebSocket, though the stream has to be opened again for it.
    const other = [];
    h.subscribe("js.fallback.other", (data, meta) => other.push(meta.offset));
    const otherOffset = await h.publish("js.fallback.other", "x");
    await eventually("the other topic's event", () => other.length === 1);
    assert.deepEqual(other, [otherOffset]);

    // The proxy lets WebSocket through again: the client moves back.
    proxy.refusing = false;
    await eventually("back on WebSocket", () => h.transport === "websocket", 5000);
    assert.equal(states.at(-1), "open:websocket");
    const back = await h.publish("js.fallback", 5);
    await eventually("five events", () => received.length >= 5);
    await sleep(200);
    assert.deepEqual(received, [first, ...missed, live, back], "every event once, in order");
  } finally {
    h.close();
    await proxy.close();
  }
});

test("a WebSocket handshake that a proxy leaves unanswered falls back after one connectTimeout", async () => {
  const proxy = await UpgradeRefusingProxy.start(node.port);
  proxy.hanging = true;
  const h = new Herald({
    url: proxy.url,
    token: token({ sub: "js-hang", topics: [">"], publish: [">"] }),
    connectTimeout: 1000,
  });
  try {
    const received = [];
    h.subscribe("js.hang", (data, meta) => received.push(meta.offset));
    const started = Date.now();
    await eventually("open on the stream", () => h.state === "open" && h.transport === "sse", 5000);
    const took = Date.now() - started;
    assert.ok(took < 1000 + 3000, `fell back after ${took} ms`);
    assert.equal(proxy.refused, 1, "one hanging handshake was enough");
    const offset = await h.publish("js.hang", 1);
    await eventually("the event", () => received.length === 1);
    assert.deepEqual(received, [offset]);
  } finally {
    h.close();
    await proxy.close();
  }
});

test("on the stream, a short-lived token is refreshed by streaming again, and nothing is lost", async () => {
  let calls = 0;
  const getToken = () => {
    calls += 1;
    return token({ sub: "js-sse-refresh", topics: [">"], publish: [">"], exp: Math.floor(Date.now() / 1000) + 3 });
  };
  const h = new Herald({ url: node.url, getToken, transports: ["sse"], refreshBefore: 2000 });
  try {
    const states = [];
    h.on("state", (state, { transport }) => states.push(`${state}:${transport ?? ""}`));
    const received = [];
    h.subscribe("js.sse.refresh", (data, meta) => received.push(meta.offset));
    await eventually("open on the stream", () => h.state === "open" && h.transport === "sse");
    const published = [];
    const until = Date.now() + 4500;
    while (Date.now() < until) {
      published.push(await node.publish("js.sse.refresh", published.length));
      await sleep(100);
    }
    await eventually("every event", () => received.length >= published.length);
    await sleep(200);
    assert.ok(calls >= 2, `getToken was called ${calls} times`);
    assert.deepEqual(received, published, "every event once, in order");
    assert.deepEqual(states, ["open:sse"], "the stream moved to the new token without a reconnect");
  } finally {
    h.close();
  }
});

/** A token the node refuses: signed with another secret. */
const forged = () => {
  const [header, payload] = token({ sub: "js-bad", topics: [">"], publish: [">"] }).split(".");
  return `${header}.${payload}.${Buffer.from("not the signature").toString("base64url")}`;
};

for (const transports of [["websocket", "sse"], ["sse"]]) {
  test(`a refused token is an error, not a fallback (${transports.join(", ")})`, async () => {
    let asked = 0;
    const h = new Herald({
      url: node.url,
      getToken: () => {
        asked += 1;
        return forged();
      },
      transports,
      minDelay: 50,
    });
    try {
      const states = [];
      const errors = [];
      h.on("state", (state, { transport }) => states.push(transport ? `${state}:${transport}` : state));
      h.on("error", (e) => errors.push(e));
      const published = h.publish("js.refused", 1);
      await assert.rejects(published, (e) => e.code === "unauthorized" && /signature/.test(e.message));
      await eventually("unauthorized", () => h.state === "unauthorized", 5000);
      assert.equal(asked, 2, "getToken is asked once more, then no more");
      assert.equal(h.refusal.code, "unauthorized");
      assert.match(h.refusal.message, /signature/);
      assert.ok(!states.some((s) => s.startsWith("open")), `never open: ${states}`);
      assert.ok(errors.some((e) => e.code === "unauthorized"));
      // It stays there: no reconnect loop, and a publish is refused at once.
      await sleep(300);
      assert.equal(asked, 2);
      await assert.rejects(h.publish("js.refused", 2), (e) => e.code === "unauthorized");
    } finally {
      h.close();
    }
  });
}

test("a token refused once and fresh from getToken the second time opens", async () => {
  let asked = 0;
  const h = new Herald({
    url: node.url,
    getToken: () => (++asked === 1 ? forged() : token({ sub: "js-second", topics: [">"], publish: [">"] })),
  });
  try {
    await opened(h);
    assert.equal(h.transport, "websocket");
    assert.equal(asked, 2);
  } finally {
    h.close();
  }
});

test("publish over HTTP rejects with the node's error on 403, 413 and 400", async () => {
  const h = new Herald({
    url: node.url,
    token: token({ sub: "js-http-errors", topics: [">"], publish: ["js.allowed.>"] }),
    transports: ["sse"],
  });
  try {
    await opened(h);
    await assert.rejects(h.publish("js.other", 1), (e) => e.code === "forbidden");
    await assert.rejects(h.publish("js.allowed.big", "x".repeat(70_000)), (e) => e.code === "payload_too_large");
    await assert.rejects(h.publish("js.allowed..x", 1), (e) => e.code === "invalid_topic");
    let deep = 1;
    for (let i = 0; i < 200; i++) deep = [deep];
    await assert.rejects(h.publish("js.allowed.deep", deep), (e) => e.code === "bad_request");
  } finally {
    h.close();
  }
});

test("publish over HTTP rejects with rate_limited after its retries", async () => {
  const limited = await Node.start({ HERALD__LIMITS__HTTP_PUBLISH_RATE: "1" });
  const h = new Herald({
    url: limited.url,
    token: token({ sub: "js-limited", topics: [">"], publish: [">"] }),
    transports: ["sse"],
  });
  try {
    await opened(h);
    const results = await Promise.allSettled([1, 2, 3, 4, 5, 6, 7, 8].map((n) => h.publish("js.limited", n)));
    const refused = results.filter((r) => r.status === "rejected");
    assert.ok(refused.length > 0, "some publishes are refused in the end");
    for (const r of refused) assert.equal(r.reason.code, "rate_limited");
  } finally {
    h.close();
    await limited.stop();
  }
});
