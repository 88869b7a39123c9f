-- Parley schema (PostgreSQL).
CREATE TABLE tenants (
    id           UUID PRIMARY KEY,
    name         TEXT NOT NULL,
    api_key_hash TEXT NOT NULL UNIQUE,
    settings     JSONB NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL
);

CREATE TABLE users (
    tenant_id  UUID NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    user_id    TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (tenant_id, user_id)
);

CREATE TABLE chats (
    id              UUID PRIMARY KEY,
    tenant_id       UUID NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    user_id         TEXT NOT NULL,
    title           TEXT NOT NULL,
    metadata        JSONB NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL,
    last_message_at TIMESTAMPTZ,
    message_count   BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX chats_by_user ON chats (tenant_id, user_id, created_at);

-- seq gives arrival order; reply_to is unique so a message is never answered twice.
CREATE TABLE messages (
    seq         BIGSERIAL PRIMARY KEY,
    id          TEXT NOT NULL UNIQUE,
    chat_id     UUID NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
    sender_role TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    content     TEXT NOT NULL,
    metadata    JSONB NOT NULL,
    reply_to    TEXT UNIQUE,
    created_at  TIMESTAMPTZ NOT NULL
);
CREATE INDEX messages_by_chat ON messages (chat_id, seq);
