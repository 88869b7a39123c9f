// Verbatim from the seed document (WebSocket Integration, "Basic JavaScript Client").
class ChatClient {
constructor(apiKey, userId, chatId) {
this.apiKey = apiKey;
this.userId = userId;
this.chatId = chatId;
this.ws = null;
this.connected = false;
}
connect() {
const url = `ws://localhost:8000/ws/chat?api_key=${this.apiKey}&user_id=${this.userId}&chat_id=${this.chatId}`;
this.ws = new WebSocket(url);
this.ws.onopen = () => {
console.log('Connected to chat');
this.connected = true;
};
this.ws.onmessage = (event) => {
const data = JSON.parse(event.data);
this.handleEvent(data);
};
this.ws.onclose = (event) => {
console.log('Disconnected:', event.code, event.reason);
this.connected = false;
this.handleDisconnect(event);
};
this.ws.onerror = (error) => {
console.error('WebSocket error:', error);
};
}
handleEvent(event) {
switch (event.event_type) {
case 'connection_established':
console.log('Connection established');
break;
case 'message_received':
console.log('Message received:', event.content);
break;
case 'message_stream_started':
console.log('AI is thinking...');
this.currentResponse = '';
break;
case 'message_stream_token':
this.currentResponse += event.token;
this.updateUI(this.currentResponse);
break;
case 'message_stream_ended':
console.log('AI response complete:', event.content);
this.finalizeResponse(event);
break;
case 'error':
console.error('Error:', event.error_message);
this.handleError(event);
break;
}
}
sendMessage(content, metadata = {}) {
if (!this.connected) {
throw new Error('Not connected to chat');
}
const message = {
content,
...(Object.keys(metadata).length > 0 && { metadata })
};
this.ws.send(JSON.stringify(message));
}
disconnect() {
if (this.ws) {
this.ws.close();
}
}
// Override these methods in your implementation
updateUI(partialResponse) {
// Update UI with streaming response
}
finalizeResponse(event) {
// Handle complete AI response
}
handleError(error) {
// Handle error events
}
handleDisconnect(event) {
// Handle disconnection, potentially reconnect
}
}
