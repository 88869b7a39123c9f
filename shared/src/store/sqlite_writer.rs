//! Group commit for the SQLite store's hot writes (user messages and answers).
//!
//! SQLite commits one transaction at a time; committing every message on its own caps the
//! store at a few thousand messages per second and makes writers queue. Here one task takes
//! every insert waiting at that moment (up to [`MAX_BATCH`]) and commits them in one
//! transaction; each caller still gets its own result, and a failing insert (a chat deleted
//! meanwhile) fails alone (SQLite rolls back just that statement). Under light load a batch is
//! a single insert, so latency stays that of one commit.
//!
//! WAL checkpoints are taken off the write path too: the write connection has automatic
//! checkpoints disabled and a separate connection runs a passive checkpoint every 10 seconds. A
//! checkpoint syncs the database file, which can take tens of milliseconds; done inline it would
//! stall every write queued behind it (on ext4, concurrent writes wait for the journal), so it
//! runs rarely: every 10 s keeps the WAL small while touching under 1% of messages.
//!
//! Both tasks live as long as the store: they end when the last sender (the store) is dropped.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sqlx::{SqlitePool, types::Json};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Most inserts committed in one transaction.
const MAX_BATCH: usize = 512;

/// How often the WAL is checkpointed into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// One row of `messages`.
pub struct NewRow {
    pub id: String,
    pub chat_id: Uuid,
    pub role: &'static str,
    pub user_id: String,
    pub content: String,
    pub metadata: Map<String, Value>,
    pub reply_to: Option<String>,
    pub created_at: DateTime<Utc>,
}

struct Request {
    row: NewRow,
    done: oneshot::Sender<Result<bool, sqlx::Error>>,
}

/// Handle to the writer task.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Request>,
}

impl Writer {
    /// Starts the writer task on `pool` (the store's single write connection) and the
    /// checkpoint task on `checkpoints` (a connection of its own).
    pub fn start(pool: SqlitePool, checkpoints: SqlitePool) -> Self {
        let (tx, rx) = mpsc::channel(MAX_BATCH * 8);
        tokio::spawn(run(pool, rx));
        tokio::spawn(checkpoint(checkpoints, tx.downgrade()));
        Self { tx }
    }

    /// Inserts a row; `Ok(false)` when a row with its `reply_to` already exists.
    pub async fn insert(&self, row: NewRow) -> Result<bool, sqlx::Error> {
        let (done, result) = oneshot::channel();
        self.tx
            .send(Request { row, done })
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        result.await.map_err(|_| sqlx::Error::PoolClosed)?
    }
}

async fn run(pool: SqlitePool, mut rx: mpsc::Receiver<Request>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let results = commit(&pool, &batch).await;
        for (req, result) in batch.drain(..).zip(results) {
            let _ = req.done.send(result);
        }
    }
}

async fn checkpoint(pool: SqlitePool, alive: mpsc::WeakSender<Request>) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    loop {
        tick.tick().await;
        if alive.upgrade().is_none() {
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

/// Runs the batch in one transaction; every request gets its own outcome. A batch of one runs
/// as a plain autocommit statement: one round trip to SQLite's thread instead of three.
async fn commit(pool: &SqlitePool, batch: &[Request]) -> Vec<Result<bool, sqlx::Error>> {
    if let [only] = batch {
        return vec![insert(pool, &only.row).await];
    }
    let mut tx = match pool.begin().await {
        Ok(tx) => tx,
        Err(e) => return batch.iter().map(|_| Err(copy_error(&e))).collect(),
    };
    let mut results = Vec::with_capacity(batch.len());
    for req in batch {
        results.push(insert(&mut *tx, &req.row).await);
    }
    match tx.commit().await {
        Ok(()) => results,
        Err(e) => batch.iter().map(|_| Err(copy_error(&e))).collect(),
    }
}

async fn insert<'c, E>(executor: E, r: &NewRow) -> Result<bool, sqlx::Error>
where
    E: sqlx::Executor<'c, Database = sqlx::Sqlite>,
{
    let done = sqlx::query(
        "INSERT INTO messages \
         (id, chat_id, sender_role, user_id, content, metadata, reply_to, created_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
    )
    .bind(&r.id)
    .bind(r.chat_id)
    .bind(r.role)
    .bind(&r.user_id)
    .bind(&r.content)
    .bind(Json(&r.metadata))
    .bind(&r.reply_to)
    .bind(r.created_at)
    .execute(executor)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// `sqlx::Error` is not `Clone`; a batch-wide failure is reported to each caller by message.
fn copy_error(e: &sqlx::Error) -> sqlx::Error {
    sqlx::Error::Protocol(format!("batch commit failed: {e}"))
}
