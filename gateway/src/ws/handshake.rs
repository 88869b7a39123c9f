//! Handshake: parameters from query or headers (query wins), then key (or client token),
//! origin, chat and limit checks.

use std::sync::Arc;

use actix_web::HttpRequest;
use shared::{limits::ConnectionLease, protocol::validate_user_id};
use uuid::Uuid;

use crate::{
    error::{ApiError, Dependency},
    routes::query_map,
    state::AppState,
};

/// The three handshake parameters, each from the query string or its header.
#[derive(Debug, Clone, Default)]
pub struct HandshakeParams {
    /// `api_key` / `X-API-Key`.
    pub api_key: Option<String>,
    /// `token` / `Authorization: Bearer`: a client token, in place of `api_key` and `user_id`.
    pub token: Option<String>,
    /// The `Origin` header (browsers send it).
    pub origin: Option<String>,
    /// The `Host` header, to recognise pages this gateway served itself.
    pub host: Option<String>,
    /// `user_id` / `X-User-ID`.
    pub user_id: Option<String>,
    /// `chat_id` / `X-Chat-ID`.
    pub chat_id: Option<String>,
    /// `last_seq` / `X-Last-Seq`: resume after this `seq` (API.md §4.1).
    pub last_seq: Option<String>,
    /// The source address failed authentications count against ([`crate::throttle`]).
    pub client: Option<std::net::IpAddr>,
}

impl HandshakeParams {
    /// Reads the parameters; a query parameter wins over its header.
    pub fn from_request(req: &HttpRequest) -> Self {
        let mut query = query_map(req);
        let token = query
            .remove("token")
            .or_else(|| crate::auth::bearer(req.headers()).map(str::to_owned));
        let mut take = |name: &str, header: &str| {
            query.remove(name).or_else(|| {
                req.headers()
                    .get(header)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            })
        };
        let header = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        Self {
            api_key: take("api_key", "X-API-Key"),
            token,
            user_id: take("user_id", "X-User-ID"),
            chat_id: take("chat_id", "X-Chat-ID"),
            last_seq: take("last_seq", "X-Last-Seq"),
            origin: header("Origin"),
            host: header("Host"),
            client: None,
        }
    }
}

/// What a socket authenticates with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// The tenant's API key (with `user_id` and `chat_id` required).
    ApiKey(String),
    /// A client token: its user, and its chat when bound to one.
    Token(String),
}

/// The parameters present and well-formed, before any lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Present {
    /// The key or token as sent.
    pub credential: Credential,
    /// The user id as sent (checked after the key); with a token, optional (the token's).
    pub user_id: Option<String>,
    /// The chat id as sent (a malformed one is reported as a chat not found); with a token
    /// bound to a chat, optional.
    pub chat_id: Option<String>,
    /// `last_seq`, parsed.
    pub last_seq: Option<u64>,
}

impl HandshakeParams {
    /// The checks that need no lookup: an API key with `user_id` and `chat_id` (the seed's
    /// three parameters, the first missing one named), or a client token; `last_seq` a number.
    /// An API key wins over a token when both are sent.
    pub fn present(self) -> Result<Present, ApiError> {
        let nonempty = |v: Option<String>| v.filter(|v| !v.is_empty());
        let (credential, user_id, chat_id) = match (nonempty(self.api_key), nonempty(self.token)) {
            (None, Some(token)) => (
                Credential::Token(token),
                nonempty(self.user_id),
                nonempty(self.chat_id),
            ),
            (key, _) => (
                Credential::ApiKey(required(key, "api_key", "X-API-Key")?),
                Some(required(self.user_id, "user_id", "X-User-ID")?),
                Some(required(self.chat_id, "chat_id", "X-Chat-ID")?),
            ),
        };
        Ok(Present {
            credential,
            user_id,
            chat_id,
            last_seq: self
                .last_seq
                .filter(|v| !v.is_empty())
                .map(|v| v.trim().parse::<u64>())
                .transpose()
                .map_err(|_| ApiError::InvalidParam {
                    name: "last_seq",
                    reason: "must be a non-negative integer",
                })?,
        })
    }
}

/// A socket that passed the handshake.
pub struct Accepted {
    /// The key's tenant.
    pub tenant_id: Uuid,
    /// The tenant's per-connection message rate at connect time.
    pub messages_per_second: u32,
    /// The chat.
    pub chat_id: Uuid,
    /// The user.
    pub user_id: String,
    /// Whether this connection created the user.
    pub user_created: bool,
    /// The `seq` to resume after, if the client resumes.
    pub last_seq: Option<u64>,
    /// The tenant connection slot, released when dropped.
    pub _lease: ConnectionLease,
    /// Cancelled when the gateway stops or the socket's key is revoked.
    pub watch: crate::revocation::Watch,
}

fn required(
    value: Option<String>,
    name: &'static str,
    header: &'static str,
) -> Result<String, ApiError> {
    value
        .filter(|v| !v.is_empty())
        .ok_or(ApiError::MissingParam { name, header })
}

