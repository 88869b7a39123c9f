//! Tenant authentication (API key, or a client token for reads) and the per-tenant REST rate
//! limit, as middleware on `/api/v1`.
//!
//! The limit is a fixed one-minute window per tenant kept in the [`Limits`](shared::limits::Limits)
//! store (in Redis when distributed, so it is counted across gateways). Every response carries
//! `X-RateLimit-Limit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset` (seconds until the window
//! resets); a refusal is 429 with `Retry-After`.

use std::time::Duration;

use actix_web::{
    Error, HttpMessage, ResponseError,
    body::{BoxBody, MessageBody},
    dev::{ServiceRequest, ServiceResponse},
    http::header::{HeaderName, HeaderValue},
    middleware::Next,
    web,
};
use shared::limits::RateDecision;

use crate::{
    error::{ApiError, Dependency},
    state::AppState,
};

const WINDOW: Duration = Duration::from_secs(60);

/// Resolves `X-API-Key` (or a client token, stored too) to a tenant (stored in the request
/// extensions) and counts the request;
/// the whole request is bounded by [`super::deadline`].
pub async fn tenant_gate(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, Error> {
    let limit = super::deadline_of(&req);
    super::deadline(limit, gate(req, next)).await
}

async fn gate(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, Error> {
    let Some(state) = req.app_data::<web::Data<AppState>>().cloned() else {
        return Err(ApiError::Unavailable(Dependency::Gateway("application state missing")).into());
    };
    let client = state.throttle.client_addr(req.peer_addr(), req.headers());
    let caller = state
        .throttle
        .guard(client, crate::auth::rest_caller(&state, req.headers()))
        .await;
    // Refusals are answered here (not returned as errors) so that the CORS layer outside
    // can still add its headers: a page must be able to read why it was refused.
    let (tenant, token) = match caller {
        Ok((_, Some(_))) if req.method() != actix_web::http::Method::GET => {
            return Ok(req.into_response(ApiError::KeyRequired.error_response()));
        }
        Ok(caller) => caller,
        Err(e) => return Ok(req.into_response(e.error_response())),
    };
    let limit = tenant.settings.requests_per_minute;
    let decision = state
        .limits
        .hit(&format!("rest:{}", tenant.id), limit, WINDOW)
        .await
        .map_err(ApiError::from)?;
    if !decision.allowed {
        let err = ApiError::RateLimited {
            limit,
            retry_after_secs: decision.reset_after.as_secs().max(1),
        };
        let mut res = req.into_response(err.error_response());
        add_headers(&mut res, &decision);
        return Ok(res);
    }
    req.extensions_mut().insert(tenant);
    if let Some(token) = token {
        req.extensions_mut().insert(token);
    }
    let mut res = next.call(req).await?.map_into_boxed_body();
    add_headers(&mut res, &decision);
    Ok(res)
}

fn add_headers(res: &mut ServiceResponse<BoxBody>, d: &RateDecision) {
    let reset = d.reset_after.as_secs_f64().ceil() as u64;
    let headers = res.headers_mut();
    for (name, value) in [
        ("x-ratelimit-limit", u64::from(d.limit)),
        ("x-ratelimit-remaining", u64::from(d.remaining)),
        ("x-ratelimit-reset", reset),
    ] {
        headers.insert(HeaderName::from_static(name), HeaderValue::from(value));
    }
}
