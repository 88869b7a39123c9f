//! Health of a process, one implementation for the gateway (its main port) and the worker (its
//! metrics port): `/healthz` answers while the process runs; `/readyz` answers 200 when the
//! store and the broker answer, each within its configured time limit, and the process is not
//! draining, else 503.
//!
//! The body names each check's outcome (`checks`) and why each failed check failed
//! (`failing`): `"timed out"` for a dependency that hangs, `"unreachable"` for one that answers
//! with an error, `"draining"` for a process that is stopping.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use actix_web::{HttpResponse, web};
use serde_json::{Map, Value, json};

use crate::{
    broker::{Broker, BrokerError},
    config::TimeoutsConfig,
    store::{Store, StoreError},
};

/// What a process's readiness depends on.
pub struct Readiness {
    store: Arc<dyn Store>,
    broker: Arc<dyn Broker>,
    timeouts: TimeoutsConfig,
    draining: Arc<AtomicBool>,
}

impl Readiness {
    /// Readiness of a process using `store` and `broker`, not ready once `draining` is set.
    pub fn new(
        store: Arc<dyn Store>,
        broker: Arc<dyn Broker>,
        timeouts: TimeoutsConfig,
        draining: Arc<AtomicBool>,
    ) -> Self {
        Self {
            store,
            broker,
            timeouts,
            draining,
        }
    }

    /// Whether the process is ready, and the body that says why.
    pub async fn check(&self) -> (bool, Value) {
        let (store, broker) = futures_util::join!(
            check(
                self.timeouts.store(),
                self.store.ping(),
                StoreError::is_timeout
            ),
            check(
                self.timeouts.redis(),
                self.broker.ping(),
                BrokerError::is_timeout
            ),
        );
        let draining = self.draining.load(Ordering::SeqCst).then_some("draining");
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
        (ready, body)
    }
}

/// Always 200 while the process serves HTTP.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// 200 when the process should receive work, 503 otherwise (see the module).
pub async fn readyz(readiness: web::Data<Readiness>) -> HttpResponse {
    let (ready, body) = readiness.check().await;
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
            tracing::warn!(cause = %crate::telemetry::Chain(&e), "readiness check failed");
            Some(if is_timeout(&e) {
                "timed out"
            } else {
                "unreachable"
            })
        }
        Err(_) => Some("timed out"),
    }
}
