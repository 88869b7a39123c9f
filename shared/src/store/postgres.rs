//! The Postgres store: the source of truth of the distributed product, through sqlx.
//!
//! Migrations run at start-up (and with `gateway migrate`); sqlx holds a Postgres advisory lock
//! while migrating, so several gateways starting at once apply them exactly once. Message
//! inserts are group-committed and update their chats' counters in the same statement (see
//! `pg_batch`).

use std::{str::FromStr, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{Map, Value};
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
    types::Json,
};
use uuid::Uuid;

use super::batch::Writer;
use super::pg_batch::PgRows;
use super::rows::{CHAT_COLS, ChatRow, MESSAGE_COLS, MessageRow, TENANT_COLS, TenantRow, messages};
use super::{
    Chat, DailyUsage, Message, NewAnswer, NewUserMessage, Page, Store, StoreError, StoreResult,
    Tenant, TenantSettings,
};
use crate::protocol::Job;

/// Batches of message inserts committing at once (see [`super::batch`]); the rest of the pool
/// serves reads and other writes.
const WRITE_LANES: usize = 4;

/// Postgres-backed [`Store`].
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    writer: Writer,
}

impl PgStore {
    /// Connects to `url` and applies migrations. Every statement is limited to
    /// `statement_timeout` by the server (a lock wait included), and so is the wait for a
    /// pooled connection; migrations run before the limit applies.
    pub async fn connect(url: &str, statement_timeout: Duration) -> StoreResult<Self> {
        let options = PgConnectOptions::from_str(url)?;
        let migrations = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/postgres")
            .run(&migrations)
            .await?;
        migrations.close().await;
        let millis = statement_timeout.as_millis().to_string();
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(statement_timeout)
            .connect_with(options.options([("statement_timeout", millis.as_str())]))
            .await?;
        let writer = Writer::start(PgRows(pool.clone()), WRITE_LANES);
        Ok(Self { pool, writer })
    }
}

