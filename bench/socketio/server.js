// The Socket.IO node herald-bench measures beside Herald: Socket.IO 4 with
// @socket.io/redis-adapter, doing the same job as a Herald node without its
// event log. A JWT (same secret, same claims) is checked at the handshake,
// `subscribe` joins the topic's room when the token's `topics` allow it,
// and `POST /api/v1/topics/:topic/events` (token with `publish`) emits the
// event to the room on every node through Redis.
//
// Settings (environment): PORT, REDIS_URL, JWT_SECRET.
"use strict";

const http = require("node:http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");
const jwt = require("jsonwebtoken");

const port = Number(process.env.PORT || 3000);
const secret = process.env.JWT_SECRET;
if (!secret) throw new Error("JWT_SECRET is required");

// The grant patterns herald-bench issues: exact topics and `prefix.>`.
function allowed(patterns, topic) {
  return (patterns || []).some((p) =>
    p === ">" || p === topic || (p.endsWith(".>") && topic.startsWith(p.slice(0, -1))),
  );
}

function verify(token) {
  return jwt.verify(token || "", secret, { algorithms: ["HS256"] });
}

const offsets = new Map();

function reply(res, status, body) {
  const bytes = Buffer.from(JSON.stringify(body));
  res.writeHead(status, { "content-type": "application/json", "content-length": bytes.length });
  res.end(bytes);
}

const server = http.createServer((req, res) => {
  if (req.method === "GET" && req.url === "/healthz") return reply(res, 200, { status: "ok" });
  const match = /^\/api\/v1\/topics\/([A-Za-z0-9_.-]+)\/events$/.exec(req.url);
  if (req.method !== "POST" || !match) return reply(res, 404, { error: "not_found" });
  const topic = match[1];
  let claims;
  try {
    claims = verify((req.headers.authorization || "").replace(/^Bearer /, ""));
  } catch {
    return reply(res, 401, { error: "unauthorized" });
  }
  if (!allowed(claims.publish, topic)) return reply(res, 403, { error: "forbidden" });
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    let data;
    try {
      data = JSON.parse(Buffer.concat(chunks).toString("utf8"));
    } catch {
      return reply(res, 400, { error: "bad_request" });
    }
    const offset = (offsets.get(topic) || 0) + 1;
    offsets.set(topic, offset);
    io.to(topic).emit("event", { topic, offset, ts: Date.now(), data });
    reply(res, 201, { topic, offset });
  });
});

const io = new Server(server, { transports: ["websocket"], serveClient: false });

io.use((socket, next) => {
  try {
    socket.data.claims = verify(socket.handshake.auth.token);
    next();
  } catch {
    next(new Error("unauthorized"));
  }
});

io.on("connection", (socket) => {
  socket.on("subscribe", (topic, ack) => {
    const ok = typeof topic === "string" && allowed(socket.data.claims.topics, topic);
    if (ok) socket.join(topic);
    if (typeof ack === "function") ack(ok);
  });
});

async function main() {
  const pub = createClient({ url: process.env.REDIS_URL || "redis://127.0.0.1:6379" });
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);
  io.adapter(createAdapter(pub, sub));
  server.listen(port, "127.0.0.1");
  for (const signal of ["SIGTERM", "SIGINT"]) {
    process.on(signal, () => {
      io.close();
      Promise.allSettled([pub.quit(), sub.quit()]).then(() => process.exit(0));
    });
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
