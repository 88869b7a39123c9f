//! `spawn_app` and a small WebSocket client for the tests.

use std::time::Duration;

use sqlx::Connection;

use futures_util::{SinkExt, StreamExt};
use gateway::{Application, Stopper};
use serde_json::{Value, json};
use shared::{config::Config, shutdown::Shutdown};
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream, connect_async,
    tungstenite::{Message, client::IntoClientRequest, protocol::frame::coding::CloseCode},
};

pub const ADMIN: &str = "test-admin-token-0123456789abcdef";
pub type TestResult = Result<(), Box<dyn std::error::Error>>;

pub struct TestApp {
    pub port: u16,
    /// The operator API's own port when `admin_bind` is set, else the main port.
    pub admin_port: u16,
    pub metrics_port: u16,
    pub http: reqwest::Client,
    pub api_key: String,
    pub tenant_id: String,
    pub db_url: String,
    stopper: Option<Stopper>,
    worker: Option<Shutdown>,
    _db: Option<TestDb>,
}

/// `PARLEY_TEST_MODE=distributed` runs every test against the distributed wiring: Postgres,
/// Redis (its own key prefix per test database), and a worker beside the gateway.
pub fn distributed() -> bool {
    std::env::var("PARLEY_TEST_MODE").as_deref() == Ok("distributed")
}

pub fn redis_url() -> String {
    std::env::var("PARLEY_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Points a configuration at Redis with a key prefix of its own (derived from the database, so
/// a restarted app finds its queues again), with short lease and reclaim times.
pub fn use_redis(config: &mut Config) {
    let db = config
        .database_url
        .rsplit('/')
        .next()
        .unwrap_or("db")
        .to_owned();
    config.redis_url = Some(redis_url());
    config.redis_prefix = format!("test:{db}:");
    config.cluster.lease_secs = 3;
    config.cluster.reclaim_after_secs = 1;
}

/// Starts a worker in this process against the configuration's Redis and database.
pub async fn start_worker(config: &Config) -> Shutdown {
    let worker = worker::Worker::build(config).await.expect("worker");
    let shutdown = Shutdown::new();
    tokio::spawn(worker.run(shutdown.clone()));
    shutdown
}

/// A database of the test's own: a SQLite file in a temporary folder, or (with
/// `PARLEY_TEST_STORE=postgres`) a fresh database on the Postgres at 127.0.0.1:5432.
pub struct TestDb {
    pub url: String,
    _dir: Option<TempDir>,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let postgres =
            distributed() || std::env::var("PARLEY_TEST_STORE").as_deref() == Ok("postgres");
        if postgres {
            Self::postgres().await
        } else {
            Self::sqlite()
        }
    }

    pub fn sqlite() -> TestDb {
        let dir = TempDir::new().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("parley.db").display());
        TestDb {
            url,
            _dir: Some(dir),
        }
    }

    pub async fn postgres() -> TestDb {
        {
            let admin = std::env::var("PARLEY_TEST_POSTGRES_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
            let name = format!("parley_api_{}", uuid::Uuid::new_v4().simple());
            let mut conn = sqlx::PgConnection::connect(&admin)
                .await
                .expect("postgres reachable");
            sqlx::Executor::execute(
                &mut conn,
                sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")),
            )
            .await
            .expect("create database");
            let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
            TestDb {
                url: format!("{base}/{name}"),
                _dir: None,
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self._dir.is_some() {
            return;
        }
        let url = self.url.clone();
        // Drop is synchronous; the database is dropped from a short-lived runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let (base, name) = url.rsplit_once('/').expect("url with a database name");
                drop_redis_keys(&format!("test:{name}:")).await;
                if let Ok(mut conn) = sqlx::PgConnection::connect(&format!("{base}/postgres")).await
                {
                    let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    let _ = sqlx::Executor::execute(&mut conn, sqlx::AssertSqlSafe(sql)).await;
                }
            });
        })
        .join();
    }
}

/// Deletes a test's Redis keys (best effort).
async fn drop_redis_keys(prefix: &str) {
    let Ok(client) = redis::Client::open(redis_url()) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query_async(&mut conn).await;
    }
}

/// `prefix` made unique (tenant names are).
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// The app on port 0 with a fresh database and a fresh tenant.
pub async fn spawn_app() -> TestApp {
    spawn_with(|_| {}).await
}

/// As [`spawn_app`], with a configuration tweak.
pub async fn spawn_with(tweak: impl FnOnce(&mut Config)) -> TestApp {
    let db = TestDb::new().await;
    let mut app = start(&db.url, tweak).await;
    app._db = Some(db);
    app
}

