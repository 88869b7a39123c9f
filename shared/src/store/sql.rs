//! The SQL stores' one implementation of [`Store`]: SQLite and Postgres run the same
//! statements (both accept `$n` parameters, `ON CONFLICT DO NOTHING`, `RETURNING` and
//! `CAST(… AS BIGINT)`), so [`sql_store!`] writes every method once for a store type with a
//! `read` and a `write` pool. The differences between the two are named at its two call sites:
//!
//! - **Pools**: SQLite reads through a read-only pool and writes through one connection (one
//!   writer never waits on SQLite's lock); Postgres has one pool for both.
//! - **Tie-break of equal creation times** when listing a user's chats: SQLite's `rowid`, the
//!   Postgres UUIDv7 `id`.
//! - **`join_chat`**: Postgres checks the chat and creates the user in one statement (a data
//!   modifying CTE, which SQLite lacks); SQLite uses the trait's two-statement default.
//! - Connecting, migrations and the group-committed message inserts live in each backend's
//!   own module (`postgres`, `pg_batch`; `sqlite`, `sqlite_writer`).

/// The names the expansion of [`sql_store!`] uses; each call site imports them all.
pub(super) mod prelude {
    pub(in crate::store) use chrono::{DateTime, NaiveDate, Utc};
    pub(in crate::store) use serde_json::{Map, Value};
    pub(in crate::store) use sqlx::types::Json;
    pub(in crate::store) use uuid::Uuid;

    pub(in crate::store) use crate::protocol::Job;
    pub(in crate::store) use crate::store::rows::{
        CHAT_COLS, ChatRow, MESSAGE_COLS, MessageRow, TENANT_COLS, TenantRow, messages,
    };
    pub(in crate::store) use crate::store::{
        Chat, DailyUsage, Message, NewAnswer, NewUserMessage, Page, Store, StoreError, StoreResult,
        Tenant, TenantSettings,
    };
}

