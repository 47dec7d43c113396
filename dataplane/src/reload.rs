//! Watches the configuration and reloads it atomically: read, parse, validate and build the new snapshot,
//! then swap it in; on any error the running one stays. Each outcome is logged and counted.
//!
//! The watcher polls: it re-reads the files every interval and acts when their content changed. Polling
//! works the same for a plain file, an editor's rename-into-place and Kubernetes' ConfigMap volumes (whose
//! updates swap a symlink), and re-reading a few kilobytes every two seconds costs nothing measurable.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::kernel::config;
use crate::runtime::{Outcome, Runtime};

/// The watcher's memory: the files last seen, and the last rejection (reported once, not every poll).
pub struct Watcher {
    pub path: PathBuf,
    last_files: Option<config::Files>,
    last_rejection: Option<String>,
    runtime: Arc<Runtime>,
}

impl Watcher {
    pub fn new(path: PathBuf, files: config::Files, runtime: Arc<Runtime>) -> Self {
        Self { path, last_files: Some(files), last_rejection: None, runtime }
    }

    /// Looks at the configuration once.
    pub fn check(&mut self) -> Outcome {
        let files = match config::read(&self.path) {
            Ok(files) => files,
            Err(invalid) => {
                // Forget what was read before, so that the same content coming back is looked at again.
                self.last_files = None;
                return self.reject(invalid.to_string());
            }
        };
        if self.last_files.as_ref() == Some(&files) && self.last_rejection.is_none() {
            return Outcome::Unchanged;
        }
        if self.last_files.as_ref() == Some(&files)
            && let Some(reason) = &self.last_rejection
        {
            // The same broken content as before: still rejected, already reported.
            return Outcome::Rejected(reason.clone());
        }
        self.last_files = Some(files.clone());
        let outcome = match config::parse(&files) {
            Ok(loaded) => self.runtime.apply(&loaded),
            Err(invalid) => Outcome::Rejected(invalid.to_string()),
        };
        match outcome {
            Outcome::Rejected(reason) => self.reject(reason),
            Outcome::Applied { hash } => {
                self.last_rejection = None;
                self.runtime.metrics.config_reloads.with_label_values(&["applied"]).inc();
                tracing::info!(%hash, "configuration reloaded");
                Outcome::Applied { hash }
            }
            Outcome::Unchanged => {
                // Edited back to what runs (or only reformatted): nothing to swap, and nothing wrong.
                if self.last_rejection.take().is_some() {
                    self.runtime.recovered();
                }
                Outcome::Unchanged
            }
        }
    }

    fn reject(&mut self, reason: String) -> Outcome {
        if self.last_rejection.as_ref() != Some(&reason) {
            self.runtime.metrics.config_reloads.with_label_values(&["rejected"]).inc();
            tracing::error!(%reason, "configuration rejected; the running one stays");
            self.runtime.rejected(&reason);
            self.last_rejection = Some(reason.clone());
        }
        Outcome::Rejected(reason)
    }
}

/// Polls every `interval` until the task is dropped.
pub async fn watch(watcher: Watcher, interval: Duration) {
    let runtime = watcher.runtime.clone();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut watcher = Some(watcher);
    loop {
        ticker.tick().await;
        let Some(mut current) = watcher.take() else { return };
        // File reads and schema compilation are blocking work; keep them off the request threads.
        match tokio::task::spawn_blocking(move || {
            current.check();
            current
        })
        .await
        {
            Ok(current) => watcher = Some(current),
            Err(error) => {
                tracing::error!(%error, "the configuration watcher failed; reloads stop");
                runtime.rejected("the configuration watcher failed; changes are no longer picked up until a restart");
                return;
            }
        }
    }
}
