//! Per-socket measurements and their merged summary.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::Args;

/// What one socket (or, merged, the whole run) saw.
pub struct Report {
    /// Sockets merged into this report.
    pub sockets: u64,
    /// Token events received.
    pub tokens: u64,
    /// Answers completed (`message_stream_ended`).
    pub answers: u64,
    /// Error events received.
    pub errors: u64,
    /// Protocol violations (order, content mismatch, unparsable events).
    pub violations: u64,
    /// Send → `message_received`, microseconds.
    pub ack_us: Histogram<u64>,
    /// Send → first token of its answer, microseconds.
    pub ttft_us: Histogram<u64>,
}

impl Report {
    /// An empty report.
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            sockets: 0,
            tokens: 0,
            answers: 0,
            errors: 0,
            violations: 0,
            ack_us: Histogram::new_with_bounds(1, 600_000_000, 3)?,
            ttft_us: Histogram::new_with_bounds(1, 600_000_000, 3)?,
        })
    }

    /// Records a duration in a histogram, saturating at its bound.
    pub fn record(hist: &mut Histogram<u64>, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        hist.saturating_record(us);
    }

    /// Adds another report into this one.
    pub fn merge(&mut self, other: Report) {
        self.sockets += other.sockets;
        self.tokens += other.tokens;
        self.answers += other.answers;
        self.errors += other.errors;
        self.violations += other.violations;
        let _ = self.ack_us.add(&other.ack_us);
        let _ = self.ttft_us.add(&other.ttft_us);
    }

    /// The JSON summary of a finished run.
    pub fn summary(&self, args: &Args, elapsed: Duration) -> Value {
        let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        let secs = elapsed.as_secs_f64().max(1e-9);
        json!({
            "sockets": self.sockets,
            "chats": args.chats,
            "messages_per_chat": args.messages,
            "mode": if args.rate > 0.0 { format!("paced {} msg/s", args.rate) } else { "back-to-back".into() },
            "elapsed_s": secs,
            "answers": self.answers,
            "tokens_delivered": self.tokens,
            "tokens_per_second": self.tokens as f64 / secs,
            "messages_per_second": self.ack_us.len() as f64 / secs,
            "ack_ms": {"p50": ms(&self.ack_us, 0.5), "p99": ms(&self.ack_us, 0.99), "max": self.ack_us.max() as f64 / 1000.0},
            "ttft_ms": {"p50": ms(&self.ttft_us, 0.5), "p99": ms(&self.ttft_us, 0.99), "max": self.ttft_us.max() as f64 / 1000.0},
            "errors": self.errors,
            "protocol_violations": self.violations,
        })
    }
}
