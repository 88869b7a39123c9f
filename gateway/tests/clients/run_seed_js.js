// Drives the seed's plain JavaScript client, unmodified, against a test server.
// The client hard-codes ws://localhost:8000; this harness only redirects that address to the
// test server's port, and overrides the hooks the seed marks "Override these methods".
// Usage: node --experimental-websocket run_seed_js.js PORT API_KEY USER_ID CHAT_ID
const fs = require('fs');
const path = require('path');
const vm = require('vm');

const [port, apiKey, userId, chatId] = process.argv.slice(2);
if (typeof WebSocket === 'undefined') {
  // Node.js before 20 has no global WebSocket: use the `ws` package (scripts/test.sh installs it).
  globalThis.WebSocket = require('ws');
}
const NativeWebSocket = WebSocket;
globalThis.WebSocket = class extends NativeWebSocket {
  constructor(url, ...rest) {
    super(url.replace('localhost:8000', `127.0.0.1:${port}`), ...rest);
  }
};
const source = fs.readFileSync(path.join(__dirname, 'seed_client.js'), 'utf8');
const ChatClient = vm.runInThisContext(`${source}\nChatClient`);

class Observed extends ChatClient {
  updateUI(partial) { this.partial = partial; }
  finalizeResponse(event) {
    if (event.content !== this.partial) {
      console.error('streamed tokens differ from the final content');
      process.exit(1);
    }
    this.disconnect();
  }
  handleError(event) { console.error('unexpected error event', JSON.stringify(event)); process.exit(1); }
  handleDisconnect(event) { process.exit(event.code === 1000 || event.code === 1005 ? 0 : 2); }
}

const chat = new Observed(apiKey, userId, chatId);
chat.connect();
setTimeout(() => chat.sendMessage('Hello, I need help with my account'), 500);
setTimeout(() => { console.error('timed out'); process.exit(4); }, 20000);
