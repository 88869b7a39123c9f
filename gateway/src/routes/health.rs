//! `/healthz` (the process is alive) and `/readyz` (store and broker reachable, not draining).

use actix_web::{HttpResponse, web};
use serde_json::json;

use crate::state::AppState;

/// Always 200 while the process serves HTTP.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// 200 when this gateway should receive traffic, 503 (with the failing checks) otherwise.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let store = state.store.ping().await.is_ok();
    let broker = state.broker.ping().await.is_ok();
    let draining = state.is_draining();
    let body = json!({
        "status": if store && broker && !draining { "ready" } else { "unavailable" },
        "checks": {"store": store, "broker": broker, "draining": draining},
    });
    if store && broker && !draining {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}
