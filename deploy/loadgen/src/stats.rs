//! Per-socket measurements and their merged summary.
//!
//! Latencies are kept in full HDR histograms (3 significant digits, 1 µs to 10 min) and
//! reported as k6 does (`avg min p50 p90 p95 p99 p99_9 max`, in milliseconds): connect (TCP
//! connect → `connection_established`), ack (send → `message_received`), TTFT (send → first
//! token), ITL (gap between consecutive tokens of one answer) and end to end (send →
//! `message_stream_ended`).

use std::{collections::BTreeMap, time::Duration};

use hdrhistogram::Histogram;
use serde_json::{Map, Value, json};

/// What one socket (or, merged, the whole run) saw.
pub struct Report {
    /// Sockets merged into this report that completed their handshake.
    pub sockets: u64,
    /// Token events received.
    pub tokens: u64,
    /// Answers completed (`message_stream_ended`).
    pub answers: u64,
    /// Error events received, by `error_code`.
    pub errors: BTreeMap<String, u64>,
    /// Handshakes refused, by `error_code` (or `connect` when no socket opened at all).
    pub refused: BTreeMap<String, u64>,
    /// Reconnections after a close (1012 and the like), resuming with `last_seq`.
    pub reconnects: u64,
    /// Protocol violations (order, content mismatch, unparsable events, `seq` gaps).
    pub violations: u64,
    /// Paced sends that could not go out on time (the generator or the socket fell behind).
    pub dropped_sends: u64,
    /// Answers (of the sender's own messages) that ended within the goodput bound.
    pub good_answers: u64,
    /// TCP connect → `connection_established`, microseconds.
    pub connect_us: Histogram<u64>,
    /// Send → `message_received`, microseconds.
    pub ack_us: Histogram<u64>,
    /// Send → first token of its answer, microseconds.
    pub ttft_us: Histogram<u64>,
    /// Between consecutive tokens of one answer, microseconds.
    pub itl_us: Histogram<u64>,
    /// Send → `message_stream_ended`, microseconds.
    pub e2e_us: Histogram<u64>,
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 600_000_000, 3)?)
}

impl Report {
    /// An empty report.
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            sockets: 0,
            tokens: 0,
            answers: 0,
            errors: BTreeMap::new(),
            refused: BTreeMap::new(),
            reconnects: 0,
            violations: 0,
            dropped_sends: 0,
            good_answers: 0,
            connect_us: histogram()?,
            ack_us: histogram()?,
            ttft_us: histogram()?,
            itl_us: histogram()?,
            e2e_us: histogram()?,
        })
    }

    /// Records a duration in a histogram, saturating at its bound.
    pub fn record(hist: &mut Histogram<u64>, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        hist.saturating_record(us);
    }

    /// Counts one under `code`.
    pub fn count(map: &mut BTreeMap<String, u64>, code: &str) {
        *map.entry(code.to_owned()).or_default() += 1;
    }

    /// Adds another report into this one.
    pub fn merge(&mut self, other: Report) {
        self.sockets += other.sockets;
        self.tokens += other.tokens;
        self.answers += other.answers;
        self.reconnects += other.reconnects;
        self.violations += other.violations;
        self.dropped_sends += other.dropped_sends;
        self.good_answers += other.good_answers;
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
        for (code, n) in other.refused {
            *self.refused.entry(code).or_default() += n;
        }
        for (mine, theirs) in [
            (&mut self.connect_us, &other.connect_us),
            (&mut self.ack_us, &other.ack_us),
            (&mut self.ttft_us, &other.ttft_us),
            (&mut self.itl_us, &other.itl_us),
            (&mut self.e2e_us, &other.e2e_us),
        ] {
            let _ = mine.add(theirs);
        }
    }

    /// The measured part of the summary (the caller adds what the run was).
    pub fn summary(&self, elapsed: Duration) -> Map<String, Value> {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let total = |m: &BTreeMap<String, u64>| m.values().sum::<u64>();
        let mut out = Map::new();
        let mut put = |k: &str, v: Value| {
            out.insert(k.to_owned(), v);
        };
        put("sockets", json!(self.sockets));
        put("elapsed_s", json!(secs));
        put("answers", json!(self.answers));
        put("tokens_delivered", json!(self.tokens));
        put("tokens_per_second", json!(self.tokens as f64 / secs));
        put(
            "messages_per_second",
            json!(self.ack_us.len() as f64 / secs),
        );
        for (name, h) in [
            ("connect_ms", &self.connect_us),
            ("ack_ms", &self.ack_us),
            ("ttft_ms", &self.ttft_us),
            ("itl_ms", &self.itl_us),
            ("e2e_ms", &self.e2e_us),
        ] {
            put(name, latency(h));
        }
        put("errors", json!(total(&self.errors)));
        put("errors_by_code", json!(self.errors));
        put("refused", json!(total(&self.refused)));
        put("refused_by_code", json!(self.refused));
        put("reconnects", json!(self.reconnects));
        put("protocol_violations", json!(self.violations));
        put("dropped_sends", json!(self.dropped_sends));
        // Of the answers a sender timed (the other sockets of a chat see them too).
        let timed = self.e2e_us.len();
        let goodput = if timed == 0 {
            0.0
        } else {
            self.good_answers as f64 / timed as f64
        };
        put("goodput", json!(goodput));
        out
    }
}

