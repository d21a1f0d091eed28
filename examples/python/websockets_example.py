"""Herald with the `websockets` package: subscribe, print one event, publish one.

    HERALD_URL=ws://127.0.0.1:8080/ws HERALD_TOKEN=<jwt> python3 websockets_example.py
"""

import asyncio
import json
import os

import websockets


async def main() -> None:
    url = f"{os.environ.get('HERALD_URL', 'ws://127.0.0.1:8080/ws')}?token={os.environ['HERALD_TOKEN']}"
    topic = os.environ.get("HERALD_TOPIC", "alerts")
    async with websockets.connect(url, subprotocols=["herald.json"]) as ws:
        await ws.send(json.dumps({"op": "subscribe", "id": 1, "topic": topic}))
        async for raw in ws:
            frame = json.loads(raw)
            if frame["op"] == "subscribed":
                print(f"subscribed to {frame['topic']}", flush=True)
            elif frame["op"] == "event" and frame.get("data", {}).get("from") != "python-websockets":
                print(f"event {frame['offset']}: {json.dumps(frame['data'])}", flush=True)
                await ws.send(json.dumps({"op": "publish", "id": 2, "topic": topic, "data": {"from": "python-websockets"}}))
            elif frame["op"] == "published":
                print(f"published at offset {frame['offset']}", flush=True)
                return
            elif frame["op"] == "error":
                raise SystemExit(f"error {frame['code']}: {frame['message']}")


asyncio.run(main())
