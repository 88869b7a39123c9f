//! The embedded store: one SQLite file in WAL mode, through sqlx.
//!
//! Every write is a single autocommit statement (counters are kept by a trigger), so writers
//! only ever wait on SQLite's lock (`busy_timeout`) and never fail a lock upgrade.

use std::{str::FromStr, time::Duration};

use sqlx::{
    SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};

use super::batch::Writer;
use super::sql::prelude::*;
use super::sqlite_writer::{SqliteRows, checkpoint};

/// SQLite-backed [`Store`].
///
/// Writes go through a pool of exactly one connection: SQLite allows one writer at a time, and
/// writers that contend for its lock wait in sleeps of growing length (1, 2, 5, 10 ms …), which
/// would dominate latency. One writer never contends; readers use their own pool (WAL lets them
/// read while the writer writes). Message inserts, the hot writes, are group-committed and WAL
/// checkpoints run on their own connection (see `sqlite_writer`).
#[derive(Clone)]
pub struct SqliteStore {
    read: SqlitePool,
    write: SqlitePool,
    writer: Writer,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `url` and applies migrations; a statement
    /// waits at most `lock_wait` for the database's lock.
    pub async fn connect(url: &str, lock_wait: Duration) -> StoreResult<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(lock_wait)
            .foreign_keys(true);
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone().pragma("wal_autocheckpoint", "0"))
            .await?;
        let checkpoints = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&write).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;
        let writer = Writer::start(SqliteRows(write.clone()), 1);
        tokio::spawn(checkpoint(checkpoints, writer.downgrade()));
        Ok(Self {
            read,
            write,
            writer,
        })
    }
}

super::sql::sql_store!(SqliteStore, tiebreak: "rowid", {});
