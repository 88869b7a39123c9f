//! The SQLite store's write path: group-committed message inserts and WAL checkpoints.
//!
//! SQLite commits one transaction at a time; committing every message on its own caps the
//! store at a few thousand messages per second and makes writers queue. [`SqliteRows`] commits
//! a batch (see [`super::batch`]) in one transaction on the store's single write connection; a
//! failing insert (a chat deleted meanwhile) fails alone, since SQLite rolls back just that
//! statement.
//!
//! WAL checkpoints are taken off the write path too: the write connection has automatic
//! checkpoints disabled and a separate connection runs a passive checkpoint every 10 seconds. A
//! checkpoint syncs the database file, which can take tens of milliseconds; done inline it would
//! stall every write queued behind it (on ext4, concurrent writes wait for the journal), so it
//! runs rarely: every 10 s keeps the WAL small while touching under 1% of messages.

use async_trait::async_trait;
use sqlx::{SqlitePool, types::Json};

use super::Message;
use super::batch::{CommitRows, RowResult, WeakWriter, copy_error};

/// How often the WAL is checkpointed into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Commits batches on the store's write connection.
pub struct SqliteRows(pub SqlitePool);

#[async_trait]
impl CommitRows for SqliteRows {
    /// Runs the batch in one transaction. A batch of one runs as a plain autocommit statement:
    /// one round trip to SQLite's thread instead of three.
    async fn commit(&self, rows: &[Message]) -> Vec<RowResult> {
        if let [only] = rows {
            return vec![insert(&self.0, only).await];
        }
        let mut tx = match self.0.begin().await {
            Ok(tx) => tx,
            Err(e) => return rows.iter().map(|_| Err(copy_error(&e))).collect(),
        };
        let mut results = Vec::with_capacity(rows.len());
        for row in rows {
            results.push(insert(&mut *tx, row).await);
        }
        match tx.commit().await {
            Ok(()) => results,
            Err(e) => rows.iter().map(|_| Err(copy_error(&e))).collect(),
        }
    }
}

/// Checkpoints the WAL every [`CHECKPOINT_EVERY`] until the store is gone.
pub async fn checkpoint(pool: SqlitePool, alive: WeakWriter) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    loop {
        tick.tick().await;
        if !alive.is_alive() {
            return;
        }
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
        {
            tracing::warn!(error = %e, "WAL checkpoint failed");
        }
    }
}

async fn insert<'c, E>(executor: E, r: &Message) -> RowResult
where
    E: sqlx::Executor<'c, Database = sqlx::Sqlite>,
{
    let done = sqlx::query(
        "INSERT INTO messages \
         (id, chat_id, sender_role, user_id, content, metadata, reply_to, created_at, client_message_id) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
    )
    .bind(&r.id)
    .bind(r.chat_id)
    .bind(r.role.as_str())
    .bind(&r.user_id)
    .bind(&r.content)
    .bind(Json(&r.metadata))
    .bind(&r.reply_to)
    .bind(r.created_at)
    .bind(&r.client_message_id)
    .execute(executor)
    .await?;
    Ok(done.rows_affected() == 1)
}
