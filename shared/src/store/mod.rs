//! The durable store: the source of truth for tenants, users, chats and messages.
//!
//! [`Store`] is the seam: the gateway and the worker only see the trait. [`sqlite::SqliteStore`]
//! is the embedded implementation, [`postgres::PgStore`] the distributed one; the database URL
//! picks one.

mod batch;
pub mod cache;
mod model;
mod pg_batch;
pub mod postgres;
mod rows;
mod sql;
pub mod sqlite;
mod sqlite_writer;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::NaiveDate;
use serde_json::{Map, Value};
use uuid::Uuid;

pub use cache::TenantCache;
pub use model::{AgentSettings, Chat, DailyUsage, Message, Page, Role, Tenant, TenantSettings};

/// Adds to a day's usage (both stores: SQLite takes `$n` parameters too).
const ADD_USAGE: &str = "INSERT INTO tenant_usage \
     (tenant_id, day, messages, prompt_tokens, completion_tokens) VALUES ($1, $2, $3, $4, $5) \
     ON CONFLICT (tenant_id, day) DO UPDATE SET messages = tenant_usage.messages + excluded.messages, \
     prompt_tokens = tenant_usage.prompt_tokens + excluded.prompt_tokens, \
     completion_tokens = tenant_usage.completion_tokens + excluded.completion_tokens";

/// A tenant's days between two dates.
const SELECT_USAGE: &str = "SELECT day, messages, prompt_tokens, completion_tokens \
     FROM tenant_usage WHERE tenant_id = $1 AND day >= $2 AND day <= $3 ORDER BY day";

/// Reserves the next block of a chat's event `seq`s; returns the new reservation's end (both
/// stores: SQLite takes `$n` parameters too).
const RESERVE_SEQ: &str =
    "UPDATE chats SET seq_reserved = seq_reserved + $1 WHERE id = $2 RETURNING seq_reserved";

/// Records that a user message will not be answered (both stores).
const GIVE_UP: &str = "UPDATE messages SET gave_up_at = $1 WHERE id = $2 AND sender_role = 'user' AND gave_up_at IS NULL";

/// User messages saved before `$1` with no answer and not given up, oldest first (both stores).
const UNANSWERED: &str = "SELECT m.id, m.chat_id, c.tenant_id, m.user_id, m.content, m.created_at \
     FROM messages m JOIN chats c ON c.id = m.chat_id \
     WHERE m.sender_role = 'user' AND m.gave_up_at IS NULL AND m.created_at < $1 \
       AND NOT EXISTS (SELECT 1 FROM messages a WHERE a.reply_to = m.id) \
     ORDER BY m.seq LIMIT $2";

/// Rows of [`UNANSWERED`] as jobs to queue again.
type UnansweredRow = (
    String,
    Uuid,
    Uuid,
    String,
    String,
    chrono::DateTime<chrono::Utc>,
);

fn unanswered_jobs(rows: Vec<UnansweredRow>) -> Vec<crate::protocol::Job> {
    rows.into_iter()
        .map(
            |(message_id, chat_id, tenant_id, user_id, content, enqueued_at)| {
                crate::protocol::Job {
                    message_id,
                    chat_id,
                    tenant_id,
                    user_id,
                    content,
                    enqueued_at,
                    trace: None,
                    earlier_attempts: 0,
                }
            },
        )
        .collect()
}

/// Store failures. Callers map them to `SERVICE_UNAVAILABLE` or `INTERNAL_ERROR`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or could not be reached.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    /// A statement ran past its time limit (`timeouts.store_ms`), waiting for a lock included,
    /// or no pooled connection came free in time: the database hangs or is overloaded.
    #[error("database timed out: {0}")]
    TimedOut(#[source] sqlx::Error),
    /// Another tenant already has this name (names are unique).
    #[error("a tenant named '{0}' already exists")]
    NameTaken(String),
    /// Applying the schema failed.
    #[error("migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored JSON column did not parse.
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
    /// The database URL names no supported backend.
    #[error("unsupported database url (expected sqlite://… or postgres://…): {0}")]
    UnsupportedUrl(String),
}

impl From<sqlx::Error> for StoreError {
    /// Every failed statement passes here, so this is where `database_errors` counts them.
    fn from(e: sqlx::Error) -> Self {
        crate::metrics::metrics().database_errors.inc();
        // 57014: Postgres cancelled the statement (its `statement_timeout`); 5: SQLite's lock
        // stayed busy past its busy timeout.
        let timed_out = match &e {
            sqlx::Error::PoolTimedOut => true,
            sqlx::Error::Database(db) => matches!(db.code().as_deref(), Some("57014" | "5")),
            _ => false,
        };
        if timed_out {
            Self::TimedOut(e)
        } else {
            Self::Database(e)
        }
    }
}

