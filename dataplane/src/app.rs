//! The process: the components it is made of, and the wiring that serves them (listeners, the reload
//! watcher, the supervisor, the shutdown order). `main` and the tests both start the gateway here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::admin::{self, Admin};
use crate::components::auth::component::Auth;
use crate::components::cache::component::CacheComponent;
use crate::components::events::component::Events;
use crate::components::outbox::component::Outbox;
use crate::components::proxy::component::Proxy;
use crate::kernel::component::{Component, Env};
use crate::kernel::config::{self, Invalid, Loaded};
use crate::kernel::health::{Health, State};
use crate::kernel::metrics::Metrics;
use crate::kernel::net::Overrides;
use crate::kernel::telemetry::{LogControl, Traces};
use crate::runtime::Runtime;
use crate::{chain, reload, server};

/// The components, in build order: a component may use the ports of those before it (events publish for
/// the outbox and subscribe for the cache, the proxy forwards for command handlers).
pub fn components() -> Vec<Arc<dyn Component>> {
    vec![
        Arc::new(Proxy::default()),
        Arc::new(Events::default()),
        Arc::new(Auth::default()),
        Arc::new(CacheComponent::default()),
        Arc::new(Outbox::default()),
    ]
}

/// The runtime over every component: what `check` builds, and what [`App::start`] serves.
pub fn runtime(loaded: &Loaded, env: Env, log: LogControl) -> Result<Runtime, Invalid> {
    Runtime::new(loaded, components(), env, log)
}

/// How to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// A YAML file, or a directory of them.
    pub config: PathBuf,
    /// Defaults to the Middleware's `listeners.http.port` on all interfaces.
    pub http_address: Option<SocketAddr>,
    /// Defaults to the Middleware's `listeners.adminPort` on all interfaces.
    pub admin_address: Option<SocketAddr>,
    pub overrides: Overrides,
    pub in_process: bool,
    pub reload_interval: Duration,
    /// On shutdown, how long to keep serving while readiness is already false.
    pub shutdown_delay: Duration,
    /// After accepting stops, how long in-flight requests may take.
    pub drain_timeout: Duration,
    /// Then, how long consumers, relays and producers may take to stop.
    pub stop_timeout: Duration,
    /// Where the Secrets named by `listeners.http.tls` are, one directory per Secret.
    pub tls_dir: PathBuf,
    /// Threads of its own for the traffic listener, each with a current-thread runtime and a socket of the
    /// port (`SO_REUSEPORT`); 0 serves it as a task of the caller's runtime.
    pub traffic_threads: usize,
}

impl Options {
    pub fn new(config: PathBuf) -> Self {
        Self {
            config,
            http_address: None,
            admin_address: None,
            overrides: Overrides::default(),
            in_process: false,
            reload_interval: Duration::from_secs(2),
            shutdown_delay: Duration::ZERO,
            drain_timeout: Duration::from_secs(20),
            stop_timeout: Duration::from_secs(10),
            tls_dir: PathBuf::from(crate::tls::DEFAULT_TLS_DIR),
            traffic_threads: 0,
        }
    }
}

/// A serving gateway.
pub struct App {
    pub runtime: Arc<Runtime>,
    /// Where traffic and the admin endpoints are served.
    pub http: SocketAddr,
    pub admin: SocketAddr,
    admin_state: Arc<Admin>,
    traces: Option<Arc<Traces>>,
    options: Options,
    accepting: tokio::sync::watch::Sender<bool>,
    stop_admin: tokio::sync::watch::Sender<bool>,
    traffic: Traffic,
    admin_task: tokio::task::JoinHandle<()>,
    watcher: tokio::task::JoinHandle<()>,
    tls_watcher: Option<tokio::task::JoinHandle<()>>,
}

