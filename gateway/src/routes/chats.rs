//! The tenant REST API (`/api/v1`, API.md §2): chats and their messages.

use std::collections::HashMap;

use actix_web::{HttpRequest, HttpResponse, middleware::from_fn, web};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value, json};
use shared::{
    broker::seqs,
    protocol::text::{REFUSED_CONTROL, has_refused_control, map_has_refused_control},
    protocol::validate_user_id,
    store::{Chat, Message, Page, Tenant},
};
use uuid::Uuid;

use super::{query_map, ratelimit::tenant_gate};
use crate::{
    error::{ApiError, Chain, ErrorBody},
    state::AppState,
    tokens::ClientToken,
};

/// Largest page a list may return.
const MAX_LIMIT: i64 = 100;

/// The `/api/v1` scope, behind authentication and the rate limit.
pub fn scope() -> actix_web::Scope<
    impl actix_web::dev::ServiceFactory<
        actix_web::dev::ServiceRequest,
        Config = (),
        Response = actix_web::dev::ServiceResponse<actix_web::body::BoxBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    web::scope("/api/v1")
        .wrap(from_fn(tenant_gate))
        .wrap(from_fn(crate::cors::cors))
        .service(web::resource("/tokens").post(super::tokens::mint))
        .service(web::resource(["/chats", "/chats/"]).post(create_chat))
        .service(web::resource("/chats/user/{user_id}").get(list_user_chats))
        .service(
            web::resource("/chats/{chat_id}")
                .get(get_chat)
                .delete(delete_chat),
        )
        .service(web::resource("/chats/{chat_id}/messages").get(list_messages))
}

/// The chat object of API.md §2.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ChatView {
    /// Chat id.
    id: Uuid,
    /// The user it was created for.
    user_id: String,
    /// Owning tenant.
    tenant_id: Uuid,
    /// Title (generated when not given).
    title: String,
    /// `{"metadata": {...}}`: the metadata given at creation.
    #[schema(value_type = Object)]
    config: Value,
    /// Creation time.
    created_at: DateTime<Utc>,
    /// Last change (a new message counts).
    updated_at: DateTime<Utc>,
    /// Time of the newest message.
    last_message_at: Option<DateTime<Utc>>,
    /// Number of messages (list and get).
    #[serde(skip_serializing_if = "Option::is_none")]
    message_count: Option<i64>,
    /// `active` for every chat that exists (get only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "active")]
    status: Option<&'static str>,
    /// Sockets open on the chat, all gateways together (get only).
    #[serde(skip_serializing_if = "Option::is_none")]
    open_sockets: Option<u32>,
}

impl ChatView {
    fn new(chat: Chat, with_count: bool) -> Self {
        Self {
            id: chat.id,
            user_id: chat.user_id,
            tenant_id: chat.tenant_id,
            title: chat.title,
            config: json!({ "metadata": chat.metadata }),
            created_at: chat.created_at,
            updated_at: chat.updated_at,
            last_message_at: chat.last_message_at,
            message_count: with_count.then_some(chat.message_count),
            status: None,
            open_sockets: None,
        }
    }
}

/// The message object of API.md §2.
#[derive(Serialize, utoipa::ToSchema)]
pub struct MessageView {
    /// `msg-<uuid>`.
    id: String,
    /// Text.
    content: String,
    /// `user` or `assistant`.
    #[schema(value_type = String, example = "user")]
    sender_role: &'static str,
    /// Always null (no media yet).
    media_type: Option<String>,
    /// Always null (no media yet).
    media_url: Option<String>,
    /// Creation time.
    created_at: DateTime<Utc>,
    /// A user message's client metadata; an answer's `model` and `tokens_used`.
    #[schema(value_type = Object)]
    metadata: Map<String, Value>,
}

/// The body of `POST /api/v1/chats/` (parsed field by field, for precise errors).
#[derive(utoipa::ToSchema)]
#[expect(
    dead_code,
    reason = "a schema of the body, which is parsed field by field"
)]
pub struct CreateChat {
    /// The user the chat is for (1 to 128 characters, no control characters).
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = r"^[^\u0000-\u001F\u007F-\u009F]*$"
    )]
    user_id: String,
    /// At most 255 characters, no control characters but tab and newlines; generated when
    /// absent.
    #[schema(
        max_length = 255,
        pattern = r"^[^\u0000-\u0008\u000B\u000C\u000E-\u001F]*$"
    )]
    title: Option<String>,
    /// Any JSON object, returned as `config.metadata`.
    #[schema(value_type = Option<Object>)]
    metadata: Option<Map<String, Value>>,
}

