//! Building and running the application (zero-to-production's `Application::build`).

use std::{net::TcpListener, sync::Arc, time::Duration};

use actix_web::{App, HttpServer, dev::Server, web};
use anyhow::Context as _;
use shared::{
    broker::{self, Broker, Role},
    config::Config,
    limits::{Limits, memory::MemoryLimits, redis::RedisLimits},
    shutdown::Shutdown,
    store::{self, Store, TenantCache},
};

use crate::{error::ApiError, routes, state::AppState, tenants};

/// A bound, not yet running, gateway (with its in-process worker in the embedded mode).
pub struct Application {
    port: u16,
    server: Server,
    /// The operator API's own listener and its port (`PARLEY_ADMIN_BIND`).
    admin: Option<(Server, u16)>,
    metrics: Server,
    metrics_port: u16,
    state: AppState,
}

impl Application {
    /// Opens the store, wires the broker and limits, starts the worker and binds the listener.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        check_admin_token(&config)?;
        let throttle = crate::throttle::AuthThrottle::new(&config.auth)?;
        let store = store::open(&config).await.with_context(|| {
            let url = shared::config::redact_url(&config.database_url);
            format!("opening the store at {url}")
        })?;
        if config.bootstrap_tenant {
            bootstrap_tenant(store.as_ref()).await?;
        }
        let shutdown = Shutdown::new();
        let tenants = TenantCache::new(
            store.clone(),
            Duration::from_secs(config.limits.tenant_cache_secs),
        );
        let broker = broker::connect(&config, store.clone(), Role::Gateway).await?;
        let limits = match &config.redis_url {
            Some(url) => distributed_limits(&config, url).await?,
            None => embedded(&config, &tenants, broker.clone(), &shutdown).await?,
        };
        let listener = listen(&config.bind, config.listen_backlog)
            .with_context(|| format!("binding {}", config.bind))?;
        let port = listener.local_addr()?.port();
        let (metrics, metrics_port) = shared::metrics::serve(&config.metrics_bind, None)
            .with_context(|| format!("binding the metrics server to {}", config.metrics_bind))?;
        let state = AppState::new(
            store,
            broker,
            limits,
            Arc::new(config),
            tenants,
            shutdown,
            throttle,
        );
        let checker = state
            .revocations
            .clone()
            .run(state.store.clone(), state.shutdown.token.clone());
        state.shutdown.tracker.spawn(checker);
        let owners = state.chat_owners.clone();
        let deletions = owners.follow(state.broker.deletions(), state.shutdown.token.clone());
        state.shutdown.tracker.spawn(deletions);
        let drain_secs = state.config.drain_timeout_secs;
        let handshake_timeout =
            Duration::from_secs(state.config.auth.handshake_timeout_secs.max(1));
        let workers = match state.config.http_workers {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        };
        let data = web::Data::new(state.clone());
        let readiness = web::Data::from(state.readiness.clone());
        let admin = match state.config.admin_bind.as_deref() {
            Some(bind) => Some(admin_server(bind, data.clone(), handshake_timeout)?),
            None => None,
        };
        let public_admin = admin.is_none();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(readiness.clone())
                .configure(|cfg| routes::configure(cfg, public_admin))
        })
        // Events are small frames written one after another; with Nagle's algorithm a frame
        // can wait for the client's delayed ACK (40 ms on Linux).
        .on_connect(|conn, _| {
            if let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
                let _ = tcp.set_nodelay(true);
            }
        })
        .workers(workers)
        // A connection that does not send its request head (a WebSocket upgrade included) in
        // time is dropped: stalled upgrades hold no socket for long.
        .client_request_timeout(handshake_timeout)
        // No lingering after a response: actix-http otherwise keeps reading a connection whose
        // request body was left unread (every WebSocket's, once it closed) for up to a second,
        // waiting for the client to hang up first, while a WebSocket client waits for the
        // server to (RFC 6455 §7.1.1): each clean close took a second. The cost: a refused
        // request whose large body is still unread may see a reset instead of its answer.
        .client_disconnect_timeout(std::time::Duration::ZERO)
        .listen(listener)?
        .disable_signals()
        // Sockets streaming an answer close when it ends, within the drain timeout.
        .shutdown_timeout(drain_secs + 2)
        .run();
        Ok(Self {
            port,
            server,
            admin,
            metrics,
            metrics_port,
            state,
        })
    }

    /// The bound port (useful with `PARLEY_BIND=127.0.0.1:0`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The bound port of the `/metrics` server.
    pub fn metrics_port(&self) -> u16 {
        self.metrics_port
    }

    /// The bound port of the operator API's own listener, when `PARLEY_ADMIN_BIND` is set.
    pub fn admin_port(&self) -> Option<u16> {
        self.admin.as_ref().map(|(_, port)| *port)
    }

    /// A handle to stop the application from elsewhere (signals, tests).
    pub fn stopper(&self) -> Stopper {
        Stopper {
            handle: self.server.handle(),
            admin: self.admin.as_ref().map(|(server, _)| server.handle()),
            metrics: self.metrics.handle(),
            state: self.state.clone(),
        }
    }

    /// Serves until stopped.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let admin = async {
            match self.admin {
                Some((server, _)) => server.await,
                None => Ok(()),
            }
        };
        let (served, metrics, admin) = futures_util::join!(self.server, self.metrics, admin);
        served.and(metrics).and(admin)
    }
}

