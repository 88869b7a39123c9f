//! Authentication: tenant API keys (hashed lookup through the tenant cache) and the operator's
//! admin token.

use shared::{
    keys,
    store::{Tenant, TenantCache},
};

use crate::error::ApiError;

/// The tenant owning `api_key`, or `InvalidKey`.
pub async fn tenant_for_key(cache: &TenantCache, api_key: &str) -> Result<Tenant, ApiError> {
    cache.by_key(api_key).await?.ok_or(ApiError::InvalidKey)
}

/// Checks an `Authorization: Bearer` value against the configured admin token in constant time.
pub fn admin_token_matches(header: Option<&str>, configured: &str) -> bool {
    let given = header.and_then(|h| h.strip_prefix("Bearer ")).unwrap_or("");
    keys::hashes_equal(&keys::hash(given), &keys::hash(configured))
}