/// Where a page lies in its list.
#[derive(Serialize, utoipa::ToSchema)]
pub struct PageInfo {
    /// How many items there are in all.
    total: i64,
    /// Items skipped.
    offset: i64,
    /// Largest page asked for.
    limit: i64,
    /// `offset` + the items of this page < `total`.
    has_more: bool,
}

impl PageInfo {
    fn new(len: usize, total: i64, page: Page) -> Self {
        Self {
            total,
            offset: page.offset,
            limit: page.limit,
            has_more: page.offset + i64::try_from(len).unwrap_or(i64::MAX) < total,
        }
    }
}

/// A page of a user's chats.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ChatList {
    /// The chats.
    chats: Vec<ChatView>,
    /// Where the page lies.
    #[serde(flatten)]
    page: PageInfo,
}

/// A page of a chat's messages.
#[derive(Serialize, utoipa::ToSchema)]
pub struct MessageList {
    /// The messages.
    messages: Vec<MessageView>,
    /// Where the page lies.
    #[serde(flatten)]
    page: PageInfo,
}

/// The paging parameters of the lists (`limit` at most 100; more is 400).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[expect(dead_code, reason = "a schema of the query, which is parsed by `page`")]
pub struct PageQuery {
    /// Items to skip (default 0).
    #[param(minimum = 0)]
    offset: Option<i64>,
    /// Items to return, 1 to 100 (default 50).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<i64>,
    /// `asc` or `desc` (chats: newest first by default; messages: oldest first).
    #[param(inline)]
    order: Option<Order>,
}

/// A list's order.
#[derive(utoipa::ToSchema)]
pub enum Order {
    /// Oldest first.
    #[schema(rename = "asc")]
    Asc,
    /// Newest first.
    #[schema(rename = "desc")]
    Desc,
}

/// The answer to a chat's deletion.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Deleted {
    /// Always true.
    success: bool,
    /// `Chat deleted successfully`.
    message: &'static str,
    /// When.
    deleted_at: DateTime<Utc>,
}

impl From<Message> for MessageView {
    fn from(m: Message) -> Self {
        Self {
            id: m.id,
            content: m.content,
            sender_role: m.role.as_str(),
            media_type: None,
            media_url: None,
            created_at: m.created_at,
            metadata: m.metadata,
        }
    }
}

/// Reads `offset`, `limit` and `order` with the given default order.
fn page(query: &HashMap<String, String>, default_desc: bool) -> Result<Page, ApiError> {
    let int = |name: &str, default: i64| -> Result<i64, ApiError> {
        query.get(name).map_or(Ok(default), |v| {
            v.parse::<i64>()
                .map_err(|_| ApiError::Invalid(format!("{name} must be an integer")))
        })
    };
    let offset = int("offset", 0)?;
    let limit = int("limit", 50)?;
    if offset < 0 {
        return Err(ApiError::Invalid("offset must be 0 or more".into()));
    }
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::Invalid(format!(
            "limit must be between 1 and {MAX_LIMIT}"
        )));
    }
    let descending = match query.get("order").map(String::as_str) {
        None => default_desc,
        Some("asc") => false,
        Some("desc") => true,
        Some(_) => return Err(ApiError::Invalid("order must be 'asc' or 'desc'".into())),
    };
    Ok(Page {
        offset,
        limit,
        descending,
    })
}

fn parse_chat_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::ChatNotFound(raw.to_owned()))
}

/// The tenant's chat `raw`; with a client token, only a chat the token may read (another
/// user's chat is as absent as another tenant's).
pub(super) async fn owned_chat(
    state: &AppState,
    tenant: &Tenant,
    token: Option<&ClientToken>,
    raw: &str,
) -> Result<Chat, ApiError> {
    let id = parse_chat_id(raw)?;
    state
        .store
        .get_chat(tenant.id, id)
        .await?
        .filter(|chat| token.is_none_or(|t| t.may_use(chat.id, &chat.user_id)))
        .ok_or_else(|| ApiError::ChatNotFound(raw.to_owned()))
}

