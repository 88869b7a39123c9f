//! The Postgres store's message inserts, group-committed (see [`super::batch`]).
//!
//! A batch is one transaction of three statements: lock the batch's chats in id order, insert
//! every row from arrays (`unnest`) and bump each chat's counters by its rows, all in one
//! statement. Locking in id order first is what keeps two batches that touch the same chats
//! (a gateway's questions, a worker's answers) from deadlocking on the counter updates. If the
//! batch fails (a chat deleted meanwhile breaks its foreign key), it is split in halves and each
//! half tried again, down to the failing rows: one bad row among n costs about 2·log2(n) more
//! statements, not n, and the other tenants' rows of the batch are saved. A batch of one is the
//! single-row statement, one round trip.

use async_trait::async_trait;
use sqlx::{PgPool, types::Json};
use uuid::Uuid;

use super::Message;
use super::batch::{CommitRows, RowResult};

/// Inserts a message and bumps its chat's counters; affects one row, or none when `reply_to`
/// already has an answer.
const INSERT_MESSAGE: &str = "WITH m AS ( \
        INSERT INTO messages (id, chat_id, sender_role, user_id, content, metadata, reply_to, created_at, \
            client_message_id) \
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING RETURNING chat_id, created_at) \
    UPDATE chats SET message_count = message_count + 1, last_message_at = m.created_at, \
        updated_at = m.created_at FROM m WHERE chats.id = m.chat_id";

/// Locks the chats of a batch in a fixed order.
const LOCK_CHATS: &str = "SELECT 1 FROM chats WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE";

/// Inserts a batch given as arrays, in their order, and bumps the counters of each chat;
/// returns the ids inserted (a row whose `reply_to` already has an answer is not).
const INSERT_BATCH: &str = "WITH m AS ( \
        INSERT INTO messages (id, chat_id, sender_role, user_id, content, metadata, reply_to, created_at, \
            client_message_id) \
        SELECT id, chat_id, sender_role, user_id, content, metadata::jsonb, reply_to, created_at, client_message_id \
        FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], \
                    $7::text[], $8::timestamptz[], $9::text[]) \
             WITH ORDINALITY AS r(id, chat_id, sender_role, user_id, content, metadata, reply_to, created_at, \
                                  client_message_id, n) \
        ORDER BY n ON CONFLICT DO NOTHING RETURNING id, chat_id, created_at), \
    c AS (UPDATE chats SET message_count = message_count + s.n, last_message_at = s.at, updated_at = s.at \
        FROM (SELECT chat_id, count(*) AS n, max(created_at) AS at FROM m GROUP BY chat_id) s \
        WHERE chats.id = s.chat_id) \
    SELECT id FROM m";

/// Commits batches through the store's pool.
pub struct PgRows(pub PgPool);

#[async_trait]
impl CommitRows for PgRows {
    async fn commit(&self, rows: &[Message]) -> Vec<RowResult> {
        commit_split(&self.0, rows).await
    }
}

/// Commits rows as one batch; when that fails, each half the same way.
fn commit_split<'a>(
    pool: &'a PgPool,
    rows: &'a [Message],
) -> futures_util::future::BoxFuture<'a, Vec<RowResult>> {
    Box::pin(async move {
        if let [only] = rows {
            return vec![insert_one(pool, only).await];
        }
        match insert_batch(pool, rows).await {
            Ok(inserted) => rows.iter().map(|r| Ok(inserted.contains(&r.id))).collect(),
            Err(e) => {
                tracing::debug!(error = %e, rows = rows.len(), "batch insert failed; splitting it");
                let (left, right) = rows.split_at(rows.len() / 2);
                let mut results = commit_split(pool, left).await;
                results.extend(commit_split(pool, right).await);
                results
            }
        }
    })
}

/// Inserts one row.
pub async fn insert_one(pool: &PgPool, m: &Message) -> RowResult {
    let done = sqlx::query(INSERT_MESSAGE)
        .bind(&m.id)
        .bind(m.chat_id)
        .bind(m.role.as_str())
        .bind(&m.user_id)
        .bind(&m.content)
        .bind(Json(&m.metadata))
        .bind(&m.reply_to)
        .bind(m.created_at)
        .bind(&m.client_message_id)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() == 1)
}

async fn insert_batch(
    pool: &PgPool,
    rows: &[Message],
) -> Result<std::collections::HashSet<String>, sqlx::Error> {
    let mut chats: Vec<Uuid> = rows.iter().map(|r| r.chat_id).collect();
    chats.sort_unstable();
    chats.dedup();
    let mut tx = pool.begin().await?;
    sqlx::query(LOCK_CHATS)
        .bind(&chats)
        .execute(&mut *tx)
        .await?;
    let inserted: Vec<(String,)> = sqlx::query_as(INSERT_BATCH)
        .bind(rows.iter().map(|r| r.id.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.chat_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.role.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.user_id.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.content.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(metadata_text).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|r| r.reply_to.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|r| r.created_at).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|r| r.client_message_id.as_deref())
                .collect::<Vec<_>>(),
        )
        .fetch_all(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(inserted.into_iter().map(|(id,)| id).collect())
}

/// A row's metadata as JSON text (a map of JSON values always serializes).
fn metadata_text(r: &Message) -> String {
    serde_json::to_string(&r.metadata).unwrap_or_else(|_| "{}".to_owned())
}
