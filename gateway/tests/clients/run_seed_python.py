"""Drives the seed's Python client, unmodified, against a test server.

The client hard-codes ws://localhost:8000; this harness only redirects that address to the
test server's port (by wrapping websockets.connect), then uses the client exactly as the
seed's own usage example does. Usage: run_seed_python.py PORT API_KEY USER_ID CHAT_ID
"""
import asyncio
import os
import sys

import websockets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from seed_client import ChatWebSocketClient  # noqa: E402

PORT, API_KEY, USER_ID, CHAT_ID = sys.argv[1:5]
_connect = websockets.connect


def redirected_connect(uri, *args, **kwargs):
    return _connect(uri.replace("localhost:8000", f"127.0.0.1:{PORT}"), *args, **kwargs)


websockets.connect = redirected_connect


class Observed(ChatWebSocketClient):
    async def handle_event(self, event):
        await super().handle_event(event)
        if event.get("event_type") == "message_stream_ended":
            self.done.set()


async def main():
    client = Observed(API_KEY, USER_ID, CHAT_ID)
    client.done = asyncio.Event()
    connect_task = asyncio.create_task(client.connect())
    await asyncio.sleep(1)
    await client.send_message("Hello, I need help!")
    await asyncio.wait_for(client.done.wait(), 20)
    await client.disconnect()
    await asyncio.wait_for(connect_task, 10)


asyncio.run(main())
