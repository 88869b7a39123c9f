//! Handshake: parameters from query or headers (query wins), then key, chat and limit checks.

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
        let mut take = |name: &str, header: &str| {
            query.remove(name).or_else(|| {
                req.headers()
                    .get(header)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            })
        };
        Self {
            api_key: take("api_key", "X-API-Key"),
            user_id: take("user_id", "X-User-ID"),
            chat_id: take("chat_id", "X-Chat-ID"),
            last_seq: take("last_seq", "X-Last-Seq"),
            client: None,
        }
    }
}

/// The parameters present and well-formed, before any lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Present {
    /// The API key as sent.
    pub api_key: String,
    /// The user id as sent (checked after the key).
    pub user_id: String,
    /// The chat id as sent (a malformed one is reported as a chat not found).
    pub chat_id: String,
    /// `last_seq`, parsed.
    pub last_seq: Option<u64>,
}

impl HandshakeParams {
    /// The checks that need no lookup: the three parameters present, `last_seq` a number.
    pub fn present(self) -> Result<Present, ApiError> {
        Ok(Present {
            api_key: required(self.api_key, "api_key", "X-API-Key")?,
            user_id: required(self.user_id, "user_id", "X-User-ID")?,
            chat_id: required(self.chat_id, "chat_id", "X-Chat-ID")?,
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

/// Chats' owners as handshakes found them, so that a socket reconnecting to its chat costs no
/// extra store query. A chat never changes tenant; a deleted chat's entry only lets the
/// handshake go on to `join_chat`, which finds the chat gone.
#[derive(Default)]
pub struct ChatOwners(dashmap::DashMap<Uuid, Uuid>);

/// Bound on remembered chats; past it the map starts over.
const MAX_OWNERS: usize = 200_000;

impl ChatOwners {
    /// Whether `tenant` is known to own `chat`.
    pub fn owns(&self, tenant: Uuid, chat: Uuid) -> bool {
        self.0.get(&chat).is_some_and(|owner| *owner == tenant)
    }

    /// Remembers that `tenant` owns `chat`.
    pub fn learn(&self, tenant: Uuid, chat: Uuid) {
        if self.0.len() >= MAX_OWNERS {
            self.0.clear();
        }
        self.0.insert(chat, tenant);
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
    let client = params.client;
    let Present {
        api_key,
        user_id,
        chat_id: raw_chat,
        last_seq,
    } = params.present()?;
    let tenant = state
        .throttle
        .guard(
            client,
            crate::auth::tenant_for_key(&state.tenants, &api_key),
        )
        .await?;
    validate_user_id(&user_id).map_err(|reason| ApiError::InvalidParam {
        name: "user_id",
        reason,
    })?;
    let not_found = || ApiError::ChatNotFound(raw_chat.clone());
    let chat_id = Uuid::parse_str(&raw_chat).map_err(|_| not_found())?;
    // The chat's owner is checked before a slot is taken: a socket on someone else's chat
    // must not count as open on it (it would hold off that chat's deletion).
    if !state.chat_owners.owns(tenant.id, chat_id) {
        state
            .store
            .get_chat(tenant.id, chat_id)
            .await?
            .ok_or_else(not_found)?;
        state.chat_owners.learn(tenant.id, chat_id);
    }
    let max = tenant.settings.max_connections;
    let lease = state
        .limits
        .acquire_connection(tenant.id, chat_id, max)
        .await?
        .ok_or(ApiError::ConnectionLimit(max))?;
    let user_created = state
        .store
        .join_chat(tenant.id, chat_id, &user_id)
        .await?
        .ok_or_else(not_found)?;
    Ok(Accepted {
        tenant_id: tenant.id,
        messages_per_second: tenant.settings.messages_per_second,
        chat_id,
        user_id,
        user_created,
        last_seq,
        _lease: lease,
        watch: state
            .revocations
            .watch(&shared::keys::hash(&api_key), tenant.id),
    })
}
