-- Parley schema (SQLite). Ids are UUID blobs, timestamps RFC 3339 text, JSON columns text.
CREATE TABLE tenants (
    id           BLOB PRIMARY KEY,
    name         TEXT NOT NULL,
    api_key_hash TEXT NOT NULL UNIQUE,
    settings     TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL
);

CREATE TABLE users (
    tenant_id  BLOB NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    user_id    TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (tenant_id, user_id)
);

CREATE TABLE chats (
    id              BLOB PRIMARY KEY,
    tenant_id       BLOB NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    user_id         TEXT NOT NULL,
    title           TEXT NOT NULL,
    metadata        TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    last_message_at TEXT,
    message_count   INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX chats_by_user ON chats (tenant_id, user_id, created_at);

-- seq gives arrival order; reply_to is unique so a message is never answered twice.
CREATE TABLE messages (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    chat_id     BLOB NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
    sender_role TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    content     TEXT NOT NULL,
    metadata    TEXT NOT NULL,
    reply_to    TEXT UNIQUE,
    created_at  TEXT NOT NULL
);
CREATE INDEX messages_by_chat ON messages (chat_id, seq);

-- Keeps the chat's counters in the same statement as the insert, so every write is one
-- autocommit statement (no read-then-write transaction that SQLite could refuse under contention).
CREATE TRIGGER messages_touch_chat AFTER INSERT ON messages BEGIN
    UPDATE chats
       SET message_count = message_count + 1,
           last_message_at = NEW.created_at,
           updated_at = NEW.created_at
     WHERE id = NEW.chat_id;
END;