impl App {
    /// Builds the runtime from `loaded` (read from `options.config` as `files`), binds the listeners and
    /// starts serving.
    pub async fn start(
        options: Options,
        files: config::Files,
        loaded: Loaded,
        log: LogControl,
    ) -> anyhow::Result<Self> {
        let spec = &loaded.bundle.middleware.spec;
        let metrics = Metrics::new().context("registering metrics")?;
        let health = Health::default();
        health.set("http", State::Starting, "binding the listener", true);
        let traces = Traces::from_config(&spec.observability, &loaded.middleware())?.map(Arc::new);
        if let Some(traces) = &traces {
            tracing::info!(endpoint = %umw_crds::redact::url(&traces.endpoint), "exporting traces over OTLP/gRPC");
        }
        let env = Env::new(metrics.clone(), health.clone(), traces.clone(), options.overrides.clone())
            .in_process(options.in_process);
        let runtime = Arc::new(runtime(&loaded, env, log).map_err(|invalid| {
            anyhow::anyhow!("the configuration is not valid:\n  {}", invalid.problems.join("\n  "))
        })?);

        let tls = match &spec.listeners.http.tls {
            None => None,
            Some(tls) => {
                let sources = crate::tls::Sources::new(tls, &options.tls_dir);
                let tls = crate::tls::Tls::load(sources, &metrics, health.clone())
                    .map_err(|error| anyhow::anyhow!("spec.listeners.http.tls: {error}"))?;
                Some(Arc::new(tls))
            }
        };
        let http_address = options.http_address.unwrap_or_else(|| admin::default_address(spec.listeners.http.port));
        let admin_address = options.admin_address.unwrap_or_else(|| admin::default_address(spec.listeners.admin_port));
        let http = if options.traffic_threads == 0 {
            Listeners::One(
                tokio::net::TcpListener::bind(http_address).await.with_context(|| format!("binding {http_address}"))?,
            )
        } else {
            Listeners::PerThread(
                server::bind_reuseport(http_address, options.traffic_threads)
                    .with_context(|| format!("binding {http_address} with SO_REUSEPORT"))?,
            )
        };
        let admin_listener =
            tokio::net::TcpListener::bind(admin_address).await.with_context(|| format!("binding {admin_address}"))?;
        let (http_address, admin_address) = (http.local_addr()?, admin_listener.local_addr()?);
        let scheme = if tls.is_some() { "HTTPS" } else { "HTTP" };
        health.set("http", State::Up, format!("{scheme} on {http_address}"), true);
        tracing::info!(
            middleware = %loaded.middleware(),
            config = %loaded.hash,
            http = %http_address,
            admin = %admin_address,
            routes = spec.routes.len(),
            commands = spec.commands.len(),
            event_routes = loaded.bundle.event_routes.len(),
            "serving"
        );

        let admin_state = Arc::new(Admin {
            runtime: runtime.clone(),
            shutting_down: false.into(),
            config_path: options.config.display().to_string(),
        });
        let (stop_admin, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = async move {
            let mut rx = stop_rx;
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let admin_task = {
            let admin_state = admin_state.clone();
            tokio::spawn(async move {
                if let Err(error) = admin::serve(admin_listener, admin_state, stopped).await {
                    tracing::error!(%error, "the admin listener failed");
                }
            })
        };
        let watcher = tokio::spawn(reload::watch(
            reload::Watcher::new(options.config.clone(), files, runtime.clone()),
            options.reload_interval,
        ));
        let (accepting, accepting_rx) = tokio::sync::watch::channel(true);
        let stop_accepting = async move {
            let mut rx = accepting_rx;
            let _ = rx.wait_for(|accepting| !*accepting).await;
        };
        let chain = chain::build(runtime.clone());
        // Warm-up fetches through the chain.
        runtime.loopback().set(chain.clone());
        let limits = crate::kernel::inbound::Limits::from_spec(&spec.listeners.http);
        let tls_watcher = tls.clone().map(|tls| tokio::spawn(crate::tls::watch(tls, options.reload_interval)));
        let serving = server::Serving::new(chain, metrics, limits, tls);
        let traffic = match http {
            Listeners::One(http) => {
                Traffic::Task(tokio::spawn(server::serve(http, serving, stop_accepting, options.drain_timeout)))
            }
            Listeners::PerThread(sockets) => {
                match Threads::start(sockets, serving, stop_accepting, options.drain_timeout, health.clone()).await {
                    Ok(threads) => Traffic::Threads(threads),
                    Err(error) => {
                        // Nothing is left running: the threads started so far end with the dropped `exit`.
                        admin_task.abort();
                        watcher.abort();
                        if let Some(tls_watcher) = &tls_watcher {
                            tls_watcher.abort();
                        }
                        runtime.loopback().clear();
                        return Err(error);
                    }
                }
            }
        };
        Ok(Self {
            runtime,
            http: http_address,
            admin: admin_address,
            admin_state,
            traces,
            options,
            accepting,
            stop_admin,
            traffic,
            admin_task,
            watcher,
            tls_watcher,
        })
    }

    /// The graceful stop: readiness turns false, traffic is served for `shutdown_delay` more, accepting
    /// stops and in-flight requests drain (up to `drain_timeout`), then consumers commit, relays finish
    /// their batch and producers flush (up to `stop_timeout`, all at once), and the admin listener closes.
    pub async fn shutdown(self) {
        let options = &self.options;
        tracing::info!(delay = ?options.shutdown_delay, "shutting down: readiness is now false");
        self.admin_state.shutting_down.store(true, Ordering::Relaxed);
        tokio::time::sleep(options.shutdown_delay).await;
        let _ = self.accepting.send(false);
        let mut traffic = self.traffic;
        traffic.drained().await;
        self.watcher.abort();
        if let Some(tls_watcher) = &self.tls_watcher {
            tls_watcher.abort();
        }
        self.runtime.loopback().clear();
        self.runtime.shutdown(Instant::now() + options.stop_timeout).await;
        let _ = self.stop_admin.send(true);
        let _ = self.admin_task.await;
        if let Some(traces) = self.traces {
            tokio::task::spawn_blocking(move || traces.shutdown()).await.ok();
        }
        traffic.exit().await;
        tracing::info!("stopped");
    }

    /// Stops at once, without draining (tests).
    pub fn abort(&self) {
        self.traffic.abort();
        self.admin_task.abort();
        self.watcher.abort();
        if let Some(tls_watcher) = &self.tls_watcher {
            tls_watcher.abort();
        }
        self.runtime.loopback().clear();
    }
}

/// The traffic port's listening sockets, bound before anything is served.
enum Listeners {
    One(tokio::net::TcpListener),
    PerThread(Vec<std::net::TcpListener>),
}

impl Listeners {
    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Self::One(listener) => listener.local_addr(),
            Self::PerThread(sockets) => sockets[0].local_addr(),
        }
    }
}

