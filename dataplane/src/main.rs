#![forbid(unsafe_code)]
//! `umw-dataplane`: the Universal Middleware data plane.
//!
//! This version loads and validates its configuration (the same manifests a user applies to a cluster) and
//! serves the admin endpoints; the gateway, cache, events, commands and auth components land in the
//! following releases.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use clap::{Parser, Subcommand};
use umw_crds::config::{self, Bundle};

#[derive(Parser)]
#[command(name = "umw-dataplane", version, about = "The Universal Middleware data plane")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// A YAML file, or a directory of them, holding one Middleware and its policies.
    #[arg(long, global = true, env = "UMW_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the admin endpoints; defaults to the Middleware's `listeners.adminPort` on all interfaces.
    #[arg(long, global = true, env = "UMW_ADMIN_ADDRESS")]
    admin_address: Option<SocketAddr>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration and exit.
    Check,
}

/// Reads a file, or every `.yaml`/`.yml` file of a directory in name order, as one YAML stream.
fn read_config(path: &Path) -> anyhow::Result<(String, Bundle)> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("reading directory {}", path.display()))?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .collect();
        files.sort();
        files
    } else {
        vec![path.to_path_buf()]
    };
    let mut texts = Vec::new();
    for file in &files {
        let content = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        texts.push((file.display().to_string(), content));
    }
    let sources: Vec<(&str, &str)> = texts.iter().map(|(name, text)| (name.as_str(), text.as_str())).collect();
    let bundle = Bundle::from_sources(&sources).with_context(|| format!("configuration {}", path.display()))?;
    Ok((config::hash(&bundle.to_yaml()?), bundle))
}

struct Admin {
    config_hash: String,
    middleware: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        ))
        .init();
    let cli = Cli::parse();
    let path = cli.config.context("--config PATH is required (a YAML file or a directory of them)")?;
    let (config_hash, bundle) = read_config(&path)?;
    let middleware = format!(
        "{}/{}",
        bundle.middleware.metadata.namespace.as_deref().unwrap_or("default"),
        bundle.middleware.metadata.name.as_deref().unwrap_or("")
    );
    if let Some(Command::Check) = cli.command {
        println!(
            "{}: Middleware {middleware} with {} CachePolicy, {} EventRoute, {} AuthPolicy; configuration {config_hash}",
            path.display(),
            bundle.cache_policies.len(),
            bundle.event_routes.len(),
            bundle.auth_policies.len()
        );
        return Ok(());
    }
    let address = cli
        .admin_address
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], bundle.middleware.spec.listeners.admin_port)));
    let admin = Arc::new(Admin { config_hash, middleware });
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ready" }))
        .route(
            "/status",
            get(|State(admin): State<Arc<Admin>>| async move {
                axum::Json(serde_json::json!({
                    "version": env!("CARGO_PKG_VERSION"),
                    "middleware": admin.middleware,
                    "configHash": admin.config_hash,
                    "components": [],
                }))
            }),
        )
        .with_state(admin);
    let listener = tokio::net::TcpListener::bind(address).await.with_context(|| format!("binding {address}"))?;
    tracing::info!(address = %listener.local_addr()?, "admin endpoints listening");
    axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn examples() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
    }

    #[test]
    fn the_examples_are_a_valid_configuration_as_a_directory_and_as_a_file() {
        let (hash, bundle) = read_config(&examples()).unwrap();
        assert_eq!(bundle.middleware.metadata.name.as_deref(), Some("shop"));
        assert_eq!((bundle.cache_policies.len(), bundle.event_routes.len(), bundle.auth_policies.len()), (1, 1, 1));
        assert_eq!(read_config(&examples().join("shop.yaml")).unwrap().0, hash);
    }

    #[test]
    fn a_typo_is_reported_with_its_document_and_field() {
        let dir = std::env::temp_dir().join(format!("umw-dataplane-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bad.yaml");
        std::fs::write(
            &file,
            "apiVersion: v1\nkind: Secret\n---\napiVersion: umw.dev/v1alpha1\nkind: Middleware\nmetadata: {name: a}\nspec:\n  listeners: {htp: {port: 8080}}\n",
        )
        .unwrap();
        let error = format!("{:#}", read_config(&file).unwrap_err());
        assert!(error.contains("bad.yaml, document 2") && error.contains("spec.listeners.htp"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
