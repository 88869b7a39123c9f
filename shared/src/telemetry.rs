//! Tracing set-up: JSON logs when stdout is not a terminal (production), plain text otherwise.

use std::io::IsTerminal;
use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Installs the global subscriber with the given filter (`RUST_LOG` syntax). Safe to call twice:
/// the second call is ignored, which lets tests start several apps in one process.
pub fn init(filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = if std::io::stdout().is_terminal() {
        registry.with(fmt::layer()).try_init()
    } else {
        registry
            .with(fmt::layer().json().flatten_event(true))
            .try_init()
    };
    // An Err only means a subscriber is already installed.
    drop(result);
}
