//! What the run does while it runs: counters every socket adds to, sampled once a second into
//! one progress line (elapsed, sockets, messages and tokens per second, TTFT p50/p99 of the
//! last second, errors) and into the time series of the report (`timeseries.csv`, the plots).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

/// Counters shared by every socket of the run.
pub struct Live {
    /// Sockets open now.
    pub open: AtomicI64,
    /// Tokens received so far.
    pub tokens: AtomicU64,
    /// Messages acknowledged so far.
    pub messages: AtomicU64,
    /// Answers ended so far.
    pub answers: AtomicU64,
    /// Errors (events, refusals, early closes) so far.
    pub errors: AtomicU64,
    /// Times to first token since the last sample, microseconds.
    ttft: Mutex<Histogram<u64>>,
}

/// One second of the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// Seconds since the sockets were open.
    pub t: f64,
    /// Sockets open.
    pub open_sockets: i64,
    /// Messages acknowledged per second.
    pub messages_per_s: f64,
    /// Tokens per second.
    pub tokens_per_s: f64,
    /// Answers ended per second.
    pub answers_per_s: f64,
    /// Errors in that second.
    pub errors: u64,
    /// TTFT p50 of that second, milliseconds (0: no first token).
    pub ttft_p50_ms: f64,
    /// TTFT p99 of that second, milliseconds.
    pub ttft_p99_ms: f64,
}

impl Live {
    /// Fresh counters.
    pub fn new() -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            open: AtomicI64::new(0),
            tokens: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            answers: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            ttft: Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 2)?),
        }))
    }

    /// Adds one to a counter.
    pub fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a time to first token.
    pub fn ttft(&self, d: Duration) {
        if let Ok(mut h) = self.ttft.lock() {
            h.saturating_record(u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1));
        }
    }

    /// Samples once a second until stopped, drawing the progress line (or, in a shard process,
    /// printing each row for the parent); returns the rows.
    pub async fn sample(
        self: Arc<Self>,
        mut stop: tokio::sync::watch::Receiver<bool>,
        shard: bool,
    ) -> Vec<Row> {
        let bar = if shard { ProgressBar::hidden() } else { bar() };
        let started = Instant::now();
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.tick().await;
        let (mut rows, mut last, mut last_at) = (Vec::new(), [0u64; 4], Instant::now());
        let mut errors_so_far = 0;
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = stop.changed() => break,
            }
            let now = [&self.tokens, &self.messages, &self.answers, &self.errors]
                .map(|c| c.load(Ordering::Relaxed));
            let secs = last_at.elapsed().as_secs_f64().max(1e-3);
            last_at = Instant::now();
            let rate = |i: usize| (now[i] - last[i]) as f64 / secs;
            let (p50, p99) = self.ttft.lock().map_or((0.0, 0.0), |mut h| {
                let q = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
                let out = if h.is_empty() {
                    (0.0, 0.0)
                } else {
                    (q(0.5), q(0.99))
                };
                h.reset();
                out
            });
            let row = Row {
                t: started.elapsed().as_secs_f64(),
                open_sockets: self.open.load(Ordering::Relaxed),
                tokens_per_s: rate(0),
                messages_per_s: rate(1),
                answers_per_s: rate(2),
                errors: now[3] - last[3],
                ttft_p50_ms: p50,
                ttft_p99_ms: p99,
            };
            if shard {
                crate::shards::emit(&serde_json::json!({ "row": row }));
            }
            errors_so_far += row.errors;
            bar.set_message(describe(&row, errors_so_far));
            bar.tick();
            rows.push(row);
            last = now;
        }
        bar.finish_and_clear();
        rows
    }
}

impl Row {
    /// Adds another process's row of the same second: counts and rates add up, the TTFT
    /// percentiles are the worse of the two (percentiles do not add).
    pub fn add(&mut self, other: &Row) {
        self.open_sockets += other.open_sockets;
        self.messages_per_s += other.messages_per_s;
        self.tokens_per_s += other.tokens_per_s;
        self.answers_per_s += other.answers_per_s;
        self.errors += other.errors;
        self.ttft_p50_ms = self.ttft_p50_ms.max(other.ttft_p50_ms);
        self.ttft_p99_ms = self.ttft_p99_ms.max(other.ttft_p99_ms);
    }
}

/// The progress line's spinner.
pub fn bar() -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar
}

/// The progress line for a second, with the errors so far.
pub fn describe(row: &Row, errors: u64) -> String {
    format!(
        "sockets {} · {:.0} msg/s · {:.0} tokens/s · TTFT p50 {:.1} ms p99 {:.1} ms · errors {errors}",
        row.open_sockets, row.messages_per_s, row.tokens_per_s, row.ttft_p50_ms, row.ttft_p99_ms
    )
}
