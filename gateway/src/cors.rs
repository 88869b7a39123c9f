//! Browsers as clients (API.md §6): CORS on the tenant API, and the origins a tenant allows.
//!
//! A tenant lists the origins of its web pages in `settings.allowed_origins` (none by default).
//! A preflight carries no credentials, so it is answered before authentication, for any origin
//! that some tenant allows ([`KnownOrigins`], read from the store at most once per
//! `limits.tenant_cache_secs`, at once after an admin change on this gateway). An actual
//! response gets the CORS headers when its tenant allows the origin, or, when the request never
//! got as far as a tenant (a bad key: 401), when some tenant does, so that the page can read
//! why. No cookies are involved (credentials are explicit headers), so no
//! `Access-Control-Allow-Credentials`.
//!
//! The WebSocket handshake checks `Origin` against the tenant's list when it has one (see
//! [`origin_allowed`]).

use std::{
    collections::HashSet,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use actix_web::{
    Error, HttpMessage, HttpResponse, ResponseError,
    body::{BoxBody, MessageBody},
    dev::{ServiceRequest, ServiceResponse},
    http::{Method, header},
    middleware::Next,
    web,
};
use shared::store::{Store, StoreResult, Tenant};

use crate::{error::ApiError, state::AppState};

/// Request headers a page may send to the tenant API.
const ALLOW_HEADERS: &str = "authorization, content-type, x-api-key, x-user-id, x-chat-id";

/// Response headers a page may read.
const EXPOSE_HEADERS: &str =
    "x-ratelimit-limit, x-ratelimit-remaining, x-ratelimit-reset, retry-after";

/// Methods of the tenant API.
const ALLOW_METHODS: &str = "GET, POST, DELETE, OPTIONS";

/// How long a browser may reuse a preflight's answer, in seconds.
const MAX_AGE_SECS: &str = "600";

/// The origins any tenant allows, refreshed from the store when stale.
pub struct KnownOrigins {
    store: Arc<dyn Store>,
    ttl: Duration,
    cached: RwLock<Option<(Instant, Arc<HashSet<String>>)>>,
    refreshing: tokio::sync::Mutex<()>,
}

impl KnownOrigins {
    /// Origins read from `store`, fresh for `ttl`.
    pub fn new(store: Arc<dyn Store>, ttl: Duration) -> Self {
        Self {
            store,
            ttl,
            cached: RwLock::new(None),
            refreshing: tokio::sync::Mutex::new(()),
        }
    }

    /// Whether some tenant allows `origin`.
    pub async fn contains(&self, origin: &str) -> StoreResult<bool> {
        if let Some(known) = self.fresh() {
            return Ok(known.contains(origin));
        }
        // One refresh at a time; the others wait for it and read its result.
        let _one = self.refreshing.lock().await;
        if let Some(known) = self.fresh() {
            return Ok(known.contains(origin));
        }
        let tenants = self.store.list_tenants().await?;
        let known: HashSet<String> = tenants
            .into_iter()
            .flat_map(|t| t.settings.allowed_origins)
            .collect();
        let allowed = known.contains(origin);
        if let Ok(mut cached) = self.cached.write() {
            *cached = Some((Instant::now(), Arc::new(known)));
        }
        Ok(allowed)
    }

    fn fresh(&self) -> Option<Arc<HashSet<String>>> {
        let cached = self.cached.read().ok()?;
        let (at, known) = cached.as_ref()?;
        (at.elapsed() < self.ttl).then(|| known.clone())
    }

    /// Forgets the origins (a tenant was created, changed or deleted here).
    pub fn invalidate(&self) {
        if let Ok(mut cached) = self.cached.write() {
            *cached = None;
        }
    }
}

/// Whether a socket from `origin` may open a chat of `tenant`: always when the tenant lists no
/// origins or the client sent none (not a browser), and for a page served by this gateway
/// itself (the playground: `Origin` names the `Host` it connects to); else only a listed one.
pub fn origin_allowed(tenant: &Tenant, origin: Option<&str>, host: Option<&str>) -> bool {
    let allowed = &tenant.settings.allowed_origins;
    let Some(origin) = origin else {
        return true;
    };
    if allowed.is_empty() || allowed.iter().any(|o| o == origin) {
        return true;
    }
    let authority = origin.split_once("://").map(|(_, rest)| rest);
    authority.is_some_and(|a| Some(a) == host)
}

/// CORS for the `/api/v1` scope (outside authentication).
pub async fn cors(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, Error> {
    let Some(origin) = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
    else {
        return next
            .call(req)
            .await
            .map(ServiceResponse::map_into_boxed_body);
    };
    let Some(state) = req.app_data::<web::Data<AppState>>().cloned() else {
        return next
            .call(req)
            .await
            .map(ServiceResponse::map_into_boxed_body);
    };
    let preflight = req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if preflight {
        let known = state
            .origins
            .contains(&origin)
            .await
            .map_err(ApiError::from)?;
        return Ok(req.into_response(answer_preflight(known, &origin)));
    }
    // Handlers' errors are responses by now, and the gate answers its own refusals; only a
    // request past its deadline is still an error here, and goes without CORS headers.
    let mut res = next.call(req).await?.map_into_boxed_body();
    let tenant_allows = res
        .request()
        .extensions()
        .get::<Tenant>()
        .map(|t| t.settings.allowed_origins.contains(&origin));
    let allowed = match tenant_allows {
        Some(allowed) => allowed,
        None => state.origins.contains(&origin).await.unwrap_or(false),
    };
    if allowed {
        let headers = res.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value(&origin));
        headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, value(EXPOSE_HEADERS));
    }
    res.headers_mut().append(header::VARY, value("Origin"));
    Ok(res)
}

fn answer_preflight(known: bool, origin: &str) -> HttpResponse {
    if !known {
        return ApiError::OriginNotAllowed(origin.to_owned()).error_response();
    }
    HttpResponse::NoContent()
        .insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, origin))
        .insert_header((header::ACCESS_CONTROL_ALLOW_METHODS, ALLOW_METHODS))
        .insert_header((header::ACCESS_CONTROL_ALLOW_HEADERS, ALLOW_HEADERS))
        .insert_header((header::ACCESS_CONTROL_MAX_AGE, MAX_AGE_SECS))
        .insert_header((header::VARY, "Origin"))
        .finish()
}

fn value(s: &str) -> header::HeaderValue {
    header::HeaderValue::from_str(s).unwrap_or(header::HeaderValue::from_static(""))
}
