//! `/healthz` (the process is alive) and `/readyz` (store and broker reachable, not draining).

use std::{future::Future, time::Duration};

use actix_web::{HttpResponse, web};
use serde_json::{Map, Value, json};
use shared::{broker::BrokerError, store::StoreError};

use crate::state::AppState;

/// Always 200 while the process serves HTTP.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// 200 when this gateway should receive traffic, 503 otherwise. `checks` holds each check's
/// outcome and `failing` why each failed check failed: `"timed out"` for a dependency that
/// hangs (each check is bounded by its dependency's configured time limit), `"unreachable"` for
/// one that answers with an error, `"draining"` for a stopping gateway.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let timeouts = &state.config.timeouts;
    let (store, broker) = futures_util::join!(
        check(timeouts.store(), state.store.ping(), StoreError::is_timeout),
        check(
            timeouts.redis(),
            state.broker.ping(),
            BrokerError::is_timeout
        ),
    );
    let draining = state.is_draining().then_some("draining");
    let mut failing = Map::new();
    for (name, failure) in [("store", store), ("broker", broker), ("draining", draining)] {
        if let Some(why) = failure {
            failing.insert(name.into(), Value::from(why));
        }
    }
    let ready = failing.is_empty();
    let body = json!({
        "status": if ready { "ready" } else { "unavailable" },
        "checks": {
            "store": store.is_none(),
            "broker": broker.is_none(),
            "draining": draining.is_some(),
        },
        "failing": failing,
    });
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

/// `None` when the check passed, else why it failed (the cause is logged). The dependency's
/// own time limit fires first; the check's, a little later, only if that one did not.
async fn check<E: std::error::Error + 'static>(
    limit: Duration,
    ping: impl Future<Output = Result<(), E>>,
    is_timeout: fn(&E) -> bool,
) -> Option<&'static str> {
    match tokio::time::timeout(limit + Duration::from_millis(500), ping).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => {
            tracing::warn!(cause = %crate::error::Chain(&e), "readiness check failed");
            Some(if is_timeout(&e) {
                "timed out"
            } else {
                "unreachable"
            })
        }
        Err(_) => Some("timed out"),
    }
}