/// Stops an [`Application`]: not ready, no new connections; idle sockets are told to reconnect
/// (1012) at once, sockets streaming an answer once it ends (within `drain_timeout_secs`); then
/// every task ends.
#[derive(Clone)]
pub struct Stopper {
    handle: actix_web::dev::ServerHandle,
    admin: Option<actix_web::dev::ServerHandle>,
    metrics: actix_web::dev::ServerHandle,
    state: AppState,
}

impl Stopper {
    /// Drains and stops the server and every background task.
    ///
    /// The listeners stay open while sockets drain, so that `/readyz` answers 503 `draining`
    /// (not a refused connection) to load balancers and probes, REST calls in flight or still
    /// routed here are served, and new WebSocket handshakes are told `SERVICE_UNAVAILABLE`
    /// (close 1013: try again, elsewhere). Once every socket and task has ended (at most
    /// `drain_timeout_secs` + 5 s) the listeners close.
    pub async fn stop(&self) {
        self.state.start_draining();
        let drain = Duration::from_secs(self.state.config.drain_timeout_secs + 5);
        let _ = tokio::time::timeout(drain, self.state.shutdown.stop()).await;
        self.handle.stop(true).await;
        if let Some(admin) = &self.admin {
            admin.stop(true).await;
        }
        // Scraped until the end, so the drain shows on dashboards.
        self.metrics.stop(true).await;
    }
}

/// Refuses an admin token short enough to guess (an empty one keeps the admin API off).
fn check_admin_token(config: &Config) -> anyhow::Result<()> {
    let min = shared::config::MIN_ADMIN_TOKEN_CHARS;
    match config.admin_token.as_deref() {
        Some(token) if !token.is_empty() && token.chars().count() < min => anyhow::bail!(
            "PARLEY_ADMIN_TOKEN is shorter than {min} characters; use a long random one \
             (`openssl rand -hex 24`), or leave it unset to keep the admin API off"
        ),
        _ => Ok(()),
    }
}

/// Pending connections of the operator API: a few operators, no storms.
const ADMIN_BACKLOG: u32 = 128;

/// A listener on `bind` (the first address it resolves to) whose kernel queue holds `backlog`
/// connections: std's `TcpListener::bind` queues only 128, which a reconnect storm overflows.
fn listen(bind: &str, backlog: u32) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let addr = std::net::ToSocketAddrs::to_socket_addrs(bind)?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address"))?;
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // A restarted gateway binds at once although its old connections linger in TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket.into())
}

/// The operator API on its own listener, off the public port.
fn admin_server(
    bind: &str,
    data: web::Data<AppState>,
    request_timeout: Duration,
) -> anyhow::Result<(Server, u16)> {
    let listener =
        listen(bind, ADMIN_BACKLOG).with_context(|| format!("binding the admin API to {bind}"))?;
    let port = listener.local_addr()?.port();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .configure(routes::configure_admin)
    })
    .workers(1)
    .client_request_timeout(request_timeout)
    .listen(listener)?
    .disable_signals()
    .run();
    Ok((server, port))
}

/// Cluster-wide limits in Redis; workers run as separate processes.
async fn distributed_limits(config: &Config, url: &str) -> anyhow::Result<Arc<dyn Limits>> {
    let lease = Duration::from_secs(config.cluster.lease_secs.max(1));
    let timeout = config.timeouts.redis();
    Ok(RedisLimits::connect(url, &config.redis_prefix, lease, timeout).await?)
}

/// In-process limits and worker.
async fn embedded(
    config: &Config,
    tenants: &TenantCache,
    broker: Arc<dyn Broker>,
    shutdown: &Shutdown,
) -> anyhow::Result<Arc<dyn Limits>> {
    let worker = worker::Worker::new(tenants.clone(), broker.clone(), config);
    shutdown.tracker.spawn(worker.run(shutdown.clone()));
    requeue_unanswered(tenants.store().as_ref(), broker.as_ref()).await?;
    Ok(Arc::new(MemoryLimits::new()))
}

/// Queues again the messages a previous run saved but did not answer: the in-process queue
/// does not survive a restart, and a message acknowledged with `message_received` must not be lost.
async fn requeue_unanswered(store: &dyn Store, broker: &dyn Broker) -> anyhow::Result<()> {
    let jobs = store.unanswered(chrono::Utc::now(), 100_000).await?;
    if !jobs.is_empty() {
        tracing::info!(
            count = jobs.len(),
            "re-queueing messages left unanswered by the previous run"
        );
    }
    for job in jobs {
        broker.enqueue(job).await?;
    }
    Ok(())
}

/// Creates a `default` tenant when the store has none, and prints its key once.
///
/// Gateways that start together on an empty database all see no tenant; tenant names are
/// unique, so exactly one of them creates `default` and prints its key, and the others find
/// the name taken and print nothing.
async fn bootstrap_tenant(store: &dyn Store) -> anyhow::Result<()> {
    if !store.list_tenants().await?.is_empty() {
        return Ok(());
    }
    let created = match tenants::create(store, "default", None).await {
        Ok(created) => created,
        Err(ApiError::NameTaken(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    println!(
        "\nCreated tenant 'default' ({}). Its API key is shown only this once:\n\n    {}\n\n\
         More tenants: `gateway tenant create --name NAME`.\n",
        created.tenant.id, created.api_key
    );
    Ok(())
}
