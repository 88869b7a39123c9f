//! Black-box tests: the real application on port 0, driven over HTTP and WebSocket.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod admin;
mod clients;
mod cluster;
mod delivery;
mod discovery;
mod fairness;
mod faults;
mod floods;
mod helpers;
mod hostile;
mod models;
mod ops;
mod otlp;
mod rest;
mod servers;
mod tokens;
mod ws_errors;
mod ws_flow;
