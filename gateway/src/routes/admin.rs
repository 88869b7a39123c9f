//! The operator API (`/admin/v1`, API.md §3). Off (404) unless `PARLEY_ADMIN_TOKEN` is set;
//! then every call needs `Authorization: Bearer <token>`.

use actix_web::{
    Error, HttpResponse,
    body::MessageBody,
    dev::{ServiceRequest, ServiceResponse},
    middleware::{Next, from_fn},
    web,
};
use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use serde_json::Value;
use shared::store::{DailyUsage, Tenant, TenantSettings};
use uuid::Uuid;

use crate::{
    auth::admin_token_matches,
    error::ApiError,
    state::AppState,
    tenants::{self, TenantWithKey},
};

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

/// The body of `POST /admin/v1/tenants`.
#[derive(utoipa::ToSchema)]
#[expect(
    dead_code,
    reason = "a schema of the body, which is parsed field by field"
)]
pub struct CreateTenant {
    /// A unique name, 1 to 200 characters.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000-\u0008\u000B\u000C\u000E-\u001F]*[^\s\u0000-\u001F][^\u0000-\u0008\u000B\u000C\u000E-\u001F]*$"
    )]
    name: String,
    /// Settings to change from their defaults.
    settings: Option<TenantSettings>,
}

/// The body of `PATCH /admin/v1/tenants/{id}`.
#[derive(utoipa::ToSchema)]
#[expect(
    dead_code,
    reason = "a schema of the body, which is parsed field by field"
)]
pub struct UpdateTenant {
    /// A new unique name.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000-\u0008\u000B\u000C\u000E-\u001F]*[^\s\u0000-\u001F][^\u0000-\u0008\u000B\u000C\u000E-\u001F]*$"
    )]
    name: Option<String>,
    /// A JSON merge patch of the settings: the fields given replace the current ones
    /// (`agent.options` can change one key at a time; null resets a field to its default).
    settings: Option<TenantSettings>,
}

/// Every tenant.
#[derive(Serialize, utoipa::ToSchema)]
pub struct TenantList {
    /// The tenants.
    tenants: Vec<Tenant>,
    /// How many.
    total: usize,
}

/// The answer to a tenant's deletion.
#[derive(Serialize, utoipa::ToSchema)]
pub struct TenantDeleted {
    /// Always true.
    success: bool,
    /// When.
    deleted_at: DateTime<Utc>,
}

/// Usage totals of one day, summed.
#[derive(Serialize, utoipa::ToSchema)]
pub struct UsageTotal {
    /// Answers saved.
    messages: u64,
    /// Tokens sent to the model.
    prompt_tokens: u64,
    /// Tokens of the answers.
    completion_tokens: u64,
    /// Their sum.
    total_tokens: u64,
}

/// A tenant's usage over a range of days.
#[derive(Serialize, utoipa::ToSchema)]
pub struct UsageReport {
    /// The tenant.
    tenant_id: Uuid,
    /// First day (UTC).
    from: NaiveDate,
    /// Last day (UTC).
    to: NaiveDate,
    /// Days with usage, oldest first.
    days: Vec<DailyUsage>,
    /// Their sum.
    total: UsageTotal,
    /// The tenant's daily quota, if any.
    daily_token_quota: Option<u64>,
}

#[utoipa::path(post, path = "/admin/v1/tenants", tag = "admin", operation_id = "create_tenant",
    summary = "Create a tenant (its API key is shown this once)",
    request_body = CreateTenant,
    responses(
        (status = 201, description = "The tenant with its new `api_key`.", body = TenantWithKey),
        (status = 400, description = "Invalid name or settings.", body = crate::error::ErrorBody),
        (status = 409, description = "A tenant of this name exists.", body = crate::error::ErrorBody),
    ),
    security(("admin_token" = [])))]
pub(crate) async fn create(
    state: web::Data<AppState>,
    body: web::Json<Value>,
) -> Result<HttpResponse, ApiError> {
    let body = object(body.into_inner())?;
    let name = optional_name(&body)?.ok_or_else(|| ApiError::Invalid("name is required".into()))?;
    let created = tenants::create(state.store.as_ref(), name, body.get("settings")).await?;
    state.origins.invalidate();
    Ok(HttpResponse::Created().json(created))
}

#[utoipa::path(get, path = "/admin/v1/tenants", tag = "admin", operation_id = "list_tenants",
    summary = "List every tenant",
    responses((status = 200, description = "Every tenant.", body = TenantList)),
    security(("admin_token" = [])))]
pub(crate) async fn list(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let tenants = state.store.list_tenants().await?;
    Ok(HttpResponse::Ok().json(TenantList {
        total: tenants.len(),
        tenants,
    }))
}

