"""Herald with `aiohttp`: subscribe, print one event, publish one.

    HERALD_URL=ws://127.0.0.1:8080/ws HERALD_TOKEN=<jwt> python3 aiohttp_example.py
"""

import asyncio
import json
import os

import aiohttp


async def main() -> None:
    url = os.environ.get("HERALD_URL", "ws://127.0.0.1:8080/ws")
    topic = os.environ.get("HERALD_TOPIC", "alerts")
    headers = {"Authorization": f"Bearer {os.environ['HERALD_TOKEN']}"}
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url, headers=headers, protocols=["herald.json"]) as ws:
            await ws.send_json({"op": "subscribe", "id": 1, "topic": topic})
            async for message in ws:
                frame = json.loads(message.data)
                if frame["op"] == "subscribed":
                    print(f"subscribed to {frame['topic']}", flush=True)
                elif frame["op"] == "event" and frame.get("data", {}).get("from") != "python-aiohttp":
                    print(f"event {frame['offset']}: {json.dumps(frame['data'])}", flush=True)
                    await ws.send_json({"op": "publish", "id": 2, "topic": topic, "data": {"from": "python-aiohttp"}})
                elif frame["op"] == "published":
                    print(f"published at offset {frame['offset']}", flush=True)
                    return
                elif frame["op"] == "error":
                    raise SystemExit(f"error {frame['code']}: {frame['message']}")


asyncio.run(main())