impl StoreError {
    /// Whether the store hung rather than failed.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::TimedOut(_))
    }

    /// The error of a tenant insert or update that set `name`: a unique violation of the name
    /// index becomes [`StoreError::NameTaken`] (the key hash is unique too, but 256 random bits
    /// never collide).
    fn tenant_write(name: Option<&str>) -> impl FnOnce(sqlx::Error) -> Self + '_ {
        move |e| match (&e, name) {
            (sqlx::Error::Database(db), Some(name)) if db.is_unique_violation() => {
                Self::NameTaken(name.to_owned())
            }
            _ => e.into(),
        }
    }
}

/// Result alias for store calls.
pub type StoreResult<T> = Result<T, StoreError>;

/// A new assistant answer to save.
#[derive(Debug, Clone)]
pub struct NewAnswer {
    /// The id announced in `message_stream_started`.
    pub id: String,
    /// Its chat.
    pub chat_id: Uuid,
    /// The user on whose behalf the model answered.
    pub user_id: String,
    /// The user message answered; at most one answer per message is ever saved.
    pub reply_to: String,
    /// The whole answer.
    pub content: String,
    /// `model`, `tokens_used`, `finish_reason`, …
    pub metadata: Map<String, Value>,
}

/// A new user message to save.
#[derive(Debug, Clone, Copy)]
pub struct NewUserMessage<'a> {
    /// Its chat.
    pub chat_id: Uuid,
    /// Its sender.
    pub user_id: &'a str,
    /// The text.
    pub content: &'a str,
    /// The client's metadata.
    pub metadata: &'a Map<String, Value>,
    /// The sender's idempotency key, unique per chat (API.md §4.1).
    pub client_message_id: Option<&'a str>,
}

/// What saving a user message did.
#[derive(Debug, Clone, PartialEq)]
pub enum Saved {
    /// The message is saved (durably, when this returns).
    New(Message),
    /// Its `client_message_id` was seen before in the chat: nothing was saved; this is the
    /// message first saved under it.
    Repeat(Message),
}