/// `POST /api/v1/chats/`: `{user_id, title?, metadata?}` → 201 Chat.
#[utoipa::path(post, path = "/api/v1/chats/", tag = "chats", operation_id = "create_chat",
    summary = "Create a chat for a user",
    request_body = CreateChat,
    responses(
        (status = 201, description = "The new chat.", body = ChatView),
        (status = 400, description = "A field is missing or invalid.", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub(crate) async fn create_chat(
    state: web::Data<AppState>,
    tenant: web::ReqData<Tenant>,
    body: web::Json<Value>,
) -> Result<HttpResponse, ApiError> {
    let Value::Object(mut body) = body.into_inner() else {
        return Err(ApiError::Invalid(
            "Request body must be a JSON object".into(),
        ));
    };
    let user_id = match body.remove("user_id") {
        Some(Value::String(u)) => u,
        None | Some(Value::Null) => return Err(ApiError::Invalid("user_id is required".into())),
        Some(_) => return Err(ApiError::Invalid("user_id must be a string".into())),
    };
    validate_user_id(&user_id).map_err(|e| ApiError::Invalid(e.into()))?;
    let title = match body.remove("title") {
        None | Some(Value::Null) => format!("Chat {}", Utc::now().format("%Y-%m-%d %H:%M")),
        Some(Value::String(t)) if has_refused_control(&t) => {
            return Err(ApiError::Invalid(format!("title {REFUSED_CONTROL}")));
        }
        Some(Value::String(t)) if t.chars().count() <= 255 => t,
        Some(Value::String(_)) => {
            return Err(ApiError::Invalid(
                "title must be at most 255 characters".into(),
            ));
        }
        Some(_) => return Err(ApiError::Invalid("title must be a string".into())),
    };
    let metadata = match body.remove("metadata") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) if map_has_refused_control(&m) => {
            return Err(ApiError::Invalid(format!("metadata {REFUSED_CONTROL}")));
        }
        Some(Value::Object(m)) => m,
        Some(_) => return Err(ApiError::Invalid("metadata must be a JSON object".into())),
    };
    let chat = state
        .store
        .create_chat(tenant.id, &user_id, &title, &metadata)
        .await?;
    // The chat's first block of `seq`s, reserved by its INSERT: its first socket and message
    // then need no store write. Without it the log reserves a block of its own later.
    if let Err(e) = state.broker.adopt(chat.id, seqs::FIRST).await {
        tracing::warn!(chat_id = %chat.id, error = %Chain(&e), "handing the chat's first seqs to the log");
    }
    // Its first socket, usually right after, then needs no store query.
    state.chat_owners.learn(
        tenant.id,
        chat.id,
        std::sync::Arc::from(chat.user_id.as_str()),
    );
    Ok(HttpResponse::Created().json(ChatView::new(chat, false)))
}

/// `GET /api/v1/chats/user/{user_id}`: the user's chats, newest first by default.
#[utoipa::path(get, path = "/api/v1/chats/user/{user_id}", tag = "chats", operation_id = "list_user_chats",
    summary = "List a user's chats",
    params(("user_id" = String, Path, description = "The user (1 to 128 characters, no control characters).", min_length = 1, max_length = 128, pattern = r"^[^\u0000-\u001F\u007F-\u009F]*$"), PageQuery),
    responses(
        (status = 200, description = "A page of the user's chats.", body = ChatList),
        (status = 400, description = "Invalid user id or paging.", body = ErrorBody),
        (status = 403, description = "A client token of another user, or bound to a chat.", body = ErrorBody),
        (status = 404, description = "The user is unknown or has no chats.", body = ErrorBody),
    ),
    security(("api_key" = []), ("client_token" = [])))]
pub(crate) async fn list_user_chats(
    req: HttpRequest,
    state: web::Data<AppState>,
    tenant: web::ReqData<Tenant>,
    token: Option<web::ReqData<ClientToken>>,
    user_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    validate_user_id(&user_id).map_err(|e| ApiError::Invalid(e.into()))?;
    if let Some(token) = token
        && (token.user_id != *user_id || token.chat_id.is_some())
    {
        return Err(ApiError::TokenScope(format!(
            "This token lists the chats of user '{}' only, and only when it is bound to no chat",
            token.user_id
        )));
    }
    let page = page(&query_map(&req), true)?;
    let (chats, total) = state
        .store
        .list_user_chats(tenant.id, &user_id, page)
        .await?;
    if total == 0 {
        return Err(ApiError::NotFound(format!(
            "No chats found for user '{user_id}'"
        )));
    }
    let chats: Vec<ChatView> = chats.into_iter().map(|c| ChatView::new(c, true)).collect();
    Ok(HttpResponse::Ok().json(ChatList {
        page: PageInfo::new(chats.len(), total, page),
        chats,
    }))
}

