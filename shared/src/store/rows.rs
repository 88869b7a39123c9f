//! Row types shared by the SQL stores: the same columns decode from SQLite and Postgres.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sqlx::{FromRow, types::Json};
use uuid::Uuid;

use super::{Chat, Message, Role, StoreError, StoreResult, Tenant, TenantSettings};

#[derive(FromRow)]
pub(super) struct TenantRow {
    id: Uuid,
    name: String,
    settings: Json<TenantSettings>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    api_key_hash: String,
}

impl From<TenantRow> for Tenant {
    fn from(r: TenantRow) -> Self {
        Tenant {
            id: r.id,
            name: r.name,
            settings: r.settings.0,
            created_at: r.created_at,
            updated_at: r.updated_at,
            key_hash: crate::keys::KeyHash(r.api_key_hash),
        }
    }
}

#[derive(FromRow)]
pub(super) struct ChatRow {
    id: Uuid,
    tenant_id: Uuid,
    user_id: String,
    title: String,
    metadata: Json<Map<String, Value>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    last_message_at: Option<DateTime<Utc>>,
    message_count: i64,
}

impl From<ChatRow> for Chat {
    fn from(r: ChatRow) -> Self {
        Chat {
            id: r.id,
            tenant_id: r.tenant_id,
            user_id: r.user_id,
            title: r.title,
            metadata: r.metadata.0,
            created_at: r.created_at,
            updated_at: r.updated_at,
            last_message_at: r.last_message_at,
            message_count: r.message_count,
        }
    }
}

#[derive(FromRow)]
pub(super) struct MessageRow {
    id: String,
    chat_id: Uuid,
    sender_role: String,
    user_id: String,
    content: String,
    metadata: Json<Map<String, Value>>,
    reply_to: Option<String>,
    client_message_id: Option<String>,
    created_at: DateTime<Utc>,
}

impl TryFrom<MessageRow> for Message {
    type Error = StoreError;
    fn try_from(r: MessageRow) -> Result<Self, StoreError> {
        let role = match r.sender_role.as_str() {
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => return Err(StoreError::Corrupt(format!("sender_role {other}"))),
        };
        Ok(Message {
            id: r.id,
            chat_id: r.chat_id,
            role,
            user_id: r.user_id,
            content: r.content,
            metadata: r.metadata.0,
            reply_to: r.reply_to,
            client_message_id: r.client_message_id,
            created_at: r.created_at,
        })
    }
}

pub(super) const TENANT_COLS: &str =
    "SELECT id, name, settings, created_at, updated_at, api_key_hash FROM tenants";
pub(super) const CHAT_COLS: &str = "SELECT id, tenant_id, user_id, title, metadata, created_at, updated_at, \
                         last_message_at, message_count FROM chats";
pub(super) const MESSAGE_COLS: &str = "SELECT id, chat_id, sender_role, user_id, content, metadata, reply_to, \
                            client_message_id, created_at FROM messages";

pub(super) fn messages(rows: Vec<MessageRow>) -> StoreResult<Vec<Message>> {
    rows.into_iter().map(Message::try_from).collect()
}