/// A histogram's k6-style statistics, in milliseconds.
pub fn latency(h: &Histogram<u64>) -> Value {
    let ms = |us: u64| us as f64 / 1000.0;
    if h.is_empty() {
        return json!({"count": 0});
    }
    json!({
        "count": h.len(),
        "avg": h.mean() / 1000.0,
        "min": ms(h.min()),
        "p50": ms(h.value_at_quantile(0.5)),
        "p90": ms(h.value_at_quantile(0.9)),
        "p95": ms(h.value_at_quantile(0.95)),
        "p99": ms(h.value_at_quantile(0.99)),
        "p99_9": ms(h.value_at_quantile(0.999)),
        "max": ms(h.max()),
    })
}

/// CPU seconds this process has used (user + system), from `/proc/self/stat`; none elsewhere.
pub fn own_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) closed by ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    Some((ticks(11)? + ticks(12)?) / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_reports_add_counts_and_histograms() -> anyhow::Result<()> {
        let mut a = Report::new()?;
        let mut b = Report::new()?;
        a.tokens = 3;
        Report::count(&mut a.errors, "AI_ERROR");
        Report::count(&mut b.errors, "AI_ERROR");
        Report::count(&mut b.refused, "CONNECTION_LIMIT");
        Report::record(&mut a.ttft_us, Duration::from_millis(10));
        Report::record(&mut b.ttft_us, Duration::from_millis(30));
        a.merge(b);
        let s = a.summary(Duration::from_secs(1));
        assert_eq!(s["errors"], 2);
        assert_eq!(s["errors_by_code"]["AI_ERROR"], 2);
        assert_eq!(s["refused_by_code"]["CONNECTION_LIMIT"], 1);
        assert_eq!(s["ttft_ms"]["count"], 2);
        assert!((s["ttft_ms"]["max"].as_f64().unwrap_or(0.0) - 30.0).abs() < 0.1);
        assert!((s["ttft_ms"]["avg"].as_f64().unwrap_or(0.0) - 20.0).abs() < 0.1);
        assert_eq!(s["itl_ms"], json!({"count": 0}));
        Ok(())
    }

    #[test]
    fn percentiles_come_from_the_whole_histogram() -> anyhow::Result<()> {
        let mut h = histogram()?;
        for ms in 1..=1000 {
            h.record(ms * 1000)?;
        }
        let l = latency(&h);
        assert!((l["p50"].as_f64().unwrap_or(0.0) - 500.0).abs() < 1.0);
        assert!((l["p99"].as_f64().unwrap_or(0.0) - 990.0).abs() < 1.0);
        assert!((l["p99_9"].as_f64().unwrap_or(0.0) - 999.0).abs() < 1.0);
        assert_eq!(l["min"], 1.0);
        Ok(())
    }

    #[test]
    fn own_cpu_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(own_cpu_seconds().is_some_and(|s| s >= 0.0));
        }
    }
}
