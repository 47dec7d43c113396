#![forbid(unsafe_code)]
//! `umw-dataplane`: serves the routes of one Middleware. See the library's documentation.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use umw_crds::middleware::LogFormat;
use umw_dataplane::app::{self, App, Options};
use umw_dataplane::config;
use umw_dataplane::kernel::component::Env;
use umw_dataplane::kernel::health::Health;
use umw_dataplane::kernel::metrics::Metrics;
use umw_dataplane::kernel::net::Overrides;
use umw_dataplane::kernel::telemetry::{self, LogControl};

/// mimalloc rather than the system allocator: a proxy allocates and frees small buffers on every request,
/// and glibc's allocator showed up as a seventh of the CPU time under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "umw-dataplane", version, about = "The Universal Middleware data plane")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// A YAML file, or a directory of them, holding one Middleware and its policies.
    #[arg(long, global = true, env = "UMW_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the traffic listener; defaults to the Middleware's `listeners.http.port` on all interfaces.
    #[arg(long, global = true, env = "UMW_HTTP_ADDRESS")]
    http_address: Option<SocketAddr>,
    /// Address of the admin endpoints; defaults to the Middleware's `listeners.adminPort` on all interfaces.
    #[arg(long, global = true, env = "UMW_ADMIN_ADDRESS")]
    admin_address: Option<SocketAddr>,
    /// Connect to ADDRESS for the upstream NAME:PORT (a Service name or URL host, and port), like curl's
    /// --resolve; comma-separated. For running outside a cluster: `shop-api:8080=127.0.0.1:9000`.
    #[arg(long, global = true, env = "UMW_RESOLVE", default_value = "")]
    resolve: Overrides,
    /// Use the in-process implementation of every backend (a memory cache instead of Redis, ...), for
    /// running on a laptop without them. Not durable, not shared between replicas.
    #[arg(long, global = true, env = "UMW_IN_PROCESS_BACKENDS")]
    in_process_backends: bool,
    /// Threads that serve traffic; defaults to the number of CPUs. Set it to the container's CPU limit.
    #[arg(long, global = true, env = "UMW_WORKER_THREADS")]
    worker_threads: Option<usize>,
    /// Log format, overriding `spec.observability.logFormat`: `json` or `text`.
    #[arg(long, global = true, env = "UMW_LOG_FORMAT", value_parser = parse_log_format)]
    log_format: Option<LogFormat>,
    /// How often the configuration is checked for changes.
    #[arg(long, global = true, env = "UMW_RELOAD_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    reload_interval: Duration,
    /// On SIGTERM, keep serving this long while readiness is already false (so that load balancers stop
    /// sending new requests), then stop accepting.
    #[arg(long, global = true, env = "UMW_SHUTDOWN_DELAY", default_value = "0s", value_parser = parse_duration_or_zero)]
    shutdown_delay: Duration,
    /// After accepting stops, how long in-flight requests may take before their connections are closed.
    #[arg(long, global = true, env = "UMW_DRAIN_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// After draining, how long consumers (committing), outbox relays (finishing their batch) and producers
    /// (waiting for acknowledgements) may take to stop, all at once. The shutdown delay, the drain timeout
    /// and this together must fit in the pod's termination grace period.
    #[arg(long, global = true, env = "UMW_STOP_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    stop_timeout: Duration,
    /// Where the Secrets that `listeners.http.tls` names are found, one directory per Secret holding its
    /// keys as files (`tls.crt`, `tls.key`, `ca.crt`): where the operator mounts them.
    #[arg(long, global = true, env = "UMW_TLS_DIR", default_value = umw_dataplane::tls::DEFAULT_TLS_DIR)]
    tls_dir: PathBuf,
    /// Where the reason the data plane could not start is written, when the file exists: Kubernetes' default
    /// `terminationMessagePath`, which the kubelet creates and shows in the pod's status.
    #[arg(long, global = true, env = "UMW_TERMINATION_LOG", default_value = "/dev/termination-log")]
    termination_log: PathBuf,
}

/// Most of a termination message the kubelet keeps.
const MAX_TERMINATION_MESSAGE: usize = 4096;

/// Prints why the data plane stops and, when serving under a kubelet (`termination_log` exists), writes it
/// there too.
fn fail(termination_log: Option<&std::path::Path>, message: &str) -> ExitCode {
    eprintln!("{message}");
    if let Some(path) = termination_log.filter(|path| path.exists()) {
        let mut end = message.len().min(MAX_TERMINATION_MESSAGE);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        if let Err(error) = std::fs::write(path, &message[..end]) {
            eprintln!("warning: writing {}: {error}", path.display());
        }
    }
    ExitCode::FAILURE
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default).
    Run,
    /// Validate the configuration, report every problem with its file, document and field, and exit.
    Check,
}

