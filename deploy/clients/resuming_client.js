// A reconnecting Parley client for browsers and Node 20+ (`node --experimental-websocket`): it
// resumes with `last_seq` when the gateway restarts (close 1012), is busy (1013) or the network
// drops, with exponential backoff and jitter, and resends a message whose `message_received` it
// never saw (same `client_message_id`: saved once). Refusals (1008, 1009) are final.
//
//   const client = new ResumingClient("wss://parley.example.com/ws/chat", chatId, { token });
//   const answer = await client.ask("Hello");   // the whole answer, however many reconnects
class ResumingClient {
  constructor(url, chatId, { apiKey, userId, token, maxBackoffMs = 5000 } = {}) {
    Object.assign(this, { url, chatId, apiKey, userId, token, maxBackoffMs });
    this.lastSeq = null;      // the last chat event seen, sent as last_seq on reconnect
    this.answers = new Map(); // message_id -> text so far (reset on message_stream_started)
    this.answerTo = new Map(); // user message_id -> its answer's message_id
    this.reconnects = 0;
  }

  connectUrl() {
    const q = new URLSearchParams({ chat_id: this.chatId });
    if (this.token) q.set("token", this.token);
    else { q.set("api_key", this.apiKey); q.set("user_id", this.userId); }
    if (this.lastSeq !== null) q.set("last_seq", String(this.lastSeq));
    return `${this.url}?${q}`;
  }

  /** Sends `content` once and resolves with its whole answer (the tokens received). */
  ask(content) {
    const frame = { content, client_message_id: crypto.randomUUID() };
    let received = null;
    let backoff = 200;
    return new Promise((resolve, reject) => {
      const open = () => {
        const ws = new WebSocket(this.connectUrl());
        ws.onopen = () => { if (received === null) ws.send(JSON.stringify(frame)); };
        ws.onmessage = (m) => {
          backoff = 200;
          const e = JSON.parse(m.data);
          if (e.event_type === "connection_established") {
            if (this.lastSeq === null) this.lastSeq = e.seq;
            return;
          }
          if (typeof e.seq === "number") this.lastSeq = e.seq;
          if (e.event_type === "error" && e.error_code === "RESUME_UNAVAILABLE") this.lastSeq = e.details.seq;
          if (e.event_type === "message_received" && e.content === frame.content) received = e.message_id;
          if (e.event_type === "message_stream_started") {
            this.answers.set(e.message_id, "");
            this.answerTo.set(e.reply_to, e.message_id);
          }
          if (e.event_type === "message_stream_token") {
            this.answers.set(e.message_id, (this.answers.get(e.message_id) ?? "") + e.token);
          }
          if (e.event_type === "message_stream_ended" && received && this.answerTo.get(received) === e.message_id) {
            ws.onclose = null;
            ws.close(1000);
            const text = this.answers.get(e.message_id);
            if (text !== e.content) reject(new Error("tokens differ from the saved answer"));
            else resolve(text);
          }
        };
        ws.onclose = (ev) => {
          if (ev.code === 1008 || ev.code === 1009) { reject(new Error(`refused: ${ev.code} ${ev.reason}`)); return; }
          this.reconnects += 1;
          setTimeout(open, backoff * (0.5 + Math.random()));
          backoff = Math.min(backoff * 2, this.maxBackoffMs);
        };
      };
      open();
    });
  }
}

if (typeof module !== "undefined") module.exports = { ResumingClient };
