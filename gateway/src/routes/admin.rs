//! The operator API (`/admin/v1`, API.md §3). Off (404) unless `PARLEY_ADMIN_TOKEN` is set;
//! then every call needs `Authorization: Bearer <token>`.

use actix_web::{
    Error, HttpResponse,
    body::MessageBody,
    dev::{ServiceRequest, ServiceResponse},
    middleware::{Next, from_fn},
    web,
};
use chrono::{NaiveDate, Utc};
use serde_json::{Value, json};
use shared::store::DailyUsage;
use uuid::Uuid;

use crate::{auth::admin_token_matches, error::ApiError, state::AppState, tenants};

/// The `/admin/v1` scope.
pub fn scope() -> actix_web::Scope<
    impl actix_web::dev::ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = Error,
        InitError = (),
    >,
> {
    web::scope("/admin/v1")
        .wrap(from_fn(admin_gate))
        .service(web::resource("/tenants").post(create).get(list))
        .service(
            web::resource("/tenants/{id}")
                .get(get)
                .patch(update)
                .delete(delete),
        )
        .service(web::resource("/tenants/{id}/rotate-key").post(rotate_key))
        .service(web::resource("/tenants/{id}/usage").get(usage))
}

async fn admin_gate(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let limit = super::deadline_of(&req);
    super::deadline(limit, gate(req, next)).await
}

async fn gate(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let Some((state, configured)) = state.and_then(|s| {
        let token = s.config.admin_token.clone().filter(|t| !t.is_empty())?;
        Some((s, token))
    }) else {
        return Err(
            ApiError::NotFound(format!("No route for {} {}", req.method(), req.path())).into(),
        );
    };
    let header = req
        .headers()
        .get("Authorization")
        .and_then(|v| v.to_str().ok());
    let client = state.throttle.client_addr(req.peer_addr(), req.headers());
    let checked = async {
        if admin_token_matches(header, &configured) {
            Ok(())
        } else {
            Err(ApiError::Unauthorized)
        }
    };
    state.throttle.guard(client, checked).await?;
    next.call(req).await
}

fn tenant_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::NotFound(format!("Tenant '{raw}' not found")))
}

fn object(body: Value) -> Result<serde_json::Map<String, Value>, ApiError> {
    match body {
        Value::Object(m) => Ok(m),
        _ => Err(ApiError::Invalid(
            "Request body must be a JSON object".into(),
        )),
    }
}

fn optional_name(body: &serde_json::Map<String, Value>) -> Result<Option<&str>, ApiError> {
    match body.get("name") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(n)) => Ok(Some(n)),
        Some(_) => Err(ApiError::Invalid("name must be a string".into())),
    }
}

async fn create(
    state: web::Data<AppState>,
    body: web::Json<Value>,
) -> Result<HttpResponse, ApiError> {
    let body = object(body.into_inner())?;
    let name = optional_name(&body)?.ok_or_else(|| ApiError::Invalid("name is required".into()))?;
    let created = tenants::create(state.store.as_ref(), name, body.get("settings")).await?;
    state.origins.invalidate();
    Ok(HttpResponse::Created().json(created))
}

async fn list(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let all = state.store.list_tenants().await?;
    Ok(HttpResponse::Ok().json(json!({ "tenants": all, "total": all.len() })))
}

async fn get(state: web::Data<AppState>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let tenant = tenants::get(state.store.as_ref(), tenant_id(&id)?).await?;
    Ok(HttpResponse::Ok().json(tenant))
}

async fn update(
    state: web::Data<AppState>,
    id: web::Path<String>,
    body: web::Json<Value>,
) -> Result<HttpResponse, ApiError> {
    let body = object(body.into_inner())?;
    let name = optional_name(&body)?;
    let settings = body.get("settings").filter(|s| !s.is_null());
    let tenant = tenants::update(state.store.as_ref(), tenant_id(&id)?, name, settings).await?;
    state.tenants.invalidate();
    state.origins.invalidate();
    Ok(HttpResponse::Ok().json(tenant))
}

async fn rotate_key(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let rotated = tenants::rotate_key(state.store.as_ref(), tenant_id(&id)?).await?;
    state.tenants.invalidate();
    state.origins.invalidate();
    state.revocations.revoke_tenant(rotated.tenant.id);
    Ok(HttpResponse::Ok().json(rotated))
}

async fn delete(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = tenant_id(&id)?;
    tenants::delete(state.store.as_ref(), id).await?;
    state.tenants.invalidate();
    state.origins.invalidate();
    state.revocations.revoke_tenant(id);
    Ok(HttpResponse::Ok().json(json!({ "success": true, "deleted_at": Utc::now() })))
}

/// `GET /admin/v1/tenants/{id}/usage?from=YYYY-MM-DD&to=YYYY-MM-DD`: daily totals (UTC days;
/// by default the last 30 days up to today), oldest first, with their sum and today's quota.
async fn usage(
    state: web::Data<AppState>,
    id: web::Path<String>,
    req: actix_web::HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let tenant = tenants::get(state.store.as_ref(), tenant_id(&id)?).await?;
    let query = crate::routes::query_map(&req);
    let date = |name: &'static str| -> Result<Option<NaiveDate>, ApiError> {
        query
            .get(name)
            .map(|v| {
                NaiveDate::parse_from_str(v, "%Y-%m-%d")
                    .map_err(|_| ApiError::Invalid(format!("{name} must be a date as YYYY-MM-DD")))
            })
            .transpose()
    };
    let to = date("to")?.unwrap_or_else(|| Utc::now().date_naive());
    let from = date("from")?.unwrap_or(to - chrono::Days::new(29));
    if from > to {
        return Err(ApiError::Invalid("from must not be after to".into()));
    }
    let days = state.store.usage(tenant.id, from, to).await?;
    let sum = |f: fn(&DailyUsage) -> u64| days.iter().map(f).sum::<u64>();
    Ok(HttpResponse::Ok().json(json!({
        "tenant_id": tenant.id,
        "from": from,
        "to": to,
        "days": days,
        "total": {
            "messages": sum(|d| d.messages),
            "prompt_tokens": sum(|d| d.prompt_tokens),
            "completion_tokens": sum(|d| d.completion_tokens),
            "total_tokens": sum(|d| d.total_tokens),
        },
        "daily_token_quota": tenant.settings.daily_token_quota,
    })))
}