/// `GET /api/v1/chats/{chat_id}`: the chat with `message_count`, `status` and `open_sockets`.
/// `status` is `active` for every chat that exists (API.md §2: the reference reads `active` for
/// a chat just created; `closed` is kept for a later feature that closes chats); whether
/// sockets are open is `open_sockets`, counted on every gateway.
#[utoipa::path(get, path = "/api/v1/chats/{chat_id}", tag = "chats", operation_id = "get_chat",
    summary = "Get a chat",
    params(("chat_id" = String, Path, format = Uuid, description = "The chat's id (a UUID).")),
    responses(
        (status = 200, description = "The chat with `message_count`, `status` and `open_sockets`.", body = ChatView),
        (status = 404, description = "No such chat of this tenant (or of this token's user).", body = ErrorBody),
    ),
    security(("api_key" = []), ("client_token" = [])))]
pub(crate) async fn get_chat(
    state: web::Data<AppState>,
    tenant: web::ReqData<Tenant>,
    token: Option<web::ReqData<ClientToken>>,
    chat_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let chat = owned_chat(&state, &tenant, token.as_deref(), &chat_id).await?;
    let open_sockets = state.limits.chat_connections(chat.id).await?;
    let mut view = ChatView::new(chat, true);
    view.status = Some("active");
    view.open_sockets = Some(open_sockets);
    Ok(HttpResponse::Ok().json(view))
}

/// `GET /api/v1/chats/{chat_id}/messages`: oldest first by default.
#[utoipa::path(get, path = "/api/v1/chats/{chat_id}/messages", tag = "chats", operation_id = "list_messages",
    summary = "List a chat's messages",
    params(("chat_id" = String, Path, format = Uuid, description = "The chat's id (a UUID)."), PageQuery),
    responses(
        (status = 200, description = "A page of the chat's messages.", body = MessageList),
        (status = 400, description = "Invalid paging.", body = ErrorBody),
        (status = 404, description = "No such chat of this tenant (or of this token's user).", body = ErrorBody),
    ),
    security(("api_key" = []), ("client_token" = [])))]
pub(crate) async fn list_messages(
    req: HttpRequest,
    state: web::Data<AppState>,
    tenant: web::ReqData<Tenant>,
    token: Option<web::ReqData<ClientToken>>,
    chat_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let page = page(&query_map(&req), false)?;
    let chat = owned_chat(&state, &tenant, token.as_deref(), &chat_id).await?;
    let (messages, total) = state.store.list_messages(chat.id, page).await?;
    let messages: Vec<MessageView> = messages.into_iter().map(MessageView::from).collect();
    Ok(HttpResponse::Ok().json(MessageList {
        page: PageInfo::new(messages.len(), total, page),
        messages,
    }))
}

/// `DELETE /api/v1/chats/{chat_id}`: 409 while a WebSocket is open on the chat.
#[utoipa::path(delete, path = "/api/v1/chats/{chat_id}", tag = "chats", operation_id = "delete_chat",
    summary = "Delete a chat and its messages",
    params(("chat_id" = String, Path, format = Uuid, description = "The chat's id (a UUID).")),
    responses(
        (status = 200, description = "Deleted, with its messages, atomically.", body = Deleted),
        (status = 404, description = "No such chat of this tenant.", body = ErrorBody),
        (status = 409, description = "A WebSocket is open on the chat, on some gateway.", body = ErrorBody),
    ),
    security(("api_key" = [])))]
pub(crate) async fn delete_chat(
    state: web::Data<AppState>,
    tenant: web::ReqData<Tenant>,
    chat_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let chat = owned_chat(&state, &tenant, None, &chat_id).await?;
    if state.limits.chat_connections(chat.id).await? > 0 {
        return Err(ApiError::ChatInUse);
    }
    if !state.store.delete_chat(tenant.id, chat.id).await? {
        return Err(ApiError::ChatNotFound(chat_id.into_inner()));
    }
    state.chat_owners.forget(chat.id);
    // Other gateways forget its owner when told; the entry's age bounds it otherwise.
    if let Err(e) = state.broker.forget(chat.id).await {
        tracing::warn!(chat_id = %chat.id, error = %Chain(&e), "announcing the chat's deletion");
    }
    Ok(HttpResponse::Ok().json(Deleted {
        success: true,
        message: "Chat deleted successfully",
        deleted_at: Utc::now(),
    }))
}
