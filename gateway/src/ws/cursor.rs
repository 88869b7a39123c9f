//! A socket is a cursor into its chat's events: the last `seq` it was sent (API.md §4.1).
//!
//! Resume (`last_seq`), late join (the cursor starts just before the open answer's
//! `message_stream_started`) and a slow reader are one mechanism: the cursor takes the events
//! after it from the process's feed while they are there, and from the chat log when the feed
//! lacks them (the socket fell behind, joined late, resumed, or the gateway missed pub/sub
//! messages), then follows the feed again. Events are taken at most [`BATCH`] at a time, at the
//! socket's own pace, and each `seq` at most once, so the seam between log and feed has neither
//! a gap nor a duplicate.
//!
//! When the log cannot fill a hole: a resume gets `RESUME_UNAVAILABLE` and goes on live; a late
//! joiner goes on live silently; a socket that fell behind the retention window is a slow
//! consumer; a hole the gateway itself caused (lost pub/sub messages, Redis lost its data)
//! ends the socket with 1012 so the client resumes.

use shared::broker::{ChatLog, Head, Next, Read, Sequenced, Subscription};
use uuid::Uuid;

use crate::error::ApiError;

/// Most events taken from the feed or the log in one step.
pub const BATCH: usize = 64;

/// Most events read from the log in one round trip.
pub const LOG_BATCH: u64 = 512;

/// Why a socket's cursor cannot go on.
#[derive(Debug, PartialEq, Eq)]
pub enum CursorEnd {
    /// It fell behind what the log retains: `SLOW_CONSUMER`, close 1008.
    SlowConsumer,
    /// The gateway lost events it cannot recover: close 1012, the client resumes.
    Resync,
}

/// What a step gives the socket to write.
#[derive(Debug, Default)]
pub struct Step {
    /// Sent first: `RESUME_UNAVAILABLE` when a resume could not be honoured.
    pub notice: Option<ApiError>,
    /// The events, in `seq` order.
    pub events: Vec<Sequenced>,
}

/// How the cursor started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// `last_seq` given: the first hole it cannot fill is told to the client.
    Resume,
    /// Joined mid-answer: a hole at the start is skipped silently.
    LateJoin,
    /// Following live.
    Live,
}

/// One socket's position in its chat.
#[derive(Debug)]
pub struct ChatCursor {
    chat_id: Uuid,
    seq: u64,
    start: Start,
    /// What a resume read at the handshake found, handed out by the first [`Self::pull`]
    /// (boxed: every idle socket carries this field).
    first: Option<Box<Step>>,
    /// The chat's latest `seq` when the socket joined: the feed may not have seen those events.
    known: u64,
    /// Whether there may be events after the cursor not yet taken.
    behind: bool,
}

impl ChatCursor {
    /// A cursor for a socket joining now (not resuming): just before the open answer's
    /// `message_stream_started` if one is streaming, else at the chat's latest `seq`.
    pub fn start(chat_id: Uuid, head: Head) -> Self {
        let (seq, start) = match head.open_answer {
            Some(started) => (started.saturating_sub(1), Start::LateJoin),
            None => (head.latest, Start::Live),
        };
        Self {
            chat_id,
            seq,
            start,
            first: None,
            known: head.latest,
            behind: true,
        }
    }

    /// A cursor for a socket resuming after `last_seq`, from what the log answered to a read
    /// after it (one round trip at the handshake instead of two); the second value is the
    /// chat's latest `seq`.
    pub fn resumed(chat_id: Uuid, last_seq: u64, read: Read) -> (Self, u64) {
        let (events, latest) = match read {
            Read::Events { events, latest } => (Some(events), latest),
            Read::Unavailable { latest } => (None, latest),
        };
        let mut cursor = Self {
            chat_id,
            seq: last_seq,
            start: Start::Resume,
            first: None,
            known: latest,
            behind: true,
        };
        cursor.first = Some(Box::new(match events {
            Some(events) => cursor.take(events),
            None => {
                cursor.jump(latest);
                Step {
                    notice: Some(ApiError::ResumeUnavailable { latest }),
                    events: Vec::new(),
                }
            }
        }));
        (cursor, latest)
    }

    /// Waits until there may be events after the cursor, then takes the next ones.
    pub async fn pull(
        &mut self,
        feed: &mut Subscription,
        log: &dyn ChatLog,
    ) -> Result<Step, CursorEnd> {
        if let Some(first) = self.first.take() {
            return Ok(*first);
        }
        if !self.behind {
            feed.changed().await;
            self.behind = true;
        }
        let next = feed.next(self.seq, BATCH);
        match next {
            // Boxed: an idle socket's pending step then holds a pointer, not the log read.
            Next::UpToDate if self.known > self.seq => {
                Box::pin(self.fill(log, self.known, false)).await
            }
            Next::UpToDate => {
                self.behind = false;
                self.start = Start::Live;
                Ok(Step::default())
            }
            Next::Ready(events) => Ok(self.take(events)),
            Next::Gap { until, slow } => Box::pin(self.fill(log, until, slow)).await,
            Next::Lost => Err(CursorEnd::Resync),
        }
    }

    /// Reads the hole `(seq, until]` from the log.
    async fn fill(&mut self, log: &dyn ChatLog, until: u64, slow: bool) -> Result<Step, CursorEnd> {
        let want = usize::try_from((until - self.seq).min(LOG_BATCH)).unwrap_or(BATCH);
        let read = log.read(self.chat_id, self.seq, want).await;
        let latest = match read {
            Ok(Read::Events { events, .. }) => {
                let events: Vec<Sequenced> =
                    events.into_iter().filter(|e| e.seq <= until).collect();
                if !events.is_empty() {
                    return Ok(self.take(events));
                }
                until
            }
            Ok(Read::Unavailable { latest }) => latest,
            Err(e) => {
                tracing::warn!(error = %e, chat_id = %self.chat_id, "could not read the chat log");
                return Err(CursorEnd::Resync);
            }
        };
        match self.start {
            Start::Resume => {
                self.jump(latest.max(until));
                Ok(Step {
                    notice: Some(ApiError::ResumeUnavailable { latest: self.seq }),
                    events: Vec::new(),
                })
            }
            Start::LateJoin => {
                self.jump(latest.max(until));
                Ok(Step::default())
            }
            Start::Live if slow => Err(CursorEnd::SlowConsumer),
            Start::Live => Err(CursorEnd::Resync),
        }
    }

    fn take(&mut self, events: Vec<Sequenced>) -> Step {
        let events: Vec<Sequenced> = events.into_iter().filter(|e| e.seq > self.seq).collect();
        if let Some(last) = events.last() {
            self.seq = last.seq;
        }
        self.start = Start::Live;
        Step {
            notice: None,
            events,
        }
    }

    fn jump(&mut self, to: u64) {
        self.seq = self.seq.max(to);
        self.start = Start::Live;
    }
}
