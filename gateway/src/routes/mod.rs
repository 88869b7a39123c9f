//! HTTP routes: the tenant REST API, the operator API, health, and the JSON error plumbing.

pub mod admin;
pub mod chats;
pub mod ratelimit;
pub mod tokens;

use std::{collections::HashMap, time::Duration};

use actix_web::{HttpRequest, HttpResponse, error::JsonPayloadError, web};

use crate::error::ApiError;

/// Registers every route (the operator API too unless it has its own listener); unknown
/// routes answer 404 in the error shape.
pub fn configure(cfg: &mut web::ServiceConfig, with_admin: bool) {
    extractors(cfg);
    cfg.service(web::resource("/healthz").get(shared::health::healthz))
        .service(web::resource("/readyz").get(shared::health::readyz))
        .service(web::resource("/ws/chat").get(crate::ws::ws_chat))
        .configure(crate::docs::configure);
    if with_admin {
        cfg.service(admin::scope());
    }
    cfg.service(chats::scope())
        .default_service(web::to(not_found));
}

/// The routes of the operator API's own listener (`PARLEY_ADMIN_BIND`).
pub fn configure_admin(cfg: &mut web::ServiceConfig) {
    extractors(cfg);
    cfg.service(web::resource("/healthz").get(shared::health::healthz))
        .service(admin::scope())
        .default_service(web::to(not_found));
}

/// Extractor settings whose errors answer in the API's error shape.
fn extractors(cfg: &mut web::ServiceConfig) {
    cfg.app_data(
        web::JsonConfig::default()
            .limit(256 * 1024)
            .error_handler(json_error),
    )
    .app_data(
        web::PathConfig::default().error_handler(|e, _| ApiError::Invalid(e.to_string()).into()),
    );
}

/// Runs a request within `timeouts.request_ms`; past it the request fails with 503
/// `SERVICE_UNAVAILABLE` (a dependency hangs) instead of holding its client.
pub async fn deadline<T>(
    limit: Duration,
    request: impl Future<Output = Result<T, actix_web::Error>>,
) -> Result<T, actix_web::Error> {
    tokio::time::timeout(limit, request)
        .await
        .unwrap_or_else(|_| {
            let cause = crate::error::Dependency::Gateway("the request timed out");
            Err(ApiError::Unavailable(cause).into())
        })
}

/// The request's limit (`timeouts.request_ms`).
pub fn deadline_of(req: &actix_web::dev::ServiceRequest) -> Duration {
    req.app_data::<web::Data<crate::state::AppState>>()
        .map_or(Duration::from_secs(10), |s| s.config.timeouts.request())
}

fn json_error(err: JsonPayloadError, _req: &HttpRequest) -> actix_web::Error {
    let message = match &err {
        JsonPayloadError::ContentType => "Content-Type must be application/json".to_owned(),
        JsonPayloadError::Overflow { .. } | JsonPayloadError::OverflowKnownLength { .. } => {
            "Request body is too large".to_owned()
        }
        other => format!("Request body is not valid JSON: {other}"),
    };
    ApiError::Invalid(message).into()
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    actix_web::ResponseError::error_response(&ApiError::NotFound(format!(
        "No route for {} {}",
        req.method(),
        req.path()
    )))
}

/// Query parameters as strings, tolerant of anything the client sends.
pub fn query_map(req: &HttpRequest) -> HashMap<String, String> {
    web::Query::<HashMap<String, String>>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .unwrap_or_default()
}
