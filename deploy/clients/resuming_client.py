"""A reconnecting Parley client (Python 3.9+, `pip install websockets`): it resumes with
`last_seq` when the gateway restarts (close 1012), is busy (1013) or the network drops, with
exponential backoff and jitter, and resends a message whose `message_received` it never saw
(the same `client_message_id`, so it is saved once). Auth failures (1008) are final.

    client = ResumingClient("ws://localhost:8000/ws/chat", chat_id, api_key=KEY, user_id="u1")
    # or ResumingClient(url, chat_id, token=CLIENT_TOKEN) in front of a browser-facing backend
    answer = asyncio.run(client.ask("Hello"))   # the whole answer, however many reconnects
"""
import asyncio
import json
import random
import urllib.parse
import uuid

import websockets

FINAL_CODES = {1008, 1009}  # refused (auth, origin, policy) or a frame too large: do not retry


class ResumingClient:
    def __init__(self, url, chat_id, api_key=None, user_id=None, token=None, max_backoff=5.0):
        self.url, self.chat_id = url, chat_id
        self.api_key, self.user_id, self.token = api_key, user_id, token
        self.max_backoff = max_backoff
        self.last_seq = None          # the last chat event seen; sent as last_seq on reconnect
        self.answers = {}             # message_id -> text so far (reset on message_stream_started)
        self.answer_to = {}           # user message_id -> its answer's message_id
        self.reconnects = 0

    def _connect_url(self):
        q = {"chat_id": self.chat_id}
        if self.token:
            q["token"] = self.token
        else:
            q.update(api_key=self.api_key, user_id=self.user_id)
        if self.last_seq is not None:
            q["last_seq"] = str(self.last_seq)
        return f"{self.url}?{urllib.parse.urlencode(q)}"

    async def ask(self, content, timeout=60.0):
        """Sends `content` once and returns its whole answer, as the tokens received (across
        reconnects) spell it; it equals the answer's `message_stream_ended.content`."""
        frame = {"content": content, "client_message_id": str(uuid.uuid4())}
        return await asyncio.wait_for(self._converse(frame), timeout)

    async def _converse(self, frame):
        backoff, received, reply_to = 0.2, None, None
        while True:
            try:
                async with websockets.connect(self._connect_url()) as ws:
                    if received is None:  # not yet acknowledged: (re)send, idempotently
                        await ws.send(json.dumps(frame))
                    async for raw in ws:
                        event = json.loads(raw)
                        backoff = 0.2
                        done = self._on_event(event, frame, received)
                        if event.get("event_type") == "message_received" and \
                                event.get("content") == frame["content"]:
                            received = event["message_id"]
                        if done is not None:
                            return done
            except websockets.ConnectionClosed as closed:
                code = closed.rcvd.code if closed.rcvd else 1006
                if code in FINAL_CODES:
                    raise
            except OSError:
                pass  # the network or the gateway is down: retry below
            self.reconnects += 1
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self.max_backoff)

    def _on_event(self, event, frame, received):
        kind, seq = event.get("event_type"), event.get("seq")
        if kind == "connection_established":
            if self.last_seq is None:
                self.last_seq = seq
            return None
        if seq is not None:
            self.last_seq = seq
        if kind == "error" and event.get("error_code") == "RESUME_UNAVAILABLE":
            self.last_seq = event["details"]["seq"]   # reload history over REST if needed
        mid = event.get("message_id")
        if kind == "message_stream_started":
            self.answers[mid] = ""
            self.answer_to[event.get("reply_to")] = mid
        elif kind == "message_stream_token":
            self.answers[mid] = self.answers.get(mid, "") + event["token"]
        elif kind == "message_stream_ended" and received is not None and \
                self.answer_to.get(received) == mid:
            if self.answers.get(mid) != event["content"]:
                raise RuntimeError(f"tokens {self.answers.get(mid)!r} != {event['content']!r}")
            return self.answers[mid]
        return None