#[async_trait]
impl Store for PgStore {
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT EXISTS (SELECT 1 FROM tenants)")
            .fetch_one(&self.pool)
            .await?;
        Ok(())
    }

    async fn create_tenant(
        &self,
        name: &str,
        settings: &TenantSettings,
        key_hash: &str,
    ) -> StoreResult<Tenant> {
        let now = Utc::now();
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO tenants (id, name, api_key_hash, settings, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id)
        .bind(name)
        .bind(key_hash)
        .bind(Json(settings))
        .bind(now)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(StoreError::tenant_write(Some(name)))?;
        Ok(Tenant {
            id,
            name: name.to_owned(),
            settings: settings.clone(),
            created_at: now,
            updated_at: now,
        })
    }

    async fn list_tenants(&self) -> StoreResult<Vec<Tenant>> {
        let sql = sqlx::AssertSqlSafe(format!("{TENANT_COLS} ORDER BY created_at, id"));
        let rows = sqlx::query_as::<_, TenantRow>(sql)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(Tenant::from).collect())
    }

    async fn get_tenant(&self, id: Uuid) -> StoreResult<Option<Tenant>> {
        let sql = sqlx::AssertSqlSafe(format!("{TENANT_COLS} WHERE id = $1"));
        let row = sqlx::query_as::<_, TenantRow>(sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(Tenant::from))
    }

    async fn tenant_by_key_hash(&self, key_hash: &str) -> StoreResult<Option<Tenant>> {
        let sql = sqlx::AssertSqlSafe(format!("{TENANT_COLS} WHERE api_key_hash = $1"));
        let row = sqlx::query_as::<_, TenantRow>(sql)
            .bind(key_hash)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(Tenant::from))
    }

    async fn update_tenant(
        &self,
        id: Uuid,
        name: Option<&str>,
        settings: Option<&TenantSettings>,
    ) -> StoreResult<Option<Tenant>> {
        let done = sqlx::query(
            "UPDATE tenants SET name = COALESCE($1, name), settings = COALESCE($2, settings), \
             updated_at = $3 WHERE id = $4",
        )
        .bind(name)
        .bind(settings.map(Json))
        .bind(Utc::now())
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(StoreError::tenant_write(name))?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        self.get_tenant(id).await
    }

    async fn set_tenant_key(&self, id: Uuid, key_hash: &str) -> StoreResult<bool> {
        let done =
            sqlx::query("UPDATE tenants SET api_key_hash = $1, updated_at = $2 WHERE id = $3")
                .bind(key_hash)
                .bind(Utc::now())
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn delete_tenant(&self, id: Uuid) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM tenants WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn ensure_user(&self, tenant_id: Uuid, user_id: &str) -> StoreResult<bool> {
        let done = sqlx::query(
            "INSERT INTO users (tenant_id, user_id, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(tenant_id)
        .bind(user_id)
        .bind(Utc::now())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn join_chat(
        &self,
        tenant_id: Uuid,
        chat_id: Uuid,
        user_id: &str,
    ) -> StoreResult<Option<bool>> {
        let (chat, created): (bool, bool) = sqlx::query_as(
            "WITH c AS (SELECT 1 FROM chats WHERE id = $1 AND tenant_id = $2), \
             u AS (INSERT INTO users (tenant_id, user_id, created_at) SELECT $2, $3, $4 FROM c \
                   ON CONFLICT DO NOTHING RETURNING 1) \
             SELECT EXISTS (SELECT 1 FROM c), EXISTS (SELECT 1 FROM u)",
        )
        .bind(chat_id)
        .bind(tenant_id)
        .bind(user_id)
        .bind(Utc::now())
        .fetch_one(&self.pool)
        .await?;
        Ok(chat.then_some(created))
    }

    async fn add_usage(&self, tenant_id: Uuid, delta: &DailyUsage) -> StoreResult<()> {
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        sqlx::query(super::ADD_USAGE)
            .bind(tenant_id)
            .bind(delta.date)
            .bind(n(delta.messages))
            .bind(n(delta.prompt_tokens))
            .bind(n(delta.completion_tokens))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn usage(
        &self,
        tenant_id: Uuid,
        from: NaiveDate,
        to: NaiveDate,
    ) -> StoreResult<Vec<DailyUsage>> {
        let rows: Vec<(NaiveDate, i64, i64, i64)> = sqlx::query_as(super::SELECT_USAGE)
            .bind(tenant_id)
            .bind(from)
            .bind(to)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(d, m, p, c)| DailyUsage::from_row(d, m, p, c))
            .collect())
    }

    async fn user_exists(&self, tenant_id: Uuid, user_id: &str) -> StoreResult<bool> {
        let found: Option<i64> =
            sqlx::query_scalar("SELECT 1::INT8 FROM users WHERE tenant_id = $1 AND user_id = $2")
                .bind(tenant_id)
                .bind(user_id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(found.is_some())
    }

    async fn create_chat(
        &self,
        tenant_id: Uuid,
        user_id: &str,
        title: &str,
        metadata: &Map<String, Value>,
    ) -> StoreResult<Chat> {
        self.ensure_user(tenant_id, user_id).await?;
        let now = Utc::now();
        let chat = Chat {
            id: Uuid::new_v4(),
            tenant_id,
            user_id: user_id.to_owned(),
            title: title.to_owned(),
            metadata: metadata.clone(),
            created_at: now,
            updated_at: now,
            last_message_at: None,
            message_count: 0,
        };
        sqlx::query(
            "INSERT INTO chats (id, tenant_id, user_id, title, metadata, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(chat.id)
        .bind(tenant_id)
        .bind(user_id)
        .bind(title)
        .bind(Json(metadata))
        .bind(now)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(chat)
    }

    async fn get_chat(&self, tenant_id: Uuid, chat_id: Uuid) -> StoreResult<Option<Chat>> {
        let sql = sqlx::AssertSqlSafe(format!("{CHAT_COLS} WHERE id = $1 AND tenant_id = $2"));
        let row = sqlx::query_as::<_, ChatRow>(sql)
            .bind(chat_id)
            .bind(tenant_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(Chat::from))
    }

    async fn list_user_chats(
        &self,
        tenant_id: Uuid,
        user_id: &str,
        page: Page,
    ) -> StoreResult<(Vec<Chat>, i64)> {
        let dir = if page.descending { "DESC" } else { "ASC" };
        let sql = sqlx::AssertSqlSafe(format!(
            "{CHAT_COLS} WHERE tenant_id = $1 AND user_id = $2 \
             ORDER BY created_at {dir}, id {dir} LIMIT $3 OFFSET $4"
        ));
        let rows = sqlx::query_as::<_, ChatRow>(sql)
            .bind(tenant_id)
            .bind(user_id)
            .bind(page.limit)
            .bind(page.offset)
            .fetch_all(&self.pool)
            .await?;
        let total: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM chats WHERE tenant_id = $1 AND user_id = $2")
                .bind(tenant_id)
                .bind(user_id)
                .fetch_one(&self.pool)
                .await?;
        Ok((rows.into_iter().map(Chat::from).collect(), total))
    }

    async fn delete_chat(&self, tenant_id: Uuid, chat_id: Uuid) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM chats WHERE id = $1 AND tenant_id = $2")
            .bind(chat_id)
            .bind(tenant_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn insert_user_message(&self, new: &NewUserMessage<'_>) -> StoreResult<(Message, bool)> {
        Ok(self.writer.add_user_message(new).await?)
    }

    async fn message_by_client_id(
        &self,
        chat_id: Uuid,
        client_message_id: &str,
    ) -> StoreResult<Option<Message>> {
        let sql = sqlx::AssertSqlSafe(format!(
            "{MESSAGE_COLS} WHERE chat_id = $1 AND client_message_id = $2"
        ));
        let row = sqlx::query_as::<_, MessageRow>(sql)
            .bind(chat_id)
            .bind(client_message_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(Message::try_from).transpose()
    }

    async fn add_answer(&self, a: &NewAnswer) -> StoreResult<bool> {
        Ok(self.writer.add_answer(a).await?)
    }

    async fn answer_to(&self, message_id: &str) -> StoreResult<Option<Message>> {
        let sql = sqlx::AssertSqlSafe(format!("{MESSAGE_COLS} WHERE reply_to = $1"));
        let row = sqlx::query_as::<_, MessageRow>(sql)
            .bind(message_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(Message::try_from).transpose()
    }

    async fn list_messages(&self, chat_id: Uuid, page: Page) -> StoreResult<(Vec<Message>, i64)> {
        let dir = if page.descending { "DESC" } else { "ASC" };
        let sql = sqlx::AssertSqlSafe(format!(
            "{MESSAGE_COLS} WHERE chat_id = $1 ORDER BY seq {dir} LIMIT $2 OFFSET $3"
        ));
        let rows = sqlx::query_as::<_, MessageRow>(sql)
            .bind(chat_id)
            .bind(page.limit)
            .bind(page.offset)
            .fetch_all(&self.pool)
            .await?;
        let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM messages WHERE chat_id = $1")
            .bind(chat_id)
            .fetch_one(&self.pool)
            .await?;
        Ok((messages(rows)?, total))
    }

    async fn unanswered(&self, saved_before: DateTime<Utc>, limit: u32) -> StoreResult<Vec<Job>> {
        let rows: Vec<super::UnansweredRow> = sqlx::query_as(super::UNANSWERED)
            .bind(saved_before)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        Ok(super::unanswered_jobs(rows))
    }

    async fn give_up(&self, message_id: &str) -> StoreResult<()> {
        sqlx::query(super::GIVE_UP)
            .bind(Utc::now())
            .bind(message_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn reserve_seq(&self, chat_id: Uuid, block: u64) -> StoreResult<Option<u64>> {
        let block = i64::try_from(block).unwrap_or(i64::MAX);
        let reserved: Option<i64> = sqlx::query_scalar(super::RESERVE_SEQ)
            .bind(block)
            .bind(chat_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(reserved.map(|r| u64::try_from(r).unwrap_or(0)))
    }

    async fn history_before(
        &self,
        chat_id: Uuid,
        message_id: &str,
        limit: u32,
    ) -> StoreResult<Vec<Message>> {
        let sql = sqlx::AssertSqlSafe(format!(
            "{MESSAGE_COLS} WHERE chat_id = $1 AND seq < (SELECT seq FROM messages WHERE id = $2) \
             ORDER BY seq DESC LIMIT $3"
        ));
        let rows = sqlx::query_as::<_, MessageRow>(sql)
            .bind(chat_id)
            .bind(message_id)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        let mut history = messages(rows)?;
        history.reverse();
        Ok(history)
    }
}
