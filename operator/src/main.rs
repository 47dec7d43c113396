#![forbid(unsafe_code)]
//! `umw-operator`: reconciles Universal Middleware resources into data-plane deployments.

mod admin;
mod attach;
mod controller;
mod health;
mod leader;
mod metrics;
mod render;
mod shared;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use futures::FutureExt;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "umw-operator",
    version,
    about = "Reconciles Universal Middleware resources into data-plane deployments"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML.
    Crds,
    /// Print the CRD field reference as Markdown (docs/crds.md).
    CrdReference,
    /// Print the Helm chart's values.schema.json.
    ValuesSchema,
    /// Run the controllers (the default).
    Run,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "UMW_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Data-plane image for Middlewares that do not set one.
    #[arg(long, env = "UMW_DATAPLANE_IMAGE", default_value = concat!("ghcr.io/universal-middleware/umw-dataplane:", env!("CARGO_PKG_VERSION")))]
    dataplane_image: String,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "UMW_ADMIN_ADDRESS", default_value = "0.0.0.0:8080")]
    admin_address: SocketAddr,
    /// Take part in leader election (turn off only when running a single replica by hand).
    #[arg(long, env = "UMW_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Namespace of the leader Lease (default: the pod's namespace, else the watched one, else `default`).
    #[arg(long, env = "UMW_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Name of the leader Lease.
    #[arg(long, env = "UMW_LEASE_NAME", default_value = "umw-operator-leader")]
    lease_name: String,
    /// Deadline of every API call, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    api_timeout: Duration,
    /// Reconcile every object at least this often, e.g. 10m.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    resync: Duration,
    /// Retry interval of a Middleware waiting for a missing Secret, e.g. 30s.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    stall_retry: Duration,
    /// How long writing a Middleware's children may keep failing with a server error or a timeout before
    /// its status says so (Stalled, ApplyFailing), e.g. 30s.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    apply_stall_after: Duration,
    /// How often each data-plane pod's /status is read, e.g. 5s.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    health_interval: Duration,
    /// Deadline of one /status read, e.g. 2s.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    health_timeout: Duration,
    /// Pods whose /status is read at the same time.
    #[arg(long, default_value_t = 16)]
    health_concurrency: usize,
    /// Reconciles running at once, per controller: bounds the memory of a burst, such as a start over
    /// thousands of Middlewares.
    #[arg(long, default_value_t = 16)]
    max_concurrent_reconciles: u16,
    /// Triggers of one object that arrive within this of each other (a Deployment's status moving
    /// through a rollout, the operator's own status write) make one reconcile; 0 reconciles on each.
    #[arg(long, default_value = "1s", value_parser = parse_duration_or_zero)]
    reconcile_debounce: Duration,
    /// Log format: json or text.
    #[arg(long, env = "UMW_LOG_FORMAT", default_value = "text")]
    log_format: String,
}

fn parse_duration_or_zero(text: &str) -> Result<Duration, String> {
    // `0`, `0s`, `0ms`...: zero in any unit.
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    if !digits.is_empty() && digits.bytes().all(|b| b == b'0') { Ok(Duration::ZERO) } else { parse_duration(text) }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    umw_crds::common::parse_duration(text).map_err(|e| e.to_string())
}