#[utoipa::path(get, path = "/admin/v1/tenants/{id}", tag = "admin", operation_id = "get_tenant",
    summary = "Get a tenant", params(("id" = String, Path, format = Uuid, description = "The tenant's id (a UUID).")),
    responses(
        (status = 200, description = "The tenant.", body = Tenant),
        (status = 404, description = "No such tenant.", body = crate::error::ErrorBody),
    ),
    security(("admin_token" = [])))]
pub(crate) async fn get(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let tenant = tenants::get(state.store.as_ref(), tenant_id(&id)?).await?;
    Ok(HttpResponse::Ok().json(tenant))
}

#[utoipa::path(patch, path = "/admin/v1/tenants/{id}", tag = "admin", operation_id = "update_tenant",
    summary = "Rename a tenant or change its settings", params(("id" = String, Path, format = Uuid, description = "The tenant's id (a UUID).")),
    request_body = UpdateTenant,
    responses(
        (status = 200, description = "The tenant as changed.", body = Tenant),
        (status = 400, description = "Invalid name or settings.", body = crate::error::ErrorBody),
        (status = 404, description = "No such tenant.", body = crate::error::ErrorBody),
        (status = 409, description = "A tenant of this name exists.", body = crate::error::ErrorBody),
    ),
    security(("admin_token" = [])))]
pub(crate) async fn update(
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

#[utoipa::path(post, path = "/admin/v1/tenants/{id}/rotate-key", tag = "admin", operation_id = "rotate_tenant_key",
    summary = "Replace a tenant's key (the old key, its tokens and its sockets stop working)", params(("id" = String, Path, format = Uuid, description = "The tenant's id (a UUID).")),
    responses(
        (status = 200, description = "The tenant with its new `api_key`.", body = TenantWithKey),
        (status = 404, description = "No such tenant.", body = crate::error::ErrorBody),
    ),
    security(("admin_token" = [])))]
pub(crate) async fn rotate_key(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let rotated = tenants::rotate_key(state.store.as_ref(), tenant_id(&id)?).await?;
    state.tenants.invalidate();
    state.origins.invalidate();
    state.revocations.revoke_tenant(rotated.tenant.id);
    Ok(HttpResponse::Ok().json(rotated))
}

#[utoipa::path(delete, path = "/admin/v1/tenants/{id}", tag = "admin", operation_id = "delete_tenant",
    summary = "Delete a tenant and everything it owns", params(("id" = String, Path, format = Uuid, description = "The tenant's id (a UUID).")),
    responses(
        (status = 200, description = "Deleted; its sockets are closed.", body = TenantDeleted),
        (status = 404, description = "No such tenant.", body = crate::error::ErrorBody),
    ),
    security(("admin_token" = [])))]
pub(crate) async fn delete(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = tenant_id(&id)?;
    tenants::delete(state.store.as_ref(), id).await?;
    state.tenants.invalidate();
    state.origins.invalidate();
    state.revocations.revoke_tenant(id);
    Ok(HttpResponse::Ok().json(TenantDeleted {
        success: true,
        deleted_at: Utc::now(),
    }))
}

/// `GET /admin/v1/tenants/{id}/usage?from=YYYY-MM-DD&to=YYYY-MM-DD`: daily totals (UTC days;
/// by default the last 30 days up to today), oldest first, with their sum and today's quota.
#[utoipa::path(get, path = "/admin/v1/tenants/{id}/usage", tag = "admin", operation_id = "tenant_usage",
    summary = "A tenant's model usage per UTC day",
    params(
        ("id" = String, Path, format = Uuid, description = "The tenant's id (a UUID)."),
        ("from" = Option<String>, Query, format = Date, description = "First day, YYYY-MM-DD (default: 29 days before `to`)."),
        ("to" = Option<String>, Query, format = Date, description = "Last day, YYYY-MM-DD (default: today)."),
    ),
    responses(
        (status = 200, description = "Daily totals and their sum.", body = UsageReport),
        (status = 400, description = "A date is invalid, or `from` is after `to`.", body = crate::error::ErrorBody),
        (status = 404, description = "No such tenant.", body = crate::error::ErrorBody),
    ),
    security(("admin_token" = [])))]
pub(crate) async fn usage(
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
    Ok(HttpResponse::Ok().json(UsageReport {
        tenant_id: tenant.id,
        from,
        to,
        total: UsageTotal {
            messages: sum(|d| d.messages),
            prompt_tokens: sum(|d| d.prompt_tokens),
            completion_tokens: sum(|d| d.completion_tokens),
            total_tokens: sum(|d| d.total_tokens),
        },
        days,
        daily_token_quota: tenant.settings.daily_token_quota,
    }))
}
