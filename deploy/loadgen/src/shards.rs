//! A run spread over several generator processes, with one merged report.
//!
//! One process may hold only so many sockets (its file descriptor limit: 20,000 here), and one
//! process's event loop is one core's worth of generator. With `--processes N` (or on its own
//! when `--sockets` is more than one process may hold) the parent creates the tenant and the
//! chats once, then starts N copies of itself, each given the key, the chats (in a file) and
//! `--shard I/N`: shard I runs the sockets whose index is I modulo N, so every chat keeps its
//! sender and its share of sockets as in a one-process run, and paces its own senders at its
//! share of the rate. Each shard prints a line of JSON a second (its row of the time series) and,
//! at its end, its whole report with full histograms; the parent draws the one progress line
//! from the rows summed (a second's TTFT p50 and p99 are the worst shard's), merges the reports
//! (the report's percentiles come from the merged histograms, exact, not averaged) and writes the report, the time series and the thresholds' verdict as for one process.
//! Ctrl-C reaches every process of the group: each shard writes its partial report, and the
//! parent merges what it got. The processes start together: a shard whose sockets are open says
//! so and waits; once every shard has, the parent tells them all to start (a line on their
//! standard input), so messages, the schedule and `--storm-at` storms run on one clock. A shard
//! that never gets the word ends at its deadline with a partial report.

use std::{
    io::Write as _,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Context;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt as _, BufReader};

use crate::{Args, live, setup::Target, stats::Report};

/// File descriptors a process keeps for itself beyond its sockets (stdio, the runtime, HTTP).
const RESERVED_FDS: u64 = 256;

/// A shard's place: `I/N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This shard (0-based).
    pub index: usize,
    /// Shards in the run.
    pub of: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (i, n) = s.split_once('/').ok_or("write I/N")?;
        let (index, of) = (
            i.parse::<usize>().map_err(|e| e.to_string())?,
            n.parse::<usize>().map_err(|e| e.to_string())?,
        );
        if of == 0 || index >= of {
            return Err(format!("shard {s}: need I < N"));
        }
        Ok(Self { index, of })
    }
}

impl Shard {
    /// Whether socket `i` is this shard's.
    pub fn owns(self, i: usize) -> bool {
        i % self.of == self.index
    }
}

/// How many processes the run takes: `--processes`, or else as many as the sockets need.
pub fn processes(args: &Args) -> usize {
    if args.shard.is_some() {
        return 1;
    }
    if args.processes > 0 {
        return args.processes;
    }
    let per_process = open_files_limit().map_or(u64::MAX, |n| n.saturating_sub(RESERVED_FDS));
    let sockets = args.sockets as u64;
    usize::try_from(sockets.div_ceil(per_process.max(1))).map_or(1, |n| n.max(1))
}

/// This process's soft limit on open files, from `/proc/self/limits`.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// What the shards did, merged.
pub struct Merged {
    /// Their reports.
    pub report: Report,
    /// One row a second, summed over the shards.
    pub rows: Vec<live::Row>,
    /// Until the last shard had its sockets open.
    pub opened_in: Duration,
    /// From then to the end.
    pub ran_for: Duration,
    /// Why the run was cut short, if it was (a shard's reason, or a shard that failed).
    pub partial: Option<String>,
    /// CPU seconds the shard processes used (the parent adds its own).
    pub shard_cpu_s: Option<f64>,
}

/// Runs `n` shard processes over `target` and merges what they report.
pub async fn run(args: &Args, target: &Target, n: usize) -> anyhow::Result<Merged> {
    let chats = tempfile_with(&target.chats.join("\n"))?;
    let exe = std::env::current_exe().context("finding the loadgen binary")?;
    let mut children = Vec::with_capacity(n);
    let mut starts = Vec::with_capacity(n);
    let (tx, mut lines) = tokio::sync::mpsc::channel::<(usize, Value)>(1024);
    for index in 0..n {
        let mut child = tokio::process::Command::new(&exe)
            .args(shard_args(args, target, &chats.1, index, n))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting a shard")?;
        starts.push(child.stdin.take().context("shard stdin")?);
        let out = child.stdout.take().context("shard stdout")?;
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut out = BufReader::new(out).lines();
            while let Ok(Some(line)) = out.next_line().await {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send((index, v)).await;
                }
            }
        });
        children.push(child);
    }
    drop(tx);
    let merged = gather(&mut lines, n, starts).await;
    for mut child in children {
        let _ = child.wait().await;
    }
    merged
}