/// Implements [`Store`](super::Store) for `$store` (fields `read`, `write`: pools of one sqlx
/// database; `writer`: the message insert batcher), breaking ties of a chat list's creation
/// times by the `$tiebreak` column; `$extra` holds the backend's own methods.
macro_rules! sql_store {
    ($store:ty, tiebreak: $tiebreak:literal, { $($extra:tt)* }) => {
        #[async_trait::async_trait]
        impl Store for $store {
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
                     VALUES ($1, $2, $3, $4, $5, $6)",
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
                    key_hash: crate::keys::KeyHash(key_hash.to_owned()),
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
                let sql = sqlx::AssertSqlSafe(format!("{TENANT_COLS} WHERE id = $1"));
                let row = sqlx::query_as::<_, TenantRow>(sql)
                    .bind(id)
                    .fetch_optional(&self.read)
                    .await?;
                Ok(row.map(Tenant::from))
            }

            async fn tenant_by_key_hash(&self, key_hash: &str) -> StoreResult<Option<Tenant>> {
                let sql = sqlx::AssertSqlSafe(format!("{TENANT_COLS} WHERE api_key_hash = $1"));
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
                    "UPDATE tenants SET name = COALESCE($1, name), settings = COALESCE($2, settings), \
                     updated_at = $3 WHERE id = $4",
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
                let done =
                    sqlx::query("UPDATE tenants SET api_key_hash = $1, updated_at = $2 WHERE id = $3")
                        .bind(key_hash)
                        .bind(Utc::now())
                        .bind(id)
                        .execute(&self.write)
                        .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn delete_tenant(&self, id: Uuid) -> StoreResult<bool> {
                let done = sqlx::query("DELETE FROM tenants WHERE id = $1")
                    .bind(id)
                    .execute(&self.write)
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
                .execute(&self.write)
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn add_usage(&self, tenant_id: Uuid, delta: &DailyUsage) -> StoreResult<()> {
                let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                let done = sqlx::query(super::ADD_USAGE)
                    .bind(tenant_id)
                    .bind(delta.date)
                    .bind(n(delta.messages))
                    .bind(n(delta.prompt_tokens))
                    .bind(n(delta.completion_tokens))
                    .execute(&self.write)
                    .await;
                match done {
                    // The tenant was deleted, its usage with it: a late total has nowhere to go.
                    Err(sqlx::Error::Database(db)) if db.is_foreign_key_violation() => Ok(()),
                    done => done.map(drop).map_err(StoreError::from),
                }
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
                    sqlx::query_scalar("SELECT CAST(1 AS BIGINT) FROM users WHERE tenant_id = $1 AND user_id = $2")
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
                // The first block of `seq`s is reserved by the INSERT itself ([`crate::broker::seqs::FIRST`]).
                let first = i64::try_from(crate::broker::seqs::FIRST.limit).unwrap_or(i64::MAX);
                sqlx::query(
                    "INSERT INTO chats (id, tenant_id, user_id, title, metadata, created_at, updated_at, seq_reserved) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(chat.id)
                .bind(tenant_id)
                .bind(user_id)
                .bind(title)
                .bind(Json(metadata))
                .bind(now)
                .bind(now)
                .bind(first)
                .execute(&self.write)
                .await?;
                Ok(chat)
            }

            async fn get_chat(&self, tenant_id: Uuid, chat_id: Uuid) -> StoreResult<Option<Chat>> {
                let sql = sqlx::AssertSqlSafe(format!("{CHAT_COLS} WHERE id = $1 AND tenant_id = $2"));
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
                let tiebreak = $tiebreak;
                let dir = if page.descending { "DESC" } else { "ASC" };
                let sql = sqlx::AssertSqlSafe(format!(
                    "{CHAT_COLS} WHERE tenant_id = $1 AND user_id = $2 \
                     ORDER BY created_at {dir}, {tiebreak} {dir} LIMIT $3 OFFSET $4"
                ));
                let total: i64 =
                    sqlx::query_scalar("SELECT COUNT(*) FROM chats WHERE tenant_id = $1 AND user_id = $2")
                        .bind(tenant_id)
                        .bind(user_id)
                        .fetch_one(&self.read)
                        .await?;
                let rows = sqlx::query_as::<_, ChatRow>(sql)
                    .bind(tenant_id)
                    .bind(user_id)
                    .bind(page.limit)
                    .bind(page.offset)
                    .fetch_all(&self.read)
                    .await?;
                let total = page.total_with(total, rows.len());
                Ok((rows.into_iter().map(Chat::from).collect(), total))
            }

            async fn delete_chat(&self, tenant_id: Uuid, chat_id: Uuid) -> StoreResult<bool> {
                let done = sqlx::query("DELETE FROM chats WHERE id = $1 AND tenant_id = $2")
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
                    "{MESSAGE_COLS} WHERE chat_id = $1 AND client_message_id = $2"
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
                let sql = sqlx::AssertSqlSafe(format!("{MESSAGE_COLS} WHERE reply_to = $1"));
                let row = sqlx::query_as::<_, MessageRow>(sql)
                    .bind(message_id)
                    .fetch_optional(&self.read)
                    .await?;
                row.map(Message::try_from).transpose()
            }

            async fn list_messages(&self, chat_id: Uuid, page: Page) -> StoreResult<(Vec<Message>, i64)> {
                let dir = if page.descending { "DESC" } else { "ASC" };
                let sql = sqlx::AssertSqlSafe(format!(
                    "{MESSAGE_COLS} WHERE chat_id = $1 ORDER BY seq {dir} LIMIT $2 OFFSET $3"
                ));
                let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM messages WHERE chat_id = $1")
                    .bind(chat_id)
                    .fetch_one(&self.read)
                    .await?;
                let rows = sqlx::query_as::<_, MessageRow>(sql)
                    .bind(chat_id)
                    .bind(page.limit)
                    .bind(page.offset)
                    .fetch_all(&self.read)
                    .await?;
                let total = page.total_with(total, rows.len());
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
                    "{MESSAGE_COLS} WHERE chat_id = $1 AND seq < (SELECT seq FROM messages WHERE id = $2) \
                     ORDER BY seq DESC LIMIT $3"
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

            $($extra)*
        }
    };
}

pub(super) use sql_store;
