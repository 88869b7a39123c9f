//! `POST /api/v1/tokens` (API.md §6): a tenant's backend mints a client token for one user.

use actix_web::{HttpResponse, web};
use serde_json::Value;
use shared::{protocol::validate_user_id, store::Tenant};

use crate::{
    error::ApiError,
    state::AppState,
    tokens::{DEFAULT_TTL_SECS, MAX_TTL_SECS},
};

/// The request body of `POST /api/v1/tokens`.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MintRequest {
    /// The user the token acts as (created on first use, like any user).
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]*$"
    )]
    pub user_id: String,
    /// Binds the token to this chat of the tenant: it opens and reads that chat only.
    #[serde(default)]
    #[schema(format = Uuid)]
    pub chat_id: Option<String>,
    /// Lifetime in seconds, 1 to 86,400 (default 900).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 86_400)]
    pub ttl_seconds: Option<i64>,
}

/// `{user_id, chat_id?, ttl_seconds?}` → 201 `{token, user_id, chat_id, expires_at}`.
#[utoipa::path(post, path = "/api/v1/tokens", tag = "tokens", operation_id = "mint_token",
    summary = "Mint a client token for one user",
    description = "Call it from your backend with the API key and hand the token to the browser: it opens that user's sockets (`token=` on `/ws/chat`) and reads that user's chats (`Authorization: Bearer`). Rotating the key revokes it.",
    request_body = MintRequest,
    responses(
        (status = 201, description = "The token.", body = crate::tokens::Minted),
        (status = 400, description = "A field is missing or invalid.", body = crate::error::ErrorBody),
        (status = 404, description = "`chat_id` is not a chat of this tenant.", body = crate::error::ErrorBody),
    ),
    security(("api_key" = [])))]
pub async fn mint(
    state: web::Data<AppState>,
    tenant: web::ReqData<Tenant>,
    body: web::Json<Value>,
) -> Result<HttpResponse, ApiError> {
    let body: MintRequest =
        serde_json::from_value(crate::tenants::integral_numbers(body.into_inner()))
            .map_err(|e| ApiError::Invalid(format!("Invalid token request: {e}")))?;
    validate_user_id(&body.user_id).map_err(|e| ApiError::Invalid(e.into()))?;
    let ttl = match body.ttl_seconds {
        None => DEFAULT_TTL_SECS,
        Some(t) => u64::try_from(t)
            .ok()
            .filter(|t| (1..=MAX_TTL_SECS).contains(t))
            .ok_or_else(|| {
                ApiError::Invalid(format!("ttl_seconds must be between 1 and {MAX_TTL_SECS}"))
            })?,
    };
    let chat_id = match body.chat_id.as_deref() {
        None => None,
        Some(raw) => {
            let chat = super::chats::owned_chat(&state, &tenant, None, raw).await?;
            Some(chat.id)
        }
    };
    let minted = state.tokens.mint(&tenant, &body.user_id, chat_id, ttl)?;
    Ok(HttpResponse::Created().json(minted))
}
