//! The embedded store: one SQLite file in WAL mode, through sqlx.
//!
//! Every write is a single autocommit statement (counters are kept by a trigger), so writers
//! only ever wait on SQLite's lock (`busy_timeout`) and never fail a lock upgrade.

use std::{str::FromStr, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{Map, Value};
use sqlx::{
    SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
    types::Json,
};
use uuid::Uuid;

use super::batch::Writer;
use super::rows::{CHAT_COLS, ChatRow, MESSAGE_COLS, MessageRow, TENANT_COLS, TenantRow, messages};
use super::sqlite_writer::{SqliteRows, checkpoint};
use super::{
    Chat, DailyUsage, Message, NewAnswer, NewUserMessage, Page, Store, StoreError, StoreResult,
    Tenant, TenantSettings,
};
use crate::protocol::Job;

/// SQLite-backed [`Store`].
///
/// Writes go through a pool of exactly one connection: SQLite allows one writer at a time, and
/// writers that contend for its lock wait in sleeps of growing length (1, 2, 5, 10 ms …), which
/// would dominate latency. One writer never contends; readers use their own pool (WAL lets them
/// read while the writer writes). Message inserts, the hot writes, are group-committed and WAL
/// checkpoints run on their own connection (see `sqlite_writer`).
#[derive(Clone)]
pub struct SqliteStore {
    read: SqlitePool,
    write: SqlitePool,
    writer: Writer,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `url` and applies migrations; a statement
    /// waits at most `lock_wait` for the database's lock.
    pub async fn connect(url: &str, lock_wait: Duration) -> StoreResult<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(lock_wait)
            .foreign_keys(true);
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone().pragma("wal_autocheckpoint", "0"))
            .await?;
        let checkpoints = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&write).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;
        let writer = Writer::start(SqliteRows(write.clone()), 1);
        tokio::spawn(checkpoint(checkpoints, writer.downgrade()));
        Ok(Self {
            read,
            write,
            writer,
        })
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT EXISTS (SELECT 1 FROM tenants)")
            .fetch_one(&self.read)
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
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(id)
        .bind(name)
        .bind(key_hash)
        .bind(Json(settings))
        .bind(now)
        .bind(now)
        .execute(&self.write)
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
            .fetch_all(&self.read)
            .await?;
        Ok(rows.into_iter().map(Tenant::from).collect())
    }

    async fn get_tenant(&self, id: Uuid) -> StoreResult<Option<Tenant>> {
        let sql = sqlx::AssertSqlSafe(format!("{TENANT_COLS} WHERE id = ?"));
        let row = sqlx::query_as::<_, TenantRow>(sql)
            .bind(id)
            .fetch_optional(&self.read)
            .await?;
        Ok(row.map(Tenant::from))
    }

    async fn tenant_by_key_hash(&self, key_hash: &str) -> StoreResult<Option<Tenant>> {
        let sql = sqlx::AssertSqlSafe(format!("{TENANT_COLS} WHERE api_key_hash = ?"));
        let row = sqlx::query_as::<_, TenantRow>(sql)
            .bind(key_hash)
            .fetch_optional(&self.read)
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
            "UPDATE tenants SET name = COALESCE(?, name), settings = COALESCE(?, settings), \
             updated_at = ? WHERE id = ?",
        )
        .bind(name)
        .bind(settings.map(Json))
        .bind(Utc::now())
        .bind(id)
        .execute(&self.write)
        .await
        .map_err(StoreError::tenant_write(name))?;
        if done.rows_affected() == 0 {
            return Ok(None);
        }
        self.get_tenant(id).await
    }

    async fn set_tenant_key(&self, id: Uuid, key_hash: &str) -> StoreResult<bool> {
        let done = sqlx::query("UPDATE tenants SET api_key_hash = ?, updated_at = ? WHERE id = ?")
            .bind(key_hash)
            .bind(Utc::now())
            .bind(id)
            .execute(&self.write)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn delete_tenant(&self, id: Uuid) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM tenants WHERE id = ?")
            .bind(id)
            .execute(&self.write)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn ensure_user(&self, tenant_id: Uuid, user_id: &str) -> StoreResult<bool> {
        let done = sqlx::query(
            "INSERT OR IGNORE INTO users (tenant_id, user_id, created_at) VALUES (?, ?, ?)",
        )
        .bind(tenant_id)
        .bind(user_id)
        .bind(Utc::now())
        .execute(&self.write)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn add_usage(&self, tenant_id: Uuid, delta: &DailyUsage) -> StoreResult<()> {
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        sqlx::query(super::ADD_USAGE)
            .bind(tenant_id)
            .bind(delta.date)
            .bind(n(delta.messages))
            .bind(n(delta.prompt_tokens))
            .bind(n(delta.completion_tokens))
            .execute(&self.write)
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
            .fetch_all(&self.read)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(d, m, p, c)| DailyUsage::from_row(d, m, p, c))
            .collect())
    }

    async fn user_exists(&self, tenant_id: Uuid, user_id: &str) -> StoreResult<bool> {
        let found: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM users WHERE tenant_id = ? AND user_id = ?")
                .bind(tenant_id)
                .bind(user_id)
                .fetch_optional(&self.read)
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
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(chat.id)
        .bind(tenant_id)
        .bind(user_id)
        .bind(title)
        .bind(Json(metadata))
        .bind(now)
        .bind(now)
        .execute(&self.write)
        .await?;
        Ok(chat)
    }

    async fn get_chat(&self, tenant_id: Uuid, chat_id: Uuid) -> StoreResult<Option<Chat>> {
        let sql = sqlx::AssertSqlSafe(format!("{CHAT_COLS} WHERE id = ? AND tenant_id = ?"));
        let row = sqlx::query_as::<_, ChatRow>(sql)
            .bind(chat_id)
            .bind(tenant_id)
            .fetch_optional(&self.read)
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
            "{CHAT_COLS} WHERE tenant_id = ? AND user_id = ? \
             ORDER BY created_at {dir}, rowid {dir} LIMIT ? OFFSET ?"
        ));
        let rows = sqlx::query_as::<_, ChatRow>(sql)
            .bind(tenant_id)
            .bind(user_id)
            .bind(page.limit)
            .bind(page.offset)
            .fetch_all(&self.read)
            .await?;
        let total: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM chats WHERE tenant_id = ? AND user_id = ?")
                .bind(tenant_id)
                .bind(user_id)
                .fetch_one(&self.read)
                .await?;
        Ok((rows.into_iter().map(Chat::from).collect(), total))
    }

    async fn delete_chat(&self, tenant_id: Uuid, chat_id: Uuid) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM chats WHERE id = ? AND tenant_id = ?")
            .bind(chat_id)
            .bind(tenant_id)
            .execute(&self.write)
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
            "{MESSAGE_COLS} WHERE chat_id = ? AND client_message_id = ?"
        ));
        let row = sqlx::query_as::<_, MessageRow>(sql)
            .bind(chat_id)
            .bind(client_message_id)
            .fetch_optional(&self.read)
            .await?;
        row.map(Message::try_from).transpose()
    }

    async fn add_answer(&self, a: &NewAnswer) -> StoreResult<bool> {
        Ok(self.writer.add_answer(a).await?)
    }

    async fn answer_to(&self, message_id: &str) -> StoreResult<Option<Message>> {
        let sql = sqlx::AssertSqlSafe(format!("{MESSAGE_COLS} WHERE reply_to = ?"));
        let row = sqlx::query_as::<_, MessageRow>(sql)
            .bind(message_id)
            .fetch_optional(&self.read)
            .await?;
        row.map(Message::try_from).transpose()
    }

    async fn list_messages(&self, chat_id: Uuid, page: Page) -> StoreResult<(Vec<Message>, i64)> {
        let dir = if page.descending { "DESC" } else { "ASC" };
        let sql = sqlx::AssertSqlSafe(format!(
            "{MESSAGE_COLS} WHERE chat_id = ? ORDER BY seq {dir} LIMIT ? OFFSET ?"
        ));
        let rows = sqlx::query_as::<_, MessageRow>(sql)
            .bind(chat_id)
            .bind(page.limit)
            .bind(page.offset)
            .fetch_all(&self.read)
            .await?;
        let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM messages WHERE chat_id = ?")
            .bind(chat_id)
            .fetch_one(&self.read)
            .await?;
        Ok((messages(rows)?, total))
    }

    async fn unanswered(&self, saved_before: DateTime<Utc>, limit: u32) -> StoreResult<Vec<Job>> {
        let rows: Vec<super::UnansweredRow> = sqlx::query_as(super::UNANSWERED)
            .bind(saved_before)
            .bind(i64::from(limit))
            .fetch_all(&self.read)
            .await?;
        Ok(super::unanswered_jobs(rows))
    }

    async fn give_up(&self, message_id: &str) -> StoreResult<()> {
        sqlx::query(super::GIVE_UP)
            .bind(Utc::now())
            .bind(message_id)
            .execute(&self.write)
            .await?;
        Ok(())
    }

    async fn reserve_seq(&self, chat_id: Uuid, block: u64) -> StoreResult<Option<u64>> {
        let block = i64::try_from(block).unwrap_or(i64::MAX);
        let reserved: Option<i64> = sqlx::query_scalar(super::RESERVE_SEQ)
            .bind(block)
            .bind(chat_id)
            .fetch_optional(&self.write)
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
            "{MESSAGE_COLS} WHERE chat_id = ? AND seq < (SELECT seq FROM messages WHERE id = ?) \
             ORDER BY seq DESC LIMIT ?"
        ));
        let rows = sqlx::query_as::<_, MessageRow>(sql)
            .bind(chat_id)
            .bind(message_id)
            .bind(i64::from(limit))
            .fetch_all(&self.read)
            .await?;
        let mut history = messages(rows)?;
        history.reverse();
        Ok(history)
    }
}