fn parse_log_format(text: &str) -> Result<LogFormat, String> {
    match text {
        "json" => Ok(LogFormat::Json),
        "text" => Ok(LogFormat::Text),
        other => Err(format!("{other:?} is not json or text")),
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    umw_crds::common::parse_duration(text).map_err(|e| e.to_string())
}

fn parse_duration_or_zero(text: &str) -> Result<Duration, String> {
    if matches!(text, "0" | "0s" | "0ms") {
        return Ok(Duration::ZERO);
    }
    parse_duration(text)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(path) = cli.config.clone() else {
        eprintln!("error: --config PATH is required (a YAML file, or a directory of them, with one Middleware)");
        return ExitCode::from(2);
    };
    // `check` reports to its caller; only a serving data plane explains itself to the kubelet.
    let termination_log = (!matches!(cli.command, Some(Command::Check))).then(|| cli.termination_log.clone());
    let termination_log = termination_log.as_deref();
    let (files, loaded) = match config::load(&path) {
        Ok(loaded) => loaded,
        Err(invalid) => {
            let message =
                format!("{}: the configuration is not valid:\n  {}", path.display(), invalid.problems.join("\n  "));
            return fail(termination_log, &message);
        }
    };
    // One thread: one current-thread runtime serves everything, with no work-stealing machinery for
    // nothing to steal. More: the traffic port gets that many threads of its own, each a current-thread
    // runtime with its own `SO_REUSEPORT` socket (thread per core), and the rest (consumers, relays,
    // admin, reloads) a multi-threaded runtime that idles unless events flow.
    let threads = cli.worker_threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let threads = threads.max(1);
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => return fail(termination_log, &format!("error: cannot start the async runtime: {error}")),
    };
    let result = match cli.command {
        Some(Command::Check) => runtime.block_on(check(&cli, &path, &loaded)),
        Some(Command::Run) | None => runtime.block_on(run(cli, path, files, loaded, threads)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(termination_log, &format!("error: {error:#}")),
    }
}

async fn check(cli: &Cli, path: &std::path::Path, loaded: &config::Loaded) -> anyhow::Result<()> {
    let metrics = Metrics::new().context("registering metrics")?;
    // Building the runtime compiles every route, schema, template and upstream, as a start would; with
    // the in-process backends, so that checking neither needs the Secrets nor contacts Redis or Kafka.
    let env = Env::new(metrics.clone(), Health::default(), None, cli.resolve.clone()).in_process(true);
    let runtime = app::runtime(loaded, env, LogControl::disabled())
        .map_err(|invalid| anyhow::anyhow!("the configuration is not valid:\n  {}", invalid.problems.join("\n  ")))?;
    let snapshot = runtime.snapshot();
    let b = &loaded.bundle;
    println!(
        "{}: Middleware {} with {} route(s), {} CachePolicy, {} EventRoute, {} AuthPolicy; configuration hash {} (as /status reports it)",
        path.display(),
        loaded.middleware(),
        b.middleware.spec.routes.len(),
        b.cache_policies.len(),
        b.event_routes.len(),
        b.auth_policies.len(),
        loaded.hash
    );
    let connections = &b.middleware.spec.connections;
    if connections.redis.is_some() || connections.kafka.is_some() || connections.postgres.is_some() {
        println!(
            "  note: spec.connections (Redis, Kafka, PostgreSQL) are not contacted by check; their Secrets are read at start"
        );
    }
    if !b.middleware.spec.commands.is_empty() {
        println!(
            "  {} command(s) at POST /commands/<name>, recorded in PostgreSQL and relayed to Kafka",
            b.middleware.spec.commands.len()
        );
    }
    if let Some(tls) = &b.middleware.spec.listeners.http.tls {
        // The certificates are read and checked as a start would read them (from --tls-dir for Secrets).
        let health = Health::default();
        umw_dataplane::tls::Tls::load(umw_dataplane::tls::Sources::new(tls, &cli.tls_dir), &metrics, health.clone())
            .map_err(|error| anyhow::anyhow!("spec.listeners.http.tls: {error}"))?;
        if let Some(component) = health.components().into_iter().find(|c| c.name == "tls") {
            println!("  TLS: {}", component.message);
        }
    }
    for policy in snapshot.policies.iter().filter(|p| !p.enforced) {
        println!("  note: {} {} is accepted but not enforced: {}", policy.kind, policy.name, policy.message);
    }
    runtime.shutdown(std::time::Instant::now()).await;
    Ok(())
}

async fn run(
    cli: Cli,
    path: PathBuf,
    files: config::Files,
    loaded: config::Loaded,
    threads: usize,
) -> anyhow::Result<()> {
    let spec = &loaded.bundle.middleware.spec;
    let format = cli.log_format.unwrap_or(spec.observability.log_format);
    let log = telemetry::init_logs(format, spec.observability.log_level.as_deref());
    let options = Options {
        config: path,
        http_address: cli.http_address,
        admin_address: cli.admin_address,
        overrides: cli.resolve.clone(),
        in_process: cli.in_process_backends,
        reload_interval: cli.reload_interval,
        shutdown_delay: cli.shutdown_delay,
        drain_timeout: cli.drain_timeout,
        stop_timeout: cli.stop_timeout,
        tls_dir: cli.tls_dir.clone(),
        traffic_threads: if threads == 1 { 0 } else { threads },
    };
    let app = App::start(options, files, loaded, log).await?;
    shutdown_signal().await;
    app.shutdown().await;
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    #[cfg(unix)]
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
        return;
    }
    let _ = tokio::signal::ctrl_c().await;
}
