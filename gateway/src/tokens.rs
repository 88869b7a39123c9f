//! Client tokens (API.md §6): short-lived, browser-safe credentials a tenant's backend mints
//! for one user (and optionally one chat) with its API key.
//!
//! A token is a JWT signed with HS256 by `jsonwebtoken`. Its header's `kid` is the tenant id;
//! its claims are the user (`sub`), the chat it is bound to (`cid`, optional), `iat`, `exp` and
//! the audience `parley-client`. The signing secret is the tenant's own: an HMAC-SHA256 of the
//! tenant's stored key hash under the gateway's `auth.token_secret` ("pepper"), so it
//! changes with every key rotation (every token of the old key stops verifying) and dies with
//! the tenant, and no secret is stored beside the key hash. Verifying reads the tenant through
//! the tenant cache (by id, as the key path does by hash): no store query on the hot path; a
//! rotation made on another gateway reaches this one within the cache's time-to-live
//! (`limits.tenant_cache_secs`, 2 s), and its sockets are closed by [`crate::revocation`].
//!
//! Setting `PARLEY_AUTH__TOKEN_SECRET` (the same on every gateway) means that reading the
//! database alone is not enough to forge tokens; without it the key hash alone seeds them.

use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use shared::{
    keys::KeyHash,
    store::{Tenant, TenantCache},
};
use uuid::Uuid;

use crate::error::{ApiError, Dependency};

/// The audience of every client token, so that no other HS256 JWT of the tenant's is taken
/// for one.
const AUDIENCE: &str = "parley-client";

/// Lifetime of a token when the request names none.
pub const DEFAULT_TTL_SECS: u64 = 900;

/// The longest lifetime a token may have.
pub const MAX_TTL_SECS: u64 = 86_400;

/// The claims of a client token.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    /// The user.
    sub: String,
    /// The chat the token is bound to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cid: Option<Uuid>,
    /// Issued at (Unix seconds).
    iat: i64,
    /// Expires at (Unix seconds).
    exp: i64,
    /// Always [`AUDIENCE`].
    aud: String,
}

/// What a verified token lets its holder do: act as `user_id`, on `chat_id` only when bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientToken {
    /// The user the token was minted for.
    pub user_id: String,
    /// The one chat it opens, when bound to one.
    pub chat_id: Option<Uuid>,
}

impl ClientToken {
    /// Whether the token may open or read `chat` (created for `owner`): its own chat when
    /// bound to one, else any chat of its user.
    pub fn may_use(&self, chat: Uuid, owner: &str) -> bool {
        match self.chat_id {
            Some(bound) => bound == chat,
            None => owner == self.user_id,
        }
    }
}

/// A freshly minted token, as `POST /api/v1/tokens` returns it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Minted {
    /// The token: pass it as `token=` on the WebSocket or `Authorization: Bearer` on reads.
    pub token: String,
    /// The user it acts as.
    pub user_id: String,
    /// The chat it is bound to, or null.
    pub chat_id: Option<Uuid>,
    /// When it stops working.
    pub expires_at: DateTime<Utc>,
}

/// Mints and verifies client tokens under the gateway's pepper.
pub struct TokenKeys {
    pepper: Vec<u8>,
}

impl TokenKeys {
    /// Keys under `pepper` (`auth.token_secret`; empty: a fixed, public one).
    pub fn new(pepper: &str) -> Self {
        let pepper = if pepper.is_empty() {
            b"parley client tokens v1".to_vec()
        } else {
            pepper.as_bytes().to_vec()
        };
        Self { pepper }
    }

    /// The tenant's signing secret for the key whose hash is `key_hash`.
    fn secret(&self, key_hash: &KeyHash) -> Result<Vec<u8>, ApiError> {
        let pepper = EncodingKey::from_secret(&self.pepper).map_err(signing)?;
        let mac = jsonwebtoken::crypto::sign(key_hash.0.as_bytes(), &pepper, Algorithm::HS256)
            .map_err(signing)?;
        Ok(mac.into_bytes())
    }

    /// A token for `user_id` (and `chat_id`) of `tenant`, valid for `ttl_secs`.
    pub fn mint(
        &self,
        tenant: &Tenant,
        user_id: &str,
        chat_id: Option<Uuid>,
        ttl_secs: u64,
    ) -> Result<Minted, ApiError> {
        let now = Utc::now();
        let ttl = chrono::Duration::seconds(i64::try_from(ttl_secs).unwrap_or(i64::MAX));
        let expires_at = now + ttl;
        let claims = Claims {
            sub: user_id.to_owned(),
            cid: chat_id,
            iat: now.timestamp(),
            exp: expires_at.timestamp(),
            aud: AUDIENCE.to_owned(),
        };
        let header = Header {
            kid: Some(tenant.id.to_string()),
            ..Header::new(Algorithm::HS256)
        };
        let key = EncodingKey::from_secret(&self.secret(&tenant.key_hash)?).map_err(signing)?;
        let token = jsonwebtoken::encode(&header, &claims, &key).map_err(signing)?;
        Ok(Minted {
            token,
            user_id: user_id.to_owned(),
            chat_id,
            expires_at: DateTime::from_timestamp(claims.exp, 0).unwrap_or(expires_at),
        })
    }

    /// The tenant and grant of a valid token; [`ApiError::InvalidToken`] for anything else
    /// (malformed, another algorithm, unknown or deleted tenant, wrong signature: another
    /// tenant's or an older key's, expired).
    pub async fn verify(
        &self,
        tenants: &TenantCache,
        token: &str,
    ) -> Result<(Tenant, ClientToken), ApiError> {
        let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
        let tenant_id = header
            .kid
            .as_deref()
            .and_then(|kid| Uuid::parse_str(kid).ok())
            .ok_or(ApiError::InvalidToken(None))?;
        let tenant = tenants
            .by_id(tenant_id)
            .await?
            .ok_or(ApiError::InvalidToken(None))?;
        let key = DecodingKey::from_secret(&self.secret(&tenant.key_hash)?).map_err(invalid)?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "aud", "sub"]);
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(invalid)?
            .claims;
        Ok((
            tenant,
            ClientToken {
                user_id: claims.sub,
                chat_id: claims.cid,
            },
        ))
    }
}

fn invalid(e: jsonwebtoken::errors::Error) -> ApiError {
    ApiError::InvalidToken(Some(e))
}

fn signing(e: jsonwebtoken::errors::Error) -> ApiError {
    tracing::error!(error = %e, "could not sign a client token");
    ApiError::Unavailable(Dependency::Gateway("could not sign the client token"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_token_opens_its_chat_only_and_an_unbound_one_its_users_chats() {
        let chat = Uuid::now_v7();
        let bound = ClientToken {
            user_id: "u".into(),
            chat_id: Some(chat),
        };
        assert!(bound.may_use(chat, "someone else"));
        assert!(!bound.may_use(Uuid::now_v7(), "u"));
        let unbound = ClientToken {
            user_id: "u".into(),
            chat_id: None,
        };
        assert!(unbound.may_use(chat, "u"));
        assert!(!unbound.may_use(chat, "v"));
    }
}