/// Starts the app on an existing database (for restart tests); creates a tenant.
pub async fn start(db_url: &str, tweak: impl FnOnce(&mut Config)) -> TestApp {
    let mut config = Config {
        bind: "127.0.0.1:0".into(),
        metrics_bind: "127.0.0.1:0".into(),
        database_url: db_url.to_owned(),
        admin_token: Some(ADMIN.into()),
        bootstrap_tenant: false,
        ..Config::default()
    };
    if distributed() {
        use_redis(&mut config);
    }
    tweak(&mut config);
    let admin_on = config.admin_token.is_some();
    let worker = match config.redis_url {
        Some(_) => Some(start_worker(&config).await),
        None => None,
    };
    let _ = shared::telemetry::init("warn", shared::telemetry::TraceExport::Off, "parley-test");
    let app = Application::build(config).await.expect("app builds");
    let port = app.port();
    let admin_port = app.admin_port().unwrap_or(port);
    let metrics_port = app.metrics_port();
    let stopper = app.stopper();
    tokio::spawn(app.run_until_stopped());
    let mut test = TestApp {
        port,
        admin_port,
        metrics_port,
        http: reqwest::Client::new(),
        api_key: String::new(),
        tenant_id: String::new(),
        db_url: db_url.to_owned(),
        stopper: Some(stopper),
        worker,
        _db: None,
    };
    if admin_on {
        let tenant = test.create_tenant(json!({"name": unique("test")})).await;
        test.api_key = tenant["api_key"].as_str().expect("key").to_owned();
        test.tenant_id = tenant["id"].as_str().expect("id").to_owned();
    }
    test
}

