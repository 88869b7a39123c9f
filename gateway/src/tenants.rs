//! Tenant operations shared by the admin API and the command line.

use serde::Serialize;
use serde_json::Value;
use shared::{
    keys,
    protocol::text::{REFUSED_CONTROL, has_refused_control, json_has_refused_control},
    store::{Store, Tenant, TenantSettings},
};
use uuid::Uuid;

use crate::error::ApiError;

/// A tenant with its API key: only ever returned by create and rotate.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TenantWithKey {
    /// The tenant.
    #[serde(flatten)]
    pub tenant: Tenant,
    /// The new key, shown this once.
    pub api_key: String,
}

/// Parses settings from JSON, starting from `base` and overlaying the given fields
/// (a JSON merge patch, so `agent.options` can be changed one key at a time).
pub fn merge_settings(base: &TenantSettings, patch: &Value) -> Result<TenantSettings, ApiError> {
    if !patch.is_object() {
        return Err(ApiError::Invalid("settings must be a JSON object".into()));
    }
    if json_has_refused_control(patch) {
        return Err(ApiError::Invalid(format!("settings {REFUSED_CONTROL}")));
    }
    let mut merged = serde_json::to_value(base).map_err(|e| ApiError::Invalid(e.to_string()))?;
    json_merge(&mut merged, &integral_numbers(patch.clone()));
    let settings: TenantSettings = serde_json::from_value(merged)
        .map_err(|e| ApiError::Invalid(format!("invalid settings: {e}")))?;
    let settings = settings
        .normalized()
        .map_err(|e| ApiError::Invalid(format!("invalid settings: {e}")))?;
    settings
        .check()
        .map_err(|e| ApiError::Invalid(format!("invalid settings: {e}")))?;
    Ok(settings)
}

/// `patch` with every number that is a whole number written as one (`82.0` → `82`): JSON
/// Schema (and JavaScript) see no difference, and the integer settings would refuse it.
pub fn integral_numbers(value: Value) -> Value {
    match value {
        Value::Number(n) if !n.is_i64() && !n.is_u64() => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Value::from(f as i64),
            _ => Value::Number(n),
        },
        Value::Array(items) => Value::Array(items.into_iter().map(integral_numbers).collect()),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k, integral_numbers(v)))
                .collect(),
        ),
        other => other,
    }
}

fn json_merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    json_merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn validate_name(name: &str) -> Result<(), ApiError> {
    let len = name.trim().chars().count();
    if len == 0 || len > 200 {
        return Err(ApiError::Invalid("name must be 1 to 200 characters".into()));
    }
    if has_refused_control(name) {
        return Err(ApiError::Invalid(format!("name {REFUSED_CONTROL}")));
    }
    Ok(())
}

/// Creates a tenant with a fresh key.
pub async fn create(
    store: &dyn Store,
    name: &str,
    settings: Option<&Value>,
) -> Result<TenantWithKey, ApiError> {
    validate_name(name)?;
    let settings = match settings.filter(|s| !s.is_null()) {
        Some(s) => merge_settings(&TenantSettings::default(), s)?,
        None => TenantSettings::default(),
    };
    let api_key = keys::generate();
    let tenant = store
        .create_tenant(name.trim(), &settings, &keys::hash(&api_key))
        .await?;
    Ok(TenantWithKey { tenant, api_key })
}

/// One tenant, or 404.
pub async fn get(store: &dyn Store, id: Uuid) -> Result<Tenant, ApiError> {
    store.get_tenant(id).await?.ok_or_else(|| not_found(id))
}

/// Renames and/or changes settings (merged into the current ones).
pub async fn update(
    store: &dyn Store,
    id: Uuid,
    name: Option<&str>,
    settings: Option<&Value>,
) -> Result<Tenant, ApiError> {
    if let Some(n) = name {
        validate_name(n)?;
    }
    let current = get(store, id).await?;
    let settings = settings
        .map(|s| merge_settings(&current.settings, s))
        .transpose()?;
    store
        .update_tenant(id, name.map(str::trim), settings.as_ref())
        .await?
        .ok_or_else(|| not_found(id))
}

/// Replaces the tenant's key; the old one stops working.
pub async fn rotate_key(store: &dyn Store, id: Uuid) -> Result<TenantWithKey, ApiError> {
    let api_key = keys::generate();
    if !store.set_tenant_key(id, &keys::hash(&api_key)).await? {
        return Err(not_found(id));
    }
    Ok(TenantWithKey {
        tenant: get(store, id).await?,
        api_key,
    })
}

/// Deletes a tenant and everything it owns.
pub async fn delete(store: &dyn Store, id: Uuid) -> Result<(), ApiError> {
    if store.delete_tenant(id).await? {
        Ok(())
    } else {
        Err(not_found(id))
    }
}

fn not_found(id: Uuid) -> ApiError {
    ApiError::NotFound(format!("Tenant '{id}' not found"))
}
