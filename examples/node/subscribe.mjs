// Herald with the `ws` package: subscribe, print one event, publish one.
//   HERALD_URL=ws://127.0.0.1:8080/ws HERALD_TOKEN=<jwt> node subscribe.mjs
import WebSocket from "ws";

const url = `${process.env.HERALD_URL ?? "ws://127.0.0.1:8080/ws"}?token=${process.env.HERALD_TOKEN}`;
const topic = process.env.HERALD_TOPIC ?? "alerts";
const ws = new WebSocket(url, "herald.json");

ws.on("open", () => ws.send(JSON.stringify({ op: "subscribe", id: 1, topic })));
ws.on("message", (raw) => {
  const frame = JSON.parse(raw.toString());
  if (frame.op === "subscribed") {
    console.log(`subscribed to ${frame.topic}`);
  } else if (frame.op === "event" && frame.data?.from !== "node-ws") {
    console.log(`event ${frame.offset}: ${JSON.stringify(frame.data)}`);
    ws.send(JSON.stringify({ op: "publish", id: 2, topic, data: { from: "node-ws" } }));
  } else if (frame.op === "published") {
    console.log(`published at offset ${frame.offset}`);
    ws.close();
  } else if (frame.op === "error") {
    console.error(`error ${frame.code}: ${frame.message}`);
    process.exit(1);
  }
});
