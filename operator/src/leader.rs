//! Leader election on a `coordination.k8s.io` Lease, so that two or more replicas can run safely: only
//! the holder reconciles. Updates use the Lease's resourceVersion, so two candidates cannot both win.
//!
//! As in client-go: a candidate judges a lease expired by its own clock (the holder record has not changed
//! for `lease_duration` since this candidate first saw it), never by comparing the holder's timestamps with
//! its clock; and a leader stops working when it could not renew for `renew_deadline`, which is shorter
//! than `lease_duration`, so that it has stopped before anyone else may take over.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, Error as KubeError};

use crate::metrics::Metrics;

/// How a candidate takes part in the election.
#[derive(Clone, Debug)]
pub struct Election {
    pub namespace: String,
    pub lease_name: String,
    pub identity: String,
    pub lease_duration: Duration,
    /// A leader that could not renew for this long gives up. Shorter than `lease_duration`.
    pub renew_deadline: Duration,
    /// Time between attempts (renewals and acquisitions).
    pub retry_period: Duration,
    pub api_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("reading or writing Lease {namespace}/{name}: {source}")]
    Api { namespace: String, name: String, source: KubeError },
    #[error("Lease {namespace}/{name}: the API server did not answer within {timeout:?}")]
    Timeout { namespace: String, name: String, timeout: Duration },
}

/// Another holder's record (identity, renew time) and when we first saw it unchanged, by our clock.
type Observed = (Option<String>, Option<MicroTime>, std::time::Instant);

pub struct Leader {
    api: Api<Lease>,
    election: Election,
    metrics: Metrics,
    /// The other holder's record as last seen, and when it last changed, by our clock.
    observed: std::sync::Mutex<Option<Observed>>,
}

impl Leader {
    pub fn new(client: Client, election: Election, metrics: Metrics) -> Self {
        Self { api: Api::namespaced(client, &election.namespace), election, metrics, observed: Default::default() }
    }

    /// Whether the lease held by someone else has expired, judged by our own clock.
    fn expired(&self, spec: &LeaseSpec) -> bool {
        let record = (spec.holder_identity.clone(), spec.renew_time.clone());
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs)
            .unwrap_or(self.election.lease_duration);
        let Ok(mut observed) = self.observed.lock() else { return false };
        match observed.as_ref() {
            Some((holder, renewed, since)) if (holder, renewed) == (&record.0, &record.1) => since.elapsed() > duration,
            _ => {
                *observed = Some((record.0, record.1, std::time::Instant::now()));
                false
            }
        }
    }

    /// Waits until this candidate holds the lease.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    tracing::info!(identity = %self.election.identity, lease = %self.election.lease_name, "became leader");
                    self.metrics.leader.set(1);
                    return;
                }
                Ok(false) => {}
                Err(error) => tracing::warn!(%error, "leader election attempt failed"),
            }
            tokio::time::sleep(self.election.retry_period).await;
        }
    }

    /// Renews the lease until a renewal is refused or none succeeded for `renew_deadline`; returns then,
    /// and the caller must stop working.
    pub async fn hold(&self) {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.election.retry_period).await;
            let left = self.election.renew_deadline.saturating_sub(last_renewal.elapsed());
            if left.is_zero() {
                tracing::error!(deadline = ?self.election.renew_deadline, "could not renew the lease in time");
                break;
            }
            match tokio::time::timeout(left, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => last_renewal = tokio::time::Instant::now(),
                Ok(Ok(false)) => {
                    tracing::error!("another replica holds the lease");
                    break;
                }
                Ok(Err(error)) => tracing::warn!(%error, "renewing the lease failed; retrying"),
                Err(_) => tracing::warn!("renewing the lease timed out; retrying"),
            }
        }
        self.metrics.leader.set(0);
    }

    /// Gives the lease up so that another replica takes over at once (on graceful shutdown).
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.get().await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.election.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        let name = self.election.lease_name.clone();
        match self.call(self.api.replace(&name, &PostParams::default(), &lease)).await {
            Ok(_) => tracing::info!("released the leader lease"),
            Err(error) => {
                tracing::warn!(%error, "could not release the leader lease; it expires by itself")
            }
        }
        self.metrics.leader.set(0);
    }

    async fn call<T>(&self, fut: impl Future<Output = Result<T, KubeError>>) -> Result<T, LeaderError> {
        let election = &self.election;
        match tokio::time::timeout(election.api_timeout, fut).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(LeaderError::Api {
                namespace: election.namespace.clone(),
                name: election.lease_name.clone(),
                source,
            }),
            Err(_) => Err(LeaderError::Timeout {
                namespace: election.namespace.clone(),
                name: election.lease_name.clone(),
                timeout: election.api_timeout,
            }),
        }
    }

    async fn get(&self) -> Result<Option<Lease>, LeaderError> {
        self.call(self.api.get_opt(&self.election.lease_name)).await
    }

    /// One round: `Ok(true)` when this candidate holds the lease afterwards.
    async fn try_acquire_or_renew(&self) -> Result<bool, LeaderError> {
        let now = Timestamp::now();
        let election = &self.election;
        let duration_seconds = i32::try_from(election.lease_duration.as_secs()).unwrap_or(15);
        let Some(mut lease) = self.get().await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(election.lease_name.clone()),
                    namespace: Some(election.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(election.identity.clone()),
                    lease_duration_seconds: Some(duration_seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.call(self.api.create(&PostParams::default(), &lease)).await {
                Ok(_) => Ok(true),
                Err(LeaderError::Api { source: KubeError::Api(status), .. }) if status.code == 409 => Ok(false),
                Err(error) => Err(error),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let mine = spec.holder_identity.as_deref() == Some(election.identity.as_str());
        if !mine {
            let free = spec.holder_identity.as_deref().unwrap_or("").is_empty() || self.expired(spec);
            if !free {
                return Ok(false);
            }
            spec.holder_identity = Some(election.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(duration_seconds);
        // `replace` carries the resourceVersion we read: a concurrent writer makes it fail with 409.
        match self.call(self.api.replace(&election.lease_name, &PostParams::default(), &lease)).await {
            Ok(_) => Ok(true),
            Err(LeaderError::Api { source: KubeError::Api(status), .. }) if status.code == 409 => Ok(false),
            Err(error) => Err(error),
        }
    }
}
