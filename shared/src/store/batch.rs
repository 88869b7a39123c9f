//! Group commit of message inserts, the hot writes of both stores.
//!
//! Every chat turn writes two rows (the user's message, the answer); committing each on its own
//! makes the database spend most of its time on per-statement and per-commit overhead (SQLite
//! commits one transaction at a time; Postgres pays a WAL flush and a backend round trip per
//! commit). Here callers queue their row and wait; a lane takes every row waiting at that moment
//! (up to [`MAX_BATCH`]) and hands them to the store's [`CommitRows`] in one go. Each caller
//! still gets its own outcome. Under light load a batch is a single row, so latency stays that
//! of one insert; under load batches grow by themselves.
//!
//! Order: a caller waits for its row to be committed before it sends the next one (a socket's
//! messages, a chat's answer after its question), so batches committing side by side on several
//! lanes never reorder the rows of one conversation.
//!
//! The lanes live as long as the store: they end when the last [`Writer`] is dropped.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{Message, NewAnswer, NewUserMessage, Role};

/// Most rows committed in one batch.
pub const MAX_BATCH: usize = 512;

/// The outcome of one insert: `Ok(false)` when a row with its `reply_to` already exists.
pub type RowResult = Result<bool, sqlx::Error>;

/// A new user message, stamped now.
fn user_message(new: &NewUserMessage<'_>) -> Message {
    Message {
        id: crate::protocol::message_id(),
        chat_id: new.chat_id,
        role: Role::User,
        user_id: new.user_id.to_owned(),
        content: new.content.to_owned(),
        metadata: new.metadata.clone(),
        reply_to: None,
        client_message_id: new.client_message_id.map(str::to_owned),
        created_at: Utc::now(),
    }
}

/// The message of an answer, stamped now.
fn answer_message(a: &NewAnswer) -> Message {
    Message {
        id: a.id.clone(),
        chat_id: a.chat_id,
        role: Role::Assistant,
        user_id: a.user_id.clone(),
        content: a.content.clone(),
        metadata: a.metadata.clone(),
        reply_to: Some(a.reply_to.clone()),
        client_message_id: None,
        created_at: Utc::now(),
    }
}

/// How a store commits a batch of rows.
#[async_trait]
pub trait CommitRows: Send + Sync + 'static {
    /// Inserts `rows`, returning one outcome per row, in order. A row that fails (its chat was
    /// deleted meanwhile) should fail alone.
    async fn commit(&self, rows: &[Message]) -> Vec<RowResult>;
}

struct Request {
    row: Message,
    done: oneshot::Sender<RowResult>,
}

/// Handle to the lanes; cloning it shares them.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Request>,
}

impl Writer {
    /// Starts `lanes` tasks committing through `commit` (one lane for a database with one
    /// writer; more let a batch gather while another commits).
    pub fn start(commit: impl CommitRows, lanes: usize) -> Self {
        let (tx, rx) = mpsc::channel(MAX_BATCH * 8);
        let rx = Arc::new(Mutex::new(rx));
        let commit = Arc::new(commit);
        for _ in 0..lanes.max(1) {
            tokio::spawn(lane(commit.clone(), rx.clone()));
        }
        Self { tx }
    }

    /// Inserts a row once its batch commits.
    async fn insert(&self, row: Message) -> RowResult {
        let (done, result) = oneshot::channel();
        self.tx
            .send(Request { row, done })
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        result.await.map_err(|_| sqlx::Error::PoolClosed)?
    }

    /// Saves a new user message; the message as saved.
    /// Saves a user message; the flag is false (and nothing saved) when its
    /// `client_message_id` was already used in the chat.
    pub async fn add_user_message(
        &self,
        new: &NewUserMessage<'_>,
    ) -> Result<(Message, bool), sqlx::Error> {
        let message = user_message(new);
        let inserted = self.insert(message.clone()).await?;
        Ok((message, inserted))
    }

    /// Saves an answer; `Ok(false)` when its message already has one.
    pub async fn add_answer(&self, answer: &NewAnswer) -> RowResult {
        self.insert(answer_message(answer)).await
    }

    /// A handle that does not keep the lanes alive (for tasks that should end with the store).
    pub fn downgrade(&self) -> WeakWriter {
        WeakWriter(self.tx.downgrade())
    }
}

/// See [`Writer::downgrade`].
pub struct WeakWriter(mpsc::WeakSender<Request>);

impl WeakWriter {
    /// Whether any [`Writer`] is left.
    pub fn is_alive(&self) -> bool {
        self.0.upgrade().is_some()
    }
}

async fn lane<C: CommitRows>(commit: Arc<C>, rx: Arc<Mutex<mpsc::Receiver<Request>>>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        // The lock is held only while gathering, so other lanes gather while this one commits.
        if rx.lock().await.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        let (rows, dones): (Vec<_>, Vec<_>) = batch.drain(..).map(|r| (r.row, r.done)).unzip();
        let results = commit.commit(&rows).await;
        for (done, result) in dones.into_iter().zip(results) {
            let _ = done.send(result);
        }
    }
}

/// `sqlx::Error` is not `Clone`; a batch-wide failure is reported to each caller by message.
pub fn copy_error(e: &sqlx::Error) -> sqlx::Error {
    sqlx::Error::Protocol(format!("batch commit failed: {e}"))
}
