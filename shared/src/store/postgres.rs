//! The Postgres store: the source of truth of the distributed product, through sqlx.
//!
//! Migrations run at start-up (and with `gateway migrate`); sqlx holds a Postgres advisory lock
//! while migrating, so several gateways starting at once apply them exactly once. Message
//! inserts are group-committed and update their chats' counters in the same statement (see
//! `pg_batch`).

use std::{str::FromStr, time::Duration};

use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use super::batch::Writer;
use super::pg_batch::PgRows;
use super::sql::prelude::*;

/// Batches of message inserts committing at once (see [`super::batch`]); the rest of the pool
/// serves reads and other writes.
const WRITE_LANES: usize = 4;

/// Postgres-backed [`Store`].
#[derive(Clone)]
pub struct PgStore {
    /// The pool, for reads ([`super::sql`] names them apart for SQLite).
    read: PgPool,
    /// The same pool, for writes.
    write: PgPool,
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
        Ok(Self {
            read: pool.clone(),
            write: pool,
            writer,
        })
    }
}

super::sql::sql_store!(PgStore, tiebreak: "id", {
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
            .fetch_one(&self.write)
            .await?;
            Ok(chat.then_some(created))
        }
});
