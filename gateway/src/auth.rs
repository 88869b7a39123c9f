//! Authentication: tenant API keys (hashed lookup through the tenant cache), client tokens
//! ([`crate::tokens`]) and the operator's admin token.

use actix_web::http::header::{AUTHORIZATION, HeaderMap};
use shared::{
    keys,
    store::{Tenant, TenantCache},
};

use crate::{error::ApiError, state::AppState, tokens::ClientToken};

/// How a REST caller authenticated: `X-API-Key` (everything), or a client token
/// (`Authorization: Bearer`, reads of its user's chats only). The key wins when both are sent.
pub async fn rest_caller(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<(Tenant, Option<ClientToken>), ApiError> {
    let key = headers
        .get("X-API-Key")
        .and_then(|v| v.to_str().ok())
        .filter(|k| !k.is_empty());
    if let Some(key) = key {
        return Ok((tenant_for_key(&state.tenants, key).await?, None));
    }
    let token = bearer(headers).ok_or(ApiError::MissingKey)?;
    let (tenant, grant) = state.tokens.verify(&state.tenants, token).await?;
    Ok((tenant, Some(grant)))
}

/// The value of an `Authorization: Bearer` header, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The tenant owning `api_key`, or `InvalidKey`.
pub async fn tenant_for_key(cache: &TenantCache, api_key: &str) -> Result<Tenant, ApiError> {
    cache.by_key(api_key).await?.ok_or(ApiError::InvalidKey)
}

/// Checks an `Authorization: Bearer` value against the configured admin token in constant time.
pub fn admin_token_matches(header: Option<&str>, configured: &str) -> bool {
    let given = header.and_then(|h| h.strip_prefix("Bearer ")).unwrap_or("");
    keys::hashes_equal(&keys::hash(given), &keys::hash(configured))
}
