//! Data-plane health: the operator reads each data-plane pod's `/status` (the admin port) and folds it
//! into the Middleware's status and its policies' `Enforced` condition.
//!
//! A poller visits every pod of every Middleware on an interval, with bounded concurrency and a timeout
//! per pod, keeps what it read in [`HealthCache`], and asks the Middleware controller to reconcile a
//! Middleware only when its pods' reports changed, so that a steady state costs reads and no writes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt as _;
use kube::runtime::reflector::{ObjectRef, Store};
use serde::Deserialize;
use umw_crds::Middleware;

use crate::metrics::Metrics;

/// A component as a pod reports it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Component {
    pub name: String,
    pub state: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub required: bool,
}

/// A policy as a pod reports it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyReport {
    pub kind: String,
    pub name: String,
    pub enforced: bool,
    #[serde(default)]
    pub message: String,
}

/// The part of a pod's `/status` the operator uses.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub config_hash: String,
    pub ready: bool,
    #[serde(default)]
    pub not_ready_reason: Option<String>,
    #[serde(default)]
    pub components: Vec<Component>,
    #[serde(default)]
    pub policies: Vec<PolicyReport>,
}

/// One pod as the poller last saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodHealth {
    pub pod: String,
    /// The pod's `Ready` condition, as Kubernetes has it.
    pub ready: bool,
    /// Whether the poller has read the pod at all yet (a pod that just started has not).
    pub read: bool,
    /// The pod's `/status`, or why it could not be read.
    pub report: Result<Report, String>,
    /// Why the data-plane container cannot run, when it cannot (see [`pod_failure`]).
    pub failure: Option<String>,
}

/// The pods of one Middleware, sorted by name.
pub type MiddlewareHealth = Vec<PodHealth>;

/// What the poller last read, per Middleware (`namespace/name`).
#[derive(Clone, Default)]
pub struct HealthCache(Arc<Mutex<HashMap<String, MiddlewareHealth>>>);

impl HealthCache {
    pub fn get(&self, namespace: &str, name: &str) -> Option<MiddlewareHealth> {
        self.0.lock().ok()?.get(&format!("{namespace}/{name}")).cloned()
    }

    /// Stores a reading; true when it differs from the previous one.
    fn put(&self, key: String, health: MiddlewareHealth) -> bool {
        let Ok(mut map) = self.0.lock() else { return false };
        if map.get(&key) == Some(&health) {
            return false;
        }
        map.insert(key, health);
        true
    }

    fn retain(&self, keep: impl Fn(&str) -> bool) {
        if let Ok(mut map) = self.0.lock() {
            map.retain(|k, _| keep(k));
        }
    }
}

/// Failed reads in a row after which a pod's last good report is no longer used.
const STALE_READS: u32 = 3;

/// Settings of the poller.
#[derive(Clone, Debug)]
pub struct PollSettings {
    pub interval: Duration,
    pub timeout: Duration,
    pub concurrency: usize,
}

/// The pods of a Middleware: the selector labels the operator renders.
pub fn pods_of<'a>(mw: &Middleware, pods: &'a [Arc<Pod>]) -> Vec<&'a Arc<Pod>> {
    let namespace = mw.namespace();
    let name = mw.name_any();
    let prefix = format!("umw-{name}-");
    let mut out: Vec<&Arc<Pod>> = pods
        .iter()
        .filter(|p| p.metadata.namespace == namespace)
        .filter(|p| p.labels().get("app.kubernetes.io/instance") == Some(&name))
        .filter(|p| p.labels().get("app.kubernetes.io/name").map(String::as_str) == Some("umw-dataplane"))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        // Only pods of the Middleware's own Deployment: labels alone can be copied by anyone who may create
        // pods, and what these pods report decides the Middleware's status.
        .filter(|p| {
            p.metadata.owner_references.iter().flatten().any(|o| {
                o.kind == "ReplicaSet"
                    && o.controller == Some(true)
                    && o.name.strip_prefix(&prefix).is_some_and(|hash| !hash.contains('-'))
            })
        })
        .collect();
    out.sort_by_key(|p| p.name_any());
    out
}

pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waiting reasons of a container that will not start by waiting longer.
const FAILING: [&str; 8] = [
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "RunContainerError",
    "StartError",
];

/// Most of a termination message quoted in a condition.
const MAX_QUOTED: usize = 1024;

/// Why the pod's data-plane container cannot run, when it is waiting for one of the [`FAILING`] reasons or
/// has exited with an error: the pod, the reason, the restarts, and the last termination's exit code and
/// message (what the data plane wrote to its termination log, or the end of its log). `None` for a pod that
/// runs or is starting normally.
pub fn pod_failure(pod: &Pod) -> Option<String> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    let status = statuses.iter().find(|s| s.name == "dataplane")?;
    let state = status.state.as_ref();
    let waiting =
        state.and_then(|s| s.waiting.as_ref()).filter(|w| FAILING.contains(&w.reason.as_deref().unwrap_or("")));
    let exited = state.and_then(|s| s.terminated.as_ref()).filter(|t| t.exit_code != 0);
    let last = status.last_state.as_ref().and_then(|s| s.terminated.as_ref()).filter(|t| t.exit_code != 0);
    let (what, detail) = match (waiting, exited) {
        (Some(waiting), _) => (
            waiting.reason.clone().unwrap_or_default(),
            waiting.message.clone().filter(|m| !m.is_empty() && last.is_none()),
        ),
        (None, Some(exited)) => (format!("exited with code {}", exited.exit_code), exited.message.clone()),
        (None, None) => return None,
    };
    let mut message = format!("pod {}: {what}", pod.name_any());
    if status.restart_count > 0 {
        message.push_str(&format!(" ({} restart(s))", status.restart_count));
    }
    if let (None, Some(last)) = (exited, last) {
        message.push_str(&format!("; last exit code {}", last.exit_code));
        if let Some(text) = last.message.as_deref().map(str::trim).filter(|m| !m.is_empty()) {
            message.push_str(&format!(": {}", quote(text)));
        }
    } else if let Some(text) = detail.as_deref().map(str::trim).filter(|m| !m.is_empty()) {
        message.push_str(&format!(": {}", quote(text)));
    }
    Some(message)
}

/// A message on one line, at most [`MAX_QUOTED`] bytes.
fn quote(text: &str) -> String {
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.len() <= MAX_QUOTED {
        return line;
    }
    let mut end = MAX_QUOTED;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &line[..end])
}

/// Largest `/status` document read; a data plane's is a few kilobytes.
const MAX_STATUS_BYTES: usize = 1024 * 1024;

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

async fn read_status(client: &HttpClient, pod: &Pod, port: u16, timeout: Duration) -> Result<Report, String> {
    let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
        return Err("the pod has no IP yet".into());
    };
    let host = if ip.contains(':') { format!("[{ip}]") } else { ip };
    let uri: http::Uri = format!("http://{host}:{port}/status").parse().map_err(|e| format!("bad pod address: {e}"))?;
    let fetch = async {
        let response = client.get(uri).await.map_err(|e| format!("cannot read /status: {}", root_cause(&e)))?;
        let status = response.status();
        let limited = http_body_util::Limited::new(response.into_body(), MAX_STATUS_BYTES);
        let body = limited.collect().await.map_err(|e| format!("reading /status: {e}"))?.to_bytes();
        if !status.is_success() {
            return Err(format!("/status answered {status}"));
        }
        serde_json::from_slice::<Report>(&body).map_err(|e| format!("/status is not a data-plane status: {e}"))
    };
    match tokio::time::timeout(timeout, fetch).await {
        Ok(result) => result,
        Err(_) => Err(format!("/status did not answer within {timeout:?}")),
    }
}

fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}

/// Pods by namespace and `app.kubernetes.io/instance`: built once per poll, so that finding a
/// Middleware's pods costs its own pods, not every pod.
fn index(pods: &[Arc<Pod>]) -> HashMap<(String, String), Vec<Arc<Pod>>> {
    let mut out: HashMap<(String, String), Vec<Arc<Pod>>> = HashMap::new();
    for pod in pods {
        if let (Some(namespace), Some(instance)) =
            (pod.metadata.namespace.as_ref(), pod.labels().get("app.kubernetes.io/instance"))
        {
            out.entry((namespace.clone(), instance.clone())).or_default().push(pod.clone());
        }
    }
    out
}

/// Polls every Middleware's pods until the task is dropped; sends the Middlewares whose health changed.
pub async fn poll(
    middlewares: Store<Middleware>,
    pods: Store<Pod>,
    cache: HealthCache,
    settings: PollSettings,
    changed: tokio::sync::mpsc::Sender<ObjectRef<Middleware>>,
    metrics: Metrics,
) {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(settings.timeout));
    let client: HttpClient = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1).build(connector);
    let mut ticker = tokio::time::interval(settings.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Consecutive failed reads per pod: one slow answer keeps the last good report rather than flipping
    // the Middleware's Ready condition.
    let mut failures: HashMap<String, u32> = HashMap::new();
    loop {
        ticker.tick().await;
        let by_instance = index(&pods.state());
        let mws = middlewares.state();
        let mut jobs = Vec::new();
        for mw in &mws {
            let key = (mw.namespace().unwrap_or_default(), mw.name_any());
            let Some(candidates) = by_instance.get(&key) else { continue };
            for pod in pods_of(mw, candidates) {
                let key = format!("{}/{}", mw.namespace().unwrap_or_default(), mw.name_any());
                // The port the operator rendered, not whatever the pod's spec claims.
                jobs.push((key, pod.clone(), mw.spec.listeners.admin_port));
            }
        }
        let readings: Vec<(String, PodHealth)> = futures::stream::iter(jobs)
            .map(|(key, pod, port)| {
                let client = client.clone();
                let metrics = metrics.clone();
                async move {
                    let report = read_status(&client, &pod, port, settings.timeout).await;
                    metrics.health_polls.with_label_values(&[if report.is_ok() { "ok" } else { "error" }]).inc();
                    (
                        key,
                        PodHealth {
                            pod: pod.name_any(),
                            ready: pod_ready(&pod),
                            read: true,
                            report,
                            failure: pod_failure(&pod),
                        },
                    )
                }
            })
            .buffer_unordered(settings.concurrency.max(1))
            .collect()
            .await;
        let mut by_mw: BTreeMap<String, MiddlewareHealth> = mws
            .iter()
            .map(|mw| (format!("{}/{}", mw.namespace().unwrap_or_default(), mw.name_any()), Vec::new()))
            .collect();
        for (key, mut health) in readings {
            let pod_key = format!("{key}/{}", health.pod);
            match &health.report {
                Ok(_) => {
                    failures.remove(&pod_key);
                }
                Err(_) => {
                    let n = failures.entry(pod_key).or_insert(0);
                    *n += 1;
                    let (namespace, name) = key.split_once('/').unwrap_or(("", &key));
                    let previous = cache
                        .get(namespace, name)
                        .and_then(|pods| pods.into_iter().find(|p| p.pod == health.pod))
                        .filter(|p| p.report.is_ok());
                    if *n < STALE_READS
                        && let Some(previous) = previous
                    {
                        health.report = previous.report;
                    }
                }
            }
            by_mw.entry(key).or_default().push(health);
        }
        let live: std::collections::HashSet<String> =
            by_mw.iter().flat_map(|(k, pods)| pods.iter().map(move |p| format!("{k}/{}", p.pod))).collect();
        failures.retain(|pod, _| live.contains(pod));
        cache.retain(|key| by_mw.contains_key(key));
        for (key, mut health) in by_mw {
            health.sort_by(|a, b| a.pod.cmp(&b.pod));
            if cache.put(key.clone(), health) {
                let (namespace, name) = key.split_once('/').unwrap_or(("", &key));
                if changed.send(ObjectRef::new(name).within(namespace)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The Middleware's pods now: readiness from the pod cache (always fresh), reports from the last poll.
pub fn current(mw: &Middleware, pods: &[Arc<Pod>], polled: Option<MiddlewareHealth>) -> MiddlewareHealth {
    let polled = polled.unwrap_or_default();
    pods_of(mw, pods)
        .into_iter()
        .map(|pod| {
            let name = pod.name_any();
            match polled.iter().find(|p| p.pod == name) {
                Some(p) => PodHealth {
                    pod: name,
                    ready: pod_ready(pod),
                    read: true,
                    report: p.report.clone(),
                    failure: pod_failure(pod),
                },
                None => PodHealth {
                    pod: name,
                    ready: pod_ready(pod),
                    read: false,
                    report: Err("not read yet".into()),
                    failure: pod_failure(pod),
                },
            }
        })
        .collect()
}

/// What the pods' reports mean for the Middleware's conditions. Pure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// `None` when every ready pod runs `desired` and is ready; else the reason and message for `Ready=False`.
    pub not_ready: Option<(&'static str, String)>,
    /// The hash every ready pod runs, when they agree.
    pub applied: Option<String>,
    /// `Some((degraded, message))` once any pod reported.
    pub degraded: Option<(bool, String)>,
    /// Components by name: worst state, and messages naming the pods.
    pub components: Vec<(String, String, Option<String>)>,
}

fn severity(state: &str) -> u8 {
    match state {
        "Up" => 0,
        "Starting" => 1,
        "Degraded" => 2,
        _ => 3,
    }
}

/// Folds the pods' reports, for the configuration `desired`.
pub fn summarize(health: &[PodHealth], desired: &str) -> Summary {
    use umw_crds::conditions::reasons;
    // Pods not read yet (just started) are judged at the next poll, not counted as failures now.
    let ready: Vec<&PodHealth> = health.iter().filter(|p| p.ready && p.read).collect();
    let mut not_ready = None;
    for pod in &ready {
        match &pod.report {
            Err(error) => {
                not_ready = Some((reasons::HEALTH_UNKNOWN, format!("pod {}: {error}", pod.pod)));
                break;
            }
            Ok(report)
                if report.config_hash != desired
                    && let Some(config) =
                        report.components.iter().find(|c| c.name == "config" && c.state == "Degraded") =>
            {
                not_ready = Some((
                    reasons::CONFIG_REJECTED,
                    format!(
                        "pod {} refused configuration {desired} and still runs {}: {}",
                        pod.pod, report.config_hash, config.message
                    ),
                ));
                break;
            }
            Ok(report) if report.config_hash != desired => {
                not_ready = Some((
                    reasons::CONFIG_PENDING,
                    format!("pod {} runs configuration {}, not {desired} yet", pod.pod, report.config_hash),
                ));
                break;
            }
            Ok(report) if !report.ready => {
                not_ready = Some((
                    reasons::COMPONENTS_DOWN,
                    format!(
                        "pod {} is not ready: {}",
                        pod.pod,
                        report.not_ready_reason.as_deref().unwrap_or("unknown reason")
                    ),
                ));
                break;
            }
            Ok(_) => {}
        }
    }
    let hashes: Vec<&str> =
        ready.iter().filter_map(|p| p.report.as_ref().ok()).map(|r| r.config_hash.as_str()).collect();
    let applied = match hashes.first() {
        Some(first) if hashes.len() == ready.len() && hashes.iter().all(|h| h == first) => Some(first.to_string()),
        _ => None,
    };

    let mut components: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for pod in health {
        let Ok(report) = &pod.report else { continue };
        for c in &report.components {
            let entry = components.entry(c.name.clone()).or_insert_with(|| ("Up".into(), Vec::new()));
            if severity(&c.state) > severity(&entry.0) {
                entry.0 = c.state.clone();
            }
            if c.state != "Up" {
                let message = if c.message.is_empty() { c.state.clone() } else { c.message.clone() };
                entry.1.push(format!("pod {}: {message}", pod.pod));
            }
        }
    }
    let reported = health.iter().any(|p| p.report.is_ok());
    let troubled: Vec<String> = components
        .iter()
        .filter(|(_, (state, _))| state != "Up")
        .map(|(name, (state, messages))| format!("{name} is {state} ({})", messages.join("; ")))
        .collect();
    let degraded = reported.then(|| (!troubled.is_empty(), troubled.join("; ")));
    Summary {
        not_ready,
        applied,
        degraded,
        components: components
            .into_iter()
            .map(|(name, (state, messages))| (name, state, (!messages.is_empty()).then(|| messages.join("; "))))
            .collect(),
    }
}

/// Whether the pods enforce a policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Enforcement {
    /// Every ready pod runs the desired configuration and enforces the policy.
    Enforced(String),
    /// A pod running the desired configuration says it does not enforce the policy (and why).
    Refused(String),
    /// Waiting for the pods: none ready, not yet on the desired configuration, or not reachable.
    Waiting(String),
}

/// Whether the pods running configuration `desired` enforce policy `kind`/`name`. Pure.
pub fn enforcement(health: &[PodHealth], desired: &str, kind: &str, name: &str) -> Enforcement {
    let ready: Vec<&PodHealth> = health.iter().filter(|p| p.ready && p.read).collect();
    if ready.is_empty() {
        return Enforcement::Waiting("no data-plane pod is ready and read yet".into());
    }
    for pod in &ready {
        let report = match &pod.report {
            Ok(report) => report,
            Err(error) => return Enforcement::Waiting(format!("pod {}: {error}", pod.pod)),
        };
        if report.config_hash != desired {
            return Enforcement::Waiting(format!("waiting for pod {} to load configuration {desired}", pod.pod));
        }
        match report.policies.iter().find(|p| p.kind == kind && p.name == name) {
            Some(p) if p.enforced => {}
            Some(p) => return Enforcement::Refused(format!("pod {}: {}", pod.pod, p.message)),
            None => return Enforcement::Refused(format!("pod {} does not know this policy", pod.pod)),
        }
    }
    Enforcement::Enforced(format!("enforced by every ready pod, on configuration {desired}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ready: bool, hash: &str, components: &[(&str, &str, &str)]) -> PodHealth {
        PodHealth {
            pod: name.into(),
            ready,
            read: true,
            report: Ok(Report {
                config_hash: hash.into(),
                ready: true,
                not_ready_reason: None,
                components: components
                    .iter()
                    .map(|(n, s, m)| Component {
                        name: (*n).into(),
                        state: (*s).into(),
                        message: (*m).into(),
                        required: false,
                    })
                    .collect(),
                policies: vec![PolicyReport {
                    kind: "CachePolicy".into(),
                    name: "c".into(),
                    enforced: true,
                    message: String::new(),
                }],
            }),
            failure: None,
        }
    }

    #[test]
    fn a_crash_looping_pod_is_named_with_its_exit_code_and_termination_message() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "umw-shop-abc"},
            "status": {"containerStatuses": [{
                "name": "dataplane", "image": "i", "imageID": "", "ready": false, "restartCount": 3,
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}},
                "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                    "message": "config.yaml: the configuration is not valid:\n  spec.connections.redis.url: not a URL"}}
            }]}
        }))
        .unwrap();
        assert_eq!(
            pod_failure(&pod).unwrap(),
            "pod umw-shop-abc: CrashLoopBackOff (3 restart(s)); last exit code 1: config.yaml: the configuration is not valid: spec.connections.redis.url: not a URL"
        );
        let image: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "status": {"containerStatuses": [{
                "name": "dataplane", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"x\""}}
            }]}
        }))
        .unwrap();
        assert_eq!(pod_failure(&image).unwrap(), "pod p: ImagePullBackOff: Back-off pulling image \"x\"");
        let starting: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "status": {"containerStatuses": [{
                "name": "dataplane", "image": "i", "imageID": "", "ready": false, "restartCount": 1,
                "state": {"waiting": {"reason": "ContainerCreating"}},
                "lastState": {"terminated": {"exitCode": 0, "reason": "Completed"}}
            }]}
        }))
        .unwrap();
        assert_eq!(pod_failure(&starting), None, "starting, or restarted after a clean exit, is not failing");
    }

    #[test]
    fn ready_needs_every_ready_pod_on_the_desired_configuration() {
        let up = [("config", "Up", "")];
        let s = summarize(&[pod("a", true, "h2", &up), pod("b", true, "h2", &up), pod("c", false, "h1", &up)], "h2");
        assert_eq!(s.not_ready, None);
        assert_eq!(s.applied.as_deref(), Some("h2"), "unready pods do not count");
        assert_eq!(s.degraded, Some((false, String::new())));

        let s = summarize(&[pod("a", true, "h2", &up), pod("b", true, "h1", &up)], "h2");
        assert_eq!(s.not_ready.unwrap().1, "pod b runs configuration h1, not h2 yet");
        assert_eq!(s.applied, None);

        let broken = PodHealth {
            pod: "x".into(),
            ready: true,
            read: true,
            report: Err("cannot read /status: connection refused".into()),
            failure: None,
        };
        let s = summarize(&[broken], "h2");
        assert_eq!(s.not_ready.unwrap().1, "pod x: cannot read /status: connection refused");
        assert_eq!(s.degraded, None, "nothing reported yet");
    }

    #[test]
    fn a_degraded_component_is_named_with_its_pod() {
        let s = summarize(
            &[
                pod("a", true, "h", &[("upstream http://u", "Degraded", "circuit breaker open")]),
                pod("b", true, "h", &[("upstream http://u", "Up", "")]),
            ],
            "h",
        );
        assert_eq!(s.not_ready, None, "degraded pods still serve");
        assert_eq!(s.degraded, Some((true, "upstream http://u is Degraded (pod a: circuit breaker open)".into())));
        assert_eq!(
            s.components,
            vec![("upstream http://u".into(), "Degraded".into(), Some("pod a: circuit breaker open".into()))]
        );
    }

    #[test]
    fn a_policy_is_enforced_when_every_ready_pod_says_so_on_the_current_configuration() {
        assert!(matches!(enforcement(&[pod("a", true, "h", &[])], "h", "CachePolicy", "c"), Enforcement::Enforced(_)));
        assert!(matches!(enforcement(&[pod("a", true, "old", &[])], "h", "CachePolicy", "c"), Enforcement::Waiting(_)));
        assert!(matches!(
            enforcement(&[pod("a", true, "h", &[])], "h", "CachePolicy", "other"),
            Enforcement::Refused(_)
        ));
        assert!(matches!(enforcement(&[], "h", "CachePolicy", "c"), Enforcement::Waiting(_)));
        let mut refusing = pod("a", true, "h", &[]);
        if let Ok(report) = &mut refusing.report {
            report.policies[0] = PolicyReport {
                kind: "CachePolicy".into(),
                name: "c".into(),
                enforced: false,
                message: "not implemented".into(),
            };
        }
        assert_eq!(
            enforcement(&[refusing], "h", "CachePolicy", "c"),
            Enforcement::Refused("pod a: not implemented".into())
        );
    }
}