/// The shard's command line: the parent's own flags, then what makes it a shard.
fn shard_args(
    args: &Args,
    target: &Target,
    chats: &std::path::Path,
    index: usize,
    n: usize,
) -> Vec<String> {
    let mut out: Vec<String> = std::env::args().skip(1).collect();
    out.extend([
        format!("--shard={index}/{n}"),
        format!("--api-key={}", target.api_key),
        format!("--chat-ids-file={}", chats.display()),
        format!("--url={}", args.url.join(",")),
    ]);
    out
}

/// Reads the shards' lines until each has sent its report.
async fn gather(
    lines: &mut tokio::sync::mpsc::Receiver<(usize, Value)>,
    n: usize,
    mut starts: Vec<tokio::process::ChildStdin>,
) -> anyhow::Result<Merged> {
    let started = Instant::now();
    let bar = live::bar();
    let mut rows: Vec<live::Row> = Vec::new();
    let mut per_shard_rows = vec![0usize; n];
    let (mut opened, mut opened_in, mut reported) = (0, None, vec![false; n]);
    let mut total = Report::new()?;
    let (mut partial, mut cpu, mut errors) = (None, 0.0, 0);
    while let Some((i, v)) = lines.recv().await {
        if let Some(row) = v.get("row") {
            let row: live::Row = serde_json::from_value(row.clone())?;
            let k = per_shard_rows[i];
            per_shard_rows[i] += 1;
            errors += row.errors;
            if rows.len() <= k {
                rows.push(row);
            } else {
                rows[k].add(&row);
            }
            if per_shard_rows[i] == per_shard_rows.iter().copied().max().unwrap_or(0) {
                bar.set_message(live::describe(&rows[k], errors));
                bar.tick();
            }
        } else if v.get("open").is_some() {
            opened += 1;
            if opened == n {
                opened_in = Some(started.elapsed());
                eprintln!("all sockets open ({n} processes)");
                for start in &mut starts {
                    // A shard that is gone has its own end to report.
                    let _ = start.write_all(b"go\n").await;
                }
            }
        } else if let Some(report) = v.get("report") {
            total.merge(Report::from_json(report)?);
            reported[i] = true;
            cpu += v.get("cpu_s").and_then(Value::as_f64).unwrap_or(0.0);
            if let Some(why) = v.get("partial").and_then(Value::as_str) {
                partial = Some(format!("shard {i}: {why}"));
            }
        }
    }
    bar.finish_and_clear();
    if let Some(missing) = reported.iter().position(|r| !r) {
        partial = Some(format!("shard {missing} ended without a report"));
    }
    let opened_in = opened_in.unwrap_or_else(|| started.elapsed());
    Ok(Merged {
        report: total,
        rows,
        opened_in,
        ran_for: started.elapsed().saturating_sub(opened_in),
        partial,
        shard_cpu_s: Some(cpu),
    })
}

/// In a shard whose sockets are open: waits for the parent's word that every shard's are (or
/// for its standard input to close: the parent is gone and the shard runs on alone). Returns
/// why the run is cut short, if it is.
pub async fn start_signal(deadline: tokio::time::Instant) -> Option<&'static str> {
    let mut word = String::new();
    let mut stdin = BufReader::new(tokio::io::stdin());
    tokio::select! {
        _ = stdin.read_line(&mut word) => None,
        () = tokio::time::sleep_until(deadline) => {
            Some("the deadline passed while other processes opened their sockets")
        }
        _ = tokio::signal::ctrl_c() => Some("interrupted (Ctrl-C) while opening sockets"),
    }
}

/// Prints one line of a shard's output for the parent.
pub fn emit(line: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A shard's end: its report and whether it was cut short.
pub fn emit_report(
    report: &Report,
    partial: Option<&str>,
    cpu_s: Option<f64>,
) -> anyhow::Result<()> {
    emit(&json!({"report": report.to_json()?, "partial": partial, "cpu_s": cpu_s}));
    Ok(())
}

/// Writes `text` to a new file under the temporary directory; the file is removed when the
/// returned guard is dropped.
fn tempfile_with(text: &str) -> anyhow::Result<(TempPath, std::path::PathBuf)> {
    let path = std::env::temp_dir().join(format!(
        "loadgen-chats-{}-{}.txt",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::write(&path, text)?;
    Ok((TempPath(path.clone()), path))
}

/// Removes its file when dropped.
struct TempPath(std::path::PathBuf);

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_split_the_sockets_between_them() {
        let shards: Vec<Shard> = ["0/3", "1/3", "2/3"]
            .iter()
            .map(|s| s.parse().unwrap_or(Shard { index: 9, of: 9 }))
            .collect();
        for i in 0..30 {
            assert_eq!(shards.iter().filter(|s| s.owns(i)).count(), 1);
        }
        assert!("3/3".parse::<Shard>().is_err());
        assert!("1".parse::<Shard>().is_err());
        assert!("0/0".parse::<Shard>().is_err());
    }
}