/// Everything the product persists. All methods are scoped so that a tenant never sees another's data.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Cheap check for `/readyz`: reads the tenants table, which every request needs, so that
    /// a lock held on it or a hung server shows, not only an unreachable one.
    async fn ping(&self) -> StoreResult<()>;

    /// Creates a tenant whose key hashes to `key_hash`.
    async fn create_tenant(
        &self,
        name: &str,
        settings: &TenantSettings,
        key_hash: &str,
    ) -> StoreResult<Tenant>;
    /// All tenants, oldest first.
    async fn list_tenants(&self) -> StoreResult<Vec<Tenant>>;
    /// One tenant.
    async fn get_tenant(&self, id: Uuid) -> StoreResult<Option<Tenant>>;
    /// The tenant whose key hashes to `key_hash`.
    async fn tenant_by_key_hash(&self, key_hash: &str) -> StoreResult<Option<Tenant>>;
    /// Changes name and/or settings; `None` when the tenant does not exist.
    async fn update_tenant(
        &self,
        id: Uuid,
        name: Option<&str>,
        settings: Option<&TenantSettings>,
    ) -> StoreResult<Option<Tenant>>;
    /// Replaces the key hash (rotation); false when the tenant does not exist.
    async fn set_tenant_key(&self, id: Uuid, key_hash: &str) -> StoreResult<bool>;
    /// Deletes a tenant with all its users, chats and messages.
    async fn delete_tenant(&self, id: Uuid) -> StoreResult<bool>;

    /// Creates the user if new; true when this call created it.
    async fn ensure_user(&self, tenant_id: Uuid, user_id: &str) -> StoreResult<bool>;
    /// A socket joins a chat: `None` when the tenant has no such chat, else creates the user if
    /// new and tells whether this call created it. A store may do both in one round trip, which
    /// keeps connect storms light on the database.
    async fn join_chat(
        &self,
        tenant_id: Uuid,
        chat_id: Uuid,
        user_id: &str,
    ) -> StoreResult<Option<bool>> {
        if self.get_chat(tenant_id, chat_id).await?.is_none() {
            return Ok(None);
        }
        self.ensure_user(tenant_id, user_id).await.map(Some)
    }
    /// Adds `delta` (answers and tokens) to its tenant's total of `delta.date`; a deleted
    /// tenant's usage is dropped (a worker's late flush), not refused.
    async fn add_usage(&self, tenant_id: Uuid, delta: &DailyUsage) -> StoreResult<()>;
    /// A tenant's daily totals from `from` to `to` (inclusive), oldest first; days without
    /// answers are absent.
    async fn usage(
        &self,
        tenant_id: Uuid,
        from: NaiveDate,
        to: NaiveDate,
    ) -> StoreResult<Vec<DailyUsage>>;

    /// Whether the user exists.
    async fn user_exists(&self, tenant_id: Uuid, user_id: &str) -> StoreResult<bool>;

    /// Creates a chat (and its user, if new), with its first block of `seq`s reserved
    /// ([`crate::broker::seqs::FIRST`]): the creator hands it to the chat log.
    async fn create_chat(
        &self,
        tenant_id: Uuid,
        user_id: &str,
        title: &str,
        metadata: &Map<String, Value>,
    ) -> StoreResult<Chat>;
    /// A chat of this tenant.
    async fn get_chat(&self, tenant_id: Uuid, chat_id: Uuid) -> StoreResult<Option<Chat>>;
    /// A user's chats (by creation time) and their total count.
    async fn list_user_chats(
        &self,
        tenant_id: Uuid,
        user_id: &str,
        page: Page,
    ) -> StoreResult<(Vec<Chat>, i64)>;
    /// Deletes a chat and its messages atomically; false when absent.
    async fn delete_chat(&self, tenant_id: Uuid, chat_id: Uuid) -> StoreResult<bool>;

    /// Saves a user message; durable when this returns.
    async fn add_user_message(
        &self,
        chat_id: Uuid,
        user_id: &str,
        content: &str,
        metadata: &Map<String, Value>,
    ) -> StoreResult<Message> {
        let new = NewUserMessage {
            chat_id,
            user_id,
            content,
            metadata,
            client_message_id: None,
        };
        match self.save_user_message(&new).await? {
            Saved::New(m) | Saved::Repeat(m) => Ok(m),
        }
    }
    /// Saves a user message unless its `client_message_id` was seen in the chat before.
    async fn save_user_message(&self, new: &NewUserMessage<'_>) -> StoreResult<Saved> {
        let (message, inserted) = self.insert_user_message(new).await?;
        if inserted {
            return Ok(Saved::New(message));
        }
        let key = new.client_message_id.unwrap_or_default();
        self.message_by_client_id(new.chat_id, key)
            .await?
            .map(Saved::Repeat)
            .ok_or_else(|| StoreError::Corrupt("a user message was neither saved nor found".into()))
    }
    /// Inserts a user message; false (and nothing saved) when its `client_message_id` is taken.
    async fn insert_user_message(&self, new: &NewUserMessage<'_>) -> StoreResult<(Message, bool)>;
    /// The user message saved in the chat under a `client_message_id`.
    async fn message_by_client_id(
        &self,
        chat_id: Uuid,
        client_message_id: &str,
    ) -> StoreResult<Option<Message>>;
    /// Saves an answer; false (and nothing saved) when `reply_to` already has one.
    async fn add_answer(&self, answer: &NewAnswer) -> StoreResult<bool>;
    /// The saved answer to a user message, if any.
    async fn answer_to(&self, message_id: &str) -> StoreResult<Option<Message>>;
    /// A page of a chat's messages (by arrival order) and their total count.
    async fn list_messages(&self, chat_id: Uuid, page: Page) -> StoreResult<(Vec<Message>, i64)>;
    /// User messages saved before `saved_before` that have no answer and were not given up,
    /// oldest first, as jobs to queue again: by the embedded mode at start-up (its in-process
    /// queue did not survive the restart) and by the workers' sweep (Redis lost its data).
    async fn unanswered(
        &self,
        saved_before: chrono::DateTime<chrono::Utc>,
        limit: u32,
    ) -> StoreResult<Vec<crate::protocol::Job>>;
    /// Records that a user message will not be answered (its answer failed for good), so that
    /// it is not queued again.
    async fn give_up(&self, message_id: &str) -> StoreResult<()>;
    /// Reserves the chat's next `block` event `seq`s; returns the end of the reservation (every
    /// `seq` ever issued for the chat is at or below it), `None` when the chat does not exist.
    async fn reserve_seq(&self, chat_id: Uuid, block: u64) -> StoreResult<Option<u64>>;
    /// Up to `limit` messages saved before `message_id`, oldest first (conversation context).
    async fn history_before(
        &self,
        chat_id: Uuid,
        message_id: &str,
        limit: u32,
    ) -> StoreResult<Vec<Message>>;
}

/// Opens the store named by a database URL and applies its migrations.
pub async fn connect(database_url: &str) -> StoreResult<Arc<dyn Store>> {
    connect_with(
        database_url,
        crate::config::TimeoutsConfig::default().store(),
    )
    .await
}

/// The store the configuration names, with its statement time limit.
pub async fn open(config: &crate::config::Config) -> StoreResult<Arc<dyn Store>> {
    connect_with(&config.database_url, config.timeouts.store()).await
}

/// As [`connect`], each statement limited to `statement_timeout`.
pub async fn connect_with(
    database_url: &str,
    statement_timeout: std::time::Duration,
) -> StoreResult<Arc<dyn Store>> {
    if database_url.starts_with("sqlite:") {
        Ok(Arc::new(
            sqlite::SqliteStore::connect(database_url, statement_timeout).await?,
        ))
    } else if database_url.starts_with("postgres:") || database_url.starts_with("postgresql:") {
        Ok(Arc::new(
            postgres::PgStore::connect(database_url, statement_timeout).await?,
        ))
    } else {
        Err(StoreError::UnsupportedUrl(database_url.to_owned()))
    }
}
