//! `umw-kubelet`: the process kubelet of the e2e tests, for `make dev`. Runs the data-plane pods of every
//! namespace as local processes; see `umw_e2e::kubelet`.
//!
//! ```text
//! umw-kubelet --dataplane target/debug/umw-dataplane --work-dir .dev/pods [--env UMW_RESOLVE=...]
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut dataplane = None;
    let mut work_dir = None;
    let mut extra_env = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--dataplane" => dataplane = args.next().map(PathBuf::from),
            "--work-dir" => work_dir = args.next().map(PathBuf::from),
            "--env" => {
                let pair = args.next().context("--env needs NAME=VALUE")?;
                let (name, value) = pair.split_once('=').context("--env needs NAME=VALUE")?;
                extra_env.push((name.to_string(), value.to_string()));
            }
            other => anyhow::bail!(
                "unknown argument {other:?}; usage: umw-kubelet --dataplane BIN --work-dir DIR [--env NAME=VALUE]..."
            ),
        }
    }
    let settings = umw_e2e::kubelet::Settings {
        namespace: None,
        node: "umw-dev-node".into(),
        dataplane: dataplane.context("--dataplane BIN is required")?,
        work_dir: work_dir.context("--work-dir DIR is required")?,
        extra_env,
        sync_interval: Duration::from_secs(1),
        restart_backoff: Duration::from_secs(1),
    };
    let client = kube::Client::try_default().await.context("connecting to the Kubernetes API (KUBECONFIG)")?;
    let kubelet = umw_e2e::kubelet::Kubelet::start(client, settings).await?;
    eprintln!("[kubelet] running data-plane pods as local processes");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
    drop(kubelet);
    Ok(())
}