fn init_logging(format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube=warn"));
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

/// Resolves on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c().map(|_| ());
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => return ctrl_c.await,
        };
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    ctrl_c.await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Crds) => {
            print!("{}", umw_crds::crds_yaml().context("serialising the CRDs")?);
            Ok(())
        }
        Some(Command::CrdReference) => {
            print!("{}", umw_crds::reference::markdown().context("rendering the CRD reference")?);
            Ok(())
        }
        Some(Command::ValuesSchema) => {
            print!("{}", umw_crds::chart::values_schema_json());
            Ok(())
        }
        Some(Command::Run) | None => run(cli.run).await,
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logging(&args.log_format);
    let metrics = metrics::Metrics::new().context("registering metrics")?;
    let admin = Arc::new(admin::Admin { metrics: metrics.clone(), ready: false.into() });

    // `stop` ends everything: the controllers, the leader election and the admin server.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let stopped = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
        .shared()
    };
    {
        let stop_tx = stop_tx.clone();
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!("shutting down");
            let _ = stop_tx.send(true);
        });
    }
    let admin_server = tokio::spawn(admin::serve(args.admin_address, admin.clone(), stopped.clone()));

    let client =
        kube::Client::try_default().await.context("connecting to the Kubernetes API (kubeconfig or in-cluster)")?;
    let identity = identity();
    let config = controller::Config {
        render: render::Settings { dataplane_image: args.dataplane_image.clone() },
        namespace: args.namespace.clone(),
        api_timeout: args.api_timeout,
        resync: args.resync,
        stall_retry: args.stall_retry,
        apply_stall_after: args.apply_stall_after,
        instance: identity.clone(),
        health: health::PollSettings {
            interval: args.health_interval,
            timeout: args.health_timeout,
            concurrency: args.health_concurrency,
        },
        max_concurrent_reconciles: args.max_concurrent_reconciles,
        reconcile_debounce: args.reconcile_debounce,
    };

    let leader = args.leader_election.then(|| {
        let namespace = args
            .lease_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .or_else(|| args.namespace.clone())
            .unwrap_or_else(|| "default".into());
        leader::Leader::new(
            client.clone(),
            leader::Election {
                namespace,
                lease_name: args.lease_name.clone(),
                identity: identity.clone(),
                lease_duration: Duration::from_secs(15),
                renew_deadline: Duration::from_secs(10),
                retry_period: Duration::from_secs(2),
                api_timeout: args.api_timeout,
            },
            metrics.clone(),
        )
    });

    if let Some(leader) = &leader {
        // A standby is ready: it is doing its job, which is waiting.
        admin.ready.store(true, Ordering::Relaxed);
        tokio::select! {
            _ = leader.acquire() => {}
            _ = stopped.clone() => {
                let _ = admin_server.await;
                return Ok(());
            }
        }
        admin.ready.store(false, Ordering::Relaxed);
    }

    let synced = {
        let admin = admin.clone();
        move || admin.ready.store(true, Ordering::Relaxed)
    };
    let controllers = controller::run(client, config, metrics.clone(), stopped.clone(), synced);
    let outcome = match &leader {
        Some(leader) => tokio::select! {
            _ = controllers => Ok(()),
            _ = leader.hold() => Err(anyhow::anyhow!("lost the leader lease; exiting so that a fresh start rejoins the election")),
        },
        None => {
            controllers.await;
            Ok(())
        }
    };
    admin.ready.store(false, Ordering::Relaxed);
    // A lease that was lost is not ours to release.
    if let (Some(leader), Ok(())) = (&leader, &outcome) {
        leader.release().await;
    }
    let _ = stop_tx.send(true);
    let _ = admin_server.await;
    outcome
}

/// This replica's name in the election and in Events: the pod name (or host name) plus a random part, so
/// that two processes never share an identity (a restarted pod keeps its name).
fn identity() -> String {
    let base =
        std::env::var("POD_NAME").or_else(|_| std::env::var("HOSTNAME")).unwrap_or_else(|_| "umw-operator".to_string());
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let random = (nanos as u64) ^ (u64::from(std::process::id()) << 32);
    format!("{base}_{:08x}", random & 0xffff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_debounce_of_zero_is_accepted_in_any_unit() {
        for zero in ["0", "0s", "0ms", "00s"] {
            assert_eq!(parse_duration_or_zero(zero), Ok(Duration::ZERO), "{zero}");
        }
        assert_eq!(parse_duration_or_zero("1s"), Ok(Duration::from_secs(1)));
        assert!(parse_duration_or_zero("s").is_err());
        assert!(parse_duration_or_zero("soon").is_err());
    }
}