/// Runs every check of API.md §4 in order: parameters, key, chat, connection limit, user.
pub async fn accept(state: &AppState, params: HandshakeParams) -> Result<Accepted, ApiError> {
    if state.is_draining() {
        return Err(ApiError::Unavailable(Dependency::Gateway(
            "gateway is draining",
        )));
    }
    let (client, origin, host) = (params.client, params.origin.clone(), params.host.clone());
    let present = params.present()?;
    let last_seq = present.last_seq;
    let Authenticated {
        tenant,
        user_id,
        raw_chat,
        token,
        key_hash,
    } = state
        .throttle
        .guard(client, authenticate(state, present))
        .await?;
    if !crate::cors::origin_allowed(&tenant, origin.as_deref(), host.as_deref()) {
        return Err(ApiError::OriginNotAllowed(origin.unwrap_or_default()));
    }
    validate_user_id(&user_id).map_err(|reason| ApiError::InvalidParam {
        name: "user_id",
        reason,
    })?;
    let not_found = || ApiError::ChatNotFound(raw_chat.clone());
    let chat_id = Uuid::parse_str(&raw_chat).map_err(|_| not_found())?;
    // The chat's owner is checked before a slot is taken: a socket on someone else's chat
    // must not count as open on it (it would hold off that chat's deletion).
    let owner = chat_user(state, tenant.id, chat_id, &raw_chat).await?;
    if let Some(token) = &token
        && !token.may_use(chat_id, &owner)
    {
        return Err(ApiError::TokenScope(
            "This token does not open this chat: it opens the chat it is bound to, or else its own user's chats"
                .into(),
        ));
    }
    let max = tenant.settings.max_connections;
    let lease = state
        .limits
        .acquire_connection(tenant.id, chat_id, max)
        .await?
        .ok_or(ApiError::ConnectionLimit(max))?;
    // The chat's owner exists (a chat is created with its user) and users are never deleted
    // apart from their tenant: only another user joining the chat may need creating.
    let user_created = if *owner == *user_id {
        false
    } else {
        state
            .store
            .join_chat(tenant.id, chat_id, &user_id)
            .await?
            .ok_or_else(not_found)?
    };
    Ok(Accepted {
        tenant_id: tenant.id,
        messages_per_second: tenant.settings.messages_per_second,
        chat_id,
        user_id,
        user_created,
        last_seq,
        _lease: lease,
        watch: state.revocations.watch(&key_hash, tenant.id),
    })
}

/// The user the tenant's chat was created for (remembered in [`ChatOwners`]), or
/// `ChatNotFound` when the chat is not the tenant's.
async fn chat_user(
    state: &AppState,
    tenant: Uuid,
    chat_id: Uuid,
    raw: &str,
) -> Result<Arc<str>, ApiError> {
    if let Some(owner) = state.chat_owners.user_of(tenant, chat_id) {
        return Ok(owner);
    }
    let chat = state
        .store
        .get_chat(tenant, chat_id)
        .await?
        .ok_or_else(|| ApiError::ChatNotFound(raw.to_owned()))?;
    let user: Arc<str> = Arc::from(chat.user_id);
    state.chat_owners.learn(tenant, chat_id, user.clone());
    Ok(user)
}

/// Who a socket is, from its key or token.
struct Authenticated {
    tenant: shared::store::Tenant,
    user_id: String,
    raw_chat: String,
    /// The grant, when a client token was used.
    token: Option<crate::tokens::ClientToken>,
    /// The hash of the tenant key the socket's access derives from (revocation watches it).
    key_hash: String,
}

async fn authenticate(state: &AppState, present: Present) -> Result<Authenticated, ApiError> {
    match present.credential {
        Credential::ApiKey(key) => Ok(Authenticated {
            tenant: crate::auth::tenant_for_key(&state.tenants, &key).await?,
            user_id: present.user_id.unwrap_or_default(),
            raw_chat: present.chat_id.unwrap_or_default(),
            token: None,
            key_hash: shared::keys::hash(&key),
        }),
        Credential::Token(token) => {
            let (tenant, grant) = state.tokens.verify(&state.tenants, &token).await?;
            if present
                .user_id
                .as_ref()
                .is_some_and(|u| *u != grant.user_id)
            {
                return Err(ApiError::TokenScope(format!(
                    "This token is for user '{}'; leave user_id out or send that one",
                    grant.user_id
                )));
            }
            let raw_chat = present
                .chat_id
                .or_else(|| grant.chat_id.map(|c| c.to_string()))
                .ok_or(ApiError::MissingParam {
                    name: "chat_id",
                    header: "X-Chat-ID",
                })?;
            Ok(Authenticated {
                key_hash: tenant.key_hash.0.clone(),
                user_id: grant.user_id.clone(),
                tenant,
                raw_chat,
                token: Some(grant),
            })
        }
    }
}
