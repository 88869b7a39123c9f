# From the seed document (WebSocket Integration, "Python Client Example"), token for token.
# The seed's text lost its indentation in extraction; it is restored here and nothing else changed.
import asyncio
import websockets
import json

class ChatWebSocketClient:
    def __init__(self, api_key, user_id, chat_id):
        self.api_key = api_key
        self.user_id = user_id
        self.chat_id = chat_id
        self.ws = None
        self.current_response = ""

    async def connect(self):
        uri = f"ws://localhost:8000/ws/chat?api_key={self.api_key}&user_id={self.user_id}&chat_id={self.chat_id}"
        try:
            self.ws = await websockets.connect(uri)
            print("Connected to chat WebSocket")
            # Listen for messages
            await self.listen()
        except Exception as e:
            print(f"Connection error: {e}")

    async def listen(self):
        try:
            async for message in self.ws:
                data = json.loads(message)
                await self.handle_event(data)
        except websockets.exceptions.ConnectionClosed:
            print("Connection closed")
        except Exception as e:
            print(f"Error: {e}")

    async def handle_event(self, event):
        event_type = event.get('event_type')
        if event_type == 'connection_established':
            print("Connection established")
        elif event_type == 'message_received':
            print(f"Message received: {event['content']}")
        elif event_type == 'message_stream_started':
            print("AI is responding...")
            self.current_response = ""
        elif event_type == 'message_stream_token':
            self.current_response += event['token']
            print(f"\rAI: {self.current_response}", end='', flush=True)
        elif event_type == 'message_stream_ended':
            print(f"\nAI response complete: {event['content']}")
        elif event_type == 'error':
            print(f"Error: {event['error_message']}")

    async def send_message(self, content, metadata=None):
        if not self.ws:
            raise Exception("Not connected")
        message = {"content": content}
        if metadata:
            message["metadata"] = metadata
        await self.ws.send(json.dumps(message))
        print(f"Sent: {content}")

    async def disconnect(self):
        if self.ws:
            await self.ws.close()
