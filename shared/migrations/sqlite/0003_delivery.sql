-- Delivery guarantees (issue "Delivery that survives faults").
-- seq_reserved: every event `seq` of the chat ever issued is at or below it. The chat log (Redis
-- or in-process) takes `seq`s in blocks reserved here, so after the log is lost the chat's `seq`
-- jumps past every one issued instead of going backwards.
ALTER TABLE chats ADD COLUMN seq_reserved BIGINT NOT NULL DEFAULT 0;
-- gave_up_at: set on a user message whose answer failed for good (the model failed, or the job
-- was dead-lettered), so that the sweep that re-queues unanswered messages leaves it alone.
ALTER TABLE messages ADD COLUMN gave_up_at TEXT;
-- client_message_id: the sender's idempotency key (API.md §4.1), unique per chat.
ALTER TABLE messages ADD COLUMN client_message_id TEXT;
CREATE UNIQUE INDEX messages_by_client_id ON messages (chat_id, client_message_id)
    WHERE client_message_id IS NOT NULL;