/// Where the traffic listener runs.
enum Traffic {
    Task(tokio::task::JoinHandle<()>),
    Threads(Threads),
}

impl Traffic {
    /// Resolves once every listener has stopped accepting and drained; what is left to do is [`Self::exit`].
    async fn drained(&mut self) {
        match self {
            Self::Task(task) => drop(task.await),
            Self::Threads(threads) => {
                for drained in std::mem::take(&mut threads.drained) {
                    let _ = drained.await;
                }
            }
        }
    }

    /// Ends the traffic threads, dropping their runtimes.
    async fn exit(self) {
        if let Self::Threads(threads) = self {
            let _ = threads.exit.send(true);
            let handles = threads.handles;
            let _ = tokio::task::spawn_blocking(move || handles.into_iter().for_each(|h| drop(h.join()))).await;
        }
    }

    fn abort(&self) {
        match self {
            Self::Task(task) => task.abort(),
            Self::Threads(threads) => drop(threads.exit.send(true)),
        }
    }
}

/// Thread-per-core serving: one OS thread per socket of the port, each running its own current-thread
/// runtime, so that a connection and every request on it stay on one core with that core's upstream
/// pool, with no work stealing and no wake-ups across threads.
struct Threads {
    /// One per thread, resolving when it has drained.
    drained: Vec<tokio::sync::oneshot::Receiver<()>>,
    /// A thread keeps its runtime until this turns true (or is dropped): connections that requests opened
    /// there (Redis, PostgreSQL, TLS and h2c upstreams) are driven by that runtime and may still be in use
    /// by the components while they stop.
    exit: tokio::sync::watch::Sender<bool>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl Threads {
    /// Starts one thread per socket; each builds its runtime and starts listening before this returns.
    /// A thread that stops by a panic (its requests' panics are caught per request) turns the `http`
    /// component down, so that the pod is taken out of its Service, and is logged and counted.
    async fn start(
        sockets: Vec<std::net::TcpListener>,
        serving: server::Serving,
        stop_accepting: impl std::future::Future<Output = ()> + Send + 'static,
        drain: Duration,
        health: Health,
    ) -> anyhow::Result<Self> {
        use futures::FutureExt as _;
        let (exit, _) = tokio::sync::watch::channel(false);
        let stop = Box::pin(stop_accepting).shared();
        let mut threads = Self { drained: Vec::new(), exit, handles: Vec::new() };
        for (index, socket) in sockets.into_iter().enumerate() {
            let name = format!("umw-http-{index}");
            let (started, started_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
            let (drained, drained_rx) = tokio::sync::oneshot::channel();
            let mut exit = threads.exit.subscribe();
            let (serving, stop, health) = (serving.clone(), stop.clone(), health.clone());
            let thread = name.clone();
            // The runtime is built in the thread: a spawn that fails then drops nothing that needs a runtime.
            let spawned = std::thread::Builder::new().name(name.clone()).spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(error) => return drop(started.send(Err(format!("building its runtime: {error}")))),
                };
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(socket) {
                        Ok(listener) => listener,
                        Err(error) => return drop(started.send(Err(format!("listening: {error}")))),
                    };
                    let _ = started.send(Ok(()));
                    let serve = async move {
                        let served = std::panic::AssertUnwindSafe(server::serve(listener, serving, stop, drain));
                        if let Err(panic) = served.catch_unwind().await {
                            let what = panic
                                .downcast_ref::<&str>()
                                .map(|s| s.to_string())
                                .or_else(|| panic.downcast_ref::<String>().cloned())
                                .unwrap_or_else(|| "(no message)".into());
                            tracing::error!(thread = %thread, panic = %what, "a traffic thread stopped");
                            crate::kernel::metrics::PANICS.inc();
                            health.set("http", State::Down, format!("traffic thread {thread} stopped: {what}"), true);
                        }
                        let _ = drained.send(());
                        std::future::pending::<()>().await;
                    };
                    tokio::select! {
                        () = serve => {}
                        _ = exit.wait_for(|exit| *exit) => {}
                    }
                });
            });
            let handle = spawned.with_context(|| format!("starting traffic thread {name}"))?;
            threads.handles.push(handle);
            match started_rx.await {
                Ok(Ok(())) => threads.drained.push(drained_rx),
                Ok(Err(error)) => anyhow::bail!("traffic thread {name}: {error}"),
                Err(_) => anyhow::bail!("traffic thread {name} stopped while starting"),
            }
        }
        Ok(threads)
    }
}