impl TestApp {
    /// A client of a gateway running as another process on `port`.
    pub fn attach(port: u16) -> TestApp {
        TestApp {
            port,
            admin_port: port,
            metrics_port: 0,
            http: reqwest::Client::new(),
            api_key: String::new(),
            tenant_id: String::new(),
            db_url: String::new(),
            stopper: None,
            worker: None,
            _db: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// A URL of the operator API (its own port when `admin_bind` is set).
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    /// Stops the in-process worker (answers then come only from other workers).
    pub async fn stop_worker(&self) {
        if let Some(w) = &self.worker {
            w.stop().await;
        }
    }

    pub async fn stop(&self) {
        if let Some(s) = &self.stopper {
            s.stop().await;
        }
        if let Some(w) = &self.worker {
            w.stop().await;
        }
    }

    /// `POST /admin/v1/tenants` → the JSON body (with `api_key`).
    pub async fn create_tenant(&self, body: Value) -> Value {
        let res = self
            .http
            .post(self.admin_url("/admin/v1/tenants"))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
            .await
            .expect("request");
        assert_eq!(res.status(), 201);
        res.json().await.expect("json")
    }

    /// `GET /admin/v1/tenants` → the JSON body.
    pub async fn admin_tenants(&self) -> Value {
        let res = self
            .http
            .get(self.admin_url("/admin/v1/tenants"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .expect("request");
        assert_eq!(res.status(), 200);
        res.json().await.expect("json")
    }

    /// A tenant with these settings; returns its API key.
    pub async fn tenant_with(&self, settings: Value) -> String {
        let t = self
            .create_tenant(json!({"name": unique("custom"), "settings": settings}))
            .await;
        t["api_key"].as_str().expect("key").to_owned()
    }

    pub async fn get(&self, key: &str, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .header("X-API-Key", key)
            .send()
            .await
            .expect("request")
    }

    pub async fn delete(&self, key: &str, path: &str) -> reqwest::Response {
        self.http
            .delete(self.url(path))
            .header("X-API-Key", key)
            .send()
            .await
            .expect("request")
    }

    pub async fn post_chat(&self, key: &str, body: Value) -> reqwest::Response {
        self.http
            .post(self.url("/api/v1/chats/"))
            .header("X-API-Key", key)
            .json(&body)
            .send()
            .await
            .expect("request")
    }

    /// Creates a chat for `user_id` with the default tenant; returns its id.
    pub async fn chat(&self, user_id: &str) -> String {
        self.chat_as(&self.api_key, user_id).await
    }

    pub async fn chat_as(&self, key: &str, user_id: &str) -> String {
        let res = self.post_chat(key, json!({"user_id": user_id})).await;
        assert_eq!(res.status(), 201);
        let body: Value = res.json().await.expect("json");
        body["id"].as_str().expect("id").to_owned()
    }

    /// Opens a socket with query parameters.
    pub async fn ws(&self, key: &str, user_id: &str, chat_id: &str) -> Ws {
        Ws::open(self.ws_request(key, user_id, chat_id)).await
    }

    /// The upgrade request [`TestApp::ws`] sends.
    pub fn ws_request(
        &self,
        key: &str,
        user_id: &str,
        chat_id: &str,
    ) -> tokio_tungstenite::tungstenite::handshake::client::Request {
        let url = format!(
            "ws://127.0.0.1:{}/ws/chat?api_key={key}&user_id={}&chat_id={chat_id}",
            self.port,
            urlencode(user_id)
        );
        url.into_client_request().expect("request")
    }
}

pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub struct Ws {
    pub inner: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

pub const WAIT: Duration = Duration::from_secs(10);

impl Ws {
    pub async fn open(req: tokio_tungstenite::tungstenite::handshake::client::Request) -> Ws {
        let (inner, _) = connect_async(req).await.expect("websocket connects");
        Ws { inner }
    }

    /// Opens a socket from the local address `source` (`127.0.0.2`, ...): clients at different
    /// addresses, as the per-address throttle sees them.
    pub async fn open_from(
        source: &str,
        req: tokio_tungstenite::tungstenite::handshake::client::Request,
    ) -> Ws {
        let port = req.uri().port_u16().expect("port");
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(format!("{source}:0").parse().expect("address"))
            .expect("bind source");
        let stream = socket
            .connect(([127, 0, 0, 1], port).into())
            .await
            .expect("connect");
        let (inner, _) = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(stream))
            .await
            .expect("websocket connects");
        Ws { inner }
    }

    pub async fn send_json(&mut self, v: Value) {
        self.inner
            .send(Message::text(v.to_string()))
            .await
            .expect("send");
    }

    pub async fn send(&mut self, m: Message) {
        self.inner.send(m).await.expect("send");
    }

    /// The next JSON event (pings are answered and skipped); panics on close or timeout.
    pub async fn next(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(WAIT, self.inner.next())
                .await
                .expect("event in time")
                .expect("socket open")
                .expect("frame");
            match msg {
                Message::Text(t) => return serde_json::from_str(&t).expect("json event"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// Events up to and including the first of `event_type`.
    pub async fn until(&mut self, event_type: &str) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let e = self.next().await;
            let done = e["event_type"] == event_type;
            seen.push(e);
            if done {
                return seen;
            }
        }
    }

    /// Waits for the close frame; returns its code and reason.
    pub async fn closed(&mut self) -> (u16, String) {
        let (_, code, reason) = self.events_then_close().await;
        (code, reason)
    }

    /// The events up to the close frame, and the close's code and reason.
    pub async fn events_then_close(&mut self) -> (Vec<Value>, u16, String) {
        let mut seen = Vec::new();
        loop {
            let msg = tokio::time::timeout(WAIT, self.inner.next())
                .await
                .expect("close in time");
            match msg {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (seen, u16::from(frame.code), frame.reason.to_string());
                }
                Some(Ok(Message::Close(None))) | None => {
                    return (seen, u16::from(CloseCode::Status), String::new());
                }
                Some(Ok(Message::Text(t))) => seen.push(serde_json::from_str(&t).expect("json")),
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("socket error before close: {e}"),
            }
        }
    }
}

/// The tokens and the end event of one answer, after `message_stream_started`.
pub fn tokens_of(events: &[Value]) -> String {
    events
        .iter()
        .filter(|e| e["event_type"] == "message_stream_token")
        .map(|e| e["token"].as_str().expect("token"))
        .collect()
}

/// The messages of a `GET …/messages` page sent by `role` (`user` or `assistant`).
pub fn by_role<'a>(page: &'a Value, role: &str) -> Vec<&'a Value> {
    page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .filter(|m| m["sender_role"] == role)
        .collect()
}

/// The app on an existing database, distributed on the Redis at `port` (a test's own).
pub async fn start_on_redis(db_url: &str, port: u16) -> TestApp {
    start(db_url, |c| {
        use_redis(c);
        c.redis_url = Some(format!("redis://127.0.0.1:{port}"));
    })
    .await
}

/// A response's JSON body.
pub async fn body(res: reqwest::Response) -> Value {
    res.json().await.expect("json body")
}

/// An error body of API.md's shape with this code.
pub fn assert_error(v: &Value, code: &str) {
    assert_eq!(v["error_code"], code, "{v}");
    assert!(
        v["error_message"].as_str().is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    assert!(v["details"]["fix"].is_string(), "{v}");
}
