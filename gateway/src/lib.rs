//! Parley's gateway: the REST API, the operator API and CLI, and the WebSocket protocol.
//!
//! - [`startup`]: `Application::build` wires store, broker, limits and (embedded) worker.
//! - [`routes`]: REST, admin and health handlers.
//! - [`ws`]: the WebSocket endpoint, the per-socket loop and its cursor into the chat's events.
//! - [`messages`]: accepting a chat message (limits, quota, save, announce and queue).
//! - [`auth`], [`tenants`]: keys, the admin token, tenant operations shared with the CLI.
//! - [`quota`]: daily token quotas.
//! - [`throttle`]: failed authentications throttled per source address.
//! - [`tokens`]: client tokens (browser-safe, short-lived JWTs); [`cors`]: browser origins.
//! - [`docs`]: the OpenAPI document, the reference page and the playground.
//! - [`error`]: the one mapping from failures to HTTP responses and WebSocket error events.

pub mod auth;
pub mod cli;
pub mod cors;
pub mod docs;
pub mod error;
pub mod messages;
pub mod quota;
pub mod revocation;
pub mod routes;
pub mod startup;
pub mod state;
pub mod tenants;
pub mod throttle;
pub mod tokens;
pub mod ws;

pub use startup::{Application, Stopper};
