//! A process kubelet: plays the kubelet for data-plane pods on a machine without a container runtime.
//!
//! For every pod of a data-plane Deployment (label `app.kubernetes.io/name=umw-dataplane`) that the real
//! controller-manager creates, it binds the pod to its Node, starts the real `umw-dataplane` binary on a
//! loopback address of its own (127.x.y.z) with the pod's arguments, environment (values, field
//! references, Secret keys) and volumes (ConfigMaps and Secrets written to a directory and kept in sync,
//! so configuration changes reach the process as a mounted ConfigMap would), probes its readiness
//! endpoint, keeps `pods/status` (phase, `podIP`, `Ready`, container state, restarts) true to the process,
//! restarts it with backoff when it exits, and on pod deletion sends SIGTERM, waits out the grace period
//! and removes the pod.
//!
//! It serves the e2e tests (one per test namespace) and `make dev` (the `umw-kubelet` binary).

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{
    Binding, ConfigMap, Container, Node, ObjectReference, Pod, ResourceFieldSelector, Secret,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::watcher;
use kube::{Client, ResourceExt as _};
use tokio::process::Command;

/// Selects the pods this kubelet runs.
pub const POD_SELECTOR: &str = "app.kubernetes.io/name=umw-dataplane";

/// What the kubelet needs to know.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Watch one namespace, or all.
    pub namespace: Option<String>,
    /// Name of the Node the pods are bound to (created if missing).
    pub node: String,
    /// The data-plane binary run for every pod.
    pub dataplane: PathBuf,
    /// Where pod directories (volumes, logs) go.
    pub work_dir: PathBuf,
    /// Extra environment for every process (e.g. `UMW_RESOLVE`, `UMW_RELOAD_INTERVAL`).
    pub extra_env: Vec<(String, String)>,
    /// How often volumes are synced from their ConfigMaps and Secrets, and readiness is probed.
    pub sync_interval: Duration,
    /// First delay before restarting a process that exited; doubled up to 10s.
    pub restart_backoff: Duration,
}

/// A running kubelet; dropping it stops every process it started.
pub struct Kubelet {
    task: tokio::task::JoinHandle<()>,
    pods: Arc<Mutex<HashMap<String, PodHandle>>>,
}

struct PodHandle {
    task: tokio::task::JoinHandle<()>,
    stop: tokio::sync::watch::Sender<bool>,
    pid: Arc<AtomicU32>,
    ip: Ipv4Addr,
}

impl Kubelet {
    pub async fn start(client: Client, settings: Settings) -> anyhow::Result<Self> {
        register_node(&client, &settings.node).await?;
        std::fs::create_dir_all(&settings.work_dir)?;
        let pods: Arc<Mutex<HashMap<String, PodHandle>>> = Arc::default();
        let task = tokio::spawn(run(client, settings, pods.clone()));
        Ok(Self { task, pods })
    }

    /// The process id of a pod's data plane, if it runs.
    pub fn pid(&self, namespace: &str, pod: &str) -> Option<u32> {
        let pods = self.pods.lock().ok()?;
        let pid = pods.get(&format!("{namespace}/{pod}"))?.pid.load(Ordering::SeqCst);
        (pid != 0).then_some(pid)
    }

    /// The loopback address of a pod.
    pub fn ip(&self, namespace: &str, pod: &str) -> Option<Ipv4Addr> {
        self.pods.lock().ok()?.get(&format!("{namespace}/{pod}")).map(|p| p.ip)
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
        if let Ok(mut pods) = self.pods.lock() {
            for (_, pod) in pods.drain() {
                let _ = pod.stop.send(true);
                let pid = pod.pid.load(Ordering::SeqCst);
                if pid != 0 {
                    let _ = std::process::Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .stderr(Stdio::null())
                        .status();
                }
                pod.task.abort();
            }
        }
    }
}

async fn register_node(client: &Client, name: &str) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    if nodes.get_opt(name).await?.is_none() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": { "name": name, "labels": { "kubernetes.io/hostname": name } },
        }))?;
        match nodes.create(&PostParams::default(), &node).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    let now = Timestamp::now().to_string();
    let status = serde_json::json!({ "status": {
        "conditions": [{ "type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "process kubelet is posting ready status", "lastHeartbeatTime": now, "lastTransitionTime": now }],
        "addresses": [{ "type": "InternalIP", "address": "127.0.0.1" }, { "type": "Hostname", "address": name }],
        "capacity": { "cpu": "64", "memory": "256Gi", "pods": "1000" },
        "allocatable": { "cpu": "64", "memory": "256Gi", "pods": "1000" },
    }});
    nodes.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await?;
    Ok(())
}

/// Loopback addresses: 127.<a>.<b>.<c>, with <a> from the process id, so that two kubelets on one machine
/// (a test run and `make dev`) do not hand out the same address.
fn next_ip() -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let a = 1 + (std::process::id() % 200) as u8;
    Ipv4Addr::new(127, a, (n / 250) as u8, (n % 250 + 1) as u8)
}

async fn run(client: Client, settings: Settings, pods: Arc<Mutex<HashMap<String, PodHandle>>>) {
    let api: Api<Pod> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let mut events = watcher(api, watcher::Config::default().labels(POD_SELECTOR)).boxed();
    let mut terminating = std::collections::HashSet::new();
    while let Some(event) = events.next().await {
        let pod = match event {
            Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => pod,
            Ok(watcher::Event::Delete(pod)) => {
                let key = key(&pod);
                terminating.remove(&key);
                if let Ok(mut pods) = pods.lock()
                    && let Some(handle) = pods.remove(&key)
                {
                    let _ = handle.stop.send(true);
                }
                continue;
            }
            Ok(_) => continue,
            Err(error) => {
                eprintln!("[kubelet] watch error: {error}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let key = key(&pod);
        let namespace = pod.namespace().unwrap_or_default();
        let pods_api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        if pod.metadata.deletion_timestamp.is_some() {
            // Once per pod: a relist shows a terminating pod again, and must not cut its grace period short.
            if !terminating.insert(key.clone()) {
                continue;
            }
            let handle = pods.lock().ok().and_then(|mut p| p.remove(&key));
            let client = client.clone();
            tokio::spawn(terminate(client, pod, handle));
            continue;
        }
        match node {
            None => {
                if let Err(error) = bind(&pods_api, &pod, &settings.node).await {
                    eprintln!("[kubelet] binding {key}: {error}");
                }
            }
            Some(node) if node == settings.node => {
                let Ok(mut running) = pods.lock() else { continue };
                if running.contains_key(&key) {
                    continue;
                }
                let ip = next_ip();
                let (stop, stop_rx) = tokio::sync::watch::channel(false);
                let pid = Arc::new(AtomicU32::new(0));
                let task =
                    tokio::spawn(run_pod(client.clone(), settings.clone(), pod.clone(), ip, stop_rx, pid.clone()));
                running.insert(key, PodHandle { task, stop, pid, ip });
            }
            Some(_) => {}
        }
    }
}

fn key(pod: &Pod) -> String {
    format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any())
}

async fn bind(api: &Api<Pod>, pod: &Pod, node: &str) -> Result<(), kube::Error> {
    let binding = Binding {
        metadata: ObjectMeta { name: Some(pod.name_any()), ..ObjectMeta::default() },
        target: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node.into()),
            ..ObjectReference::default()
        },
    };
    match api
        .create_subresource::<Binding, serde_json::Value>("binding", &pod.name_any(), &PostParams::default(), &binding)
        .await
    {
        Ok(_) => Ok(()),
        // Already bound (a watch event raced the binding): fine.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// SIGTERM, the grace period, SIGKILL, then the pod object goes.
async fn terminate(client: Client, pod: Pod, handle: Option<PodHandle>) {
    let grace = pod.metadata.deletion_grace_period_seconds.unwrap_or(30).max(0) as u64;
    if let Some(handle) = handle {
        let _ = handle.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(grace + 5), handle.task).await;
    }
    let api: Api<Pod> = Api::namespaced(client, &pod.namespace().unwrap_or_default());
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions { uid: pod.uid(), resource_version: None }),
        ..DeleteParams::default()
    };
    let _ = api.delete(&pod.name_any(), &params).await;
}

/// The process of one pod, from start to deletion.
async fn run_pod(
    client: Client,
    settings: Settings,
    pod: Pod,
    ip: Ipv4Addr,
    mut stop: tokio::sync::watch::Receiver<bool>,
    pid_slot: Arc<AtomicU32>,
) {
    let namespace = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let dir = settings.work_dir.join(format!("{namespace}_{name}"));
    let _ = std::fs::create_dir_all(&dir);
    let Some(container) = pod.spec.as_ref().and_then(|s| s.containers.first()).cloned() else { return };
    let grace = pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds).unwrap_or(30).max(1) as u64;
    let started_at = Time(Timestamp::now());
    let mut status = PodState {
        ip,
        started_at: started_at.clone(),
        running_since: None,
        ready: false,
        restarts: 0,
        last_terminated: None,
        waiting: Some("ContainerCreating".into()),
    };
    let _ = write_status(&api, &name, &status, &container).await;

    // Volumes whose ConfigMap or Secret is missing are retried, as the kubelet does.
    let mounts = loop {
        match Volumes::prepare(&client, &pod, &container, &dir).await {
            Ok(mounts) => break mounts,
            Err(error) => {
                status.waiting = Some(format!("CreateContainerConfigError: {error}"));
                let _ = write_status(&api, &name, &status, &container).await;
                if wait_or_stop(&mut stop, settings.restart_backoff).await {
                    return;
                }
            }
        }
    };
    let mut backoff = settings.restart_backoff;
    loop {
        if *stop.borrow() {
            return;
        }
        let env = match environment(&client, &pod, &container, ip, &settings).await {
            Ok(env) => env,
            Err(error) => {
                status.waiting = Some(format!("CreateContainerConfigError: {error}"));
                let _ = write_status(&api, &name, &status, &container).await;
                if wait_or_stop(&mut stop, backoff).await {
                    return;
                }
                continue;
            }
        };
        let args: Vec<String> = container.args.clone().unwrap_or_default().iter().map(|a| mounts.rewrite(a)).collect();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("dataplane.log"));
        // As a kubelet does: an empty termination log the container may write its last words to.
        let termination_log = dir.join("termination-log");
        let _ = std::fs::write(&termination_log, "");
        let mut command = Command::new(&settings.dataplane);
        command
            .args(&args)
            .env_clear()
            .envs(env)
            .env("UMW_TERMINATION_LOG", &termination_log)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        if let Ok(log) = log {
            if let Ok(copy) = log.try_clone() {
                command.stdout(copy);
            }
            command.stderr(log);
        }
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) => {
                status.waiting = Some(format!("StartError: {error}"));
                let _ = write_status(&api, &name, &status, &container).await;
                if wait_or_stop(&mut stop, backoff).await {
                    return;
                }
                continue;
            }
        };
        pid_slot.store(child.id().unwrap_or(0), Ordering::SeqCst);
        // The control plane's reaper kills what a crashed kubelet leaves behind (controlplane.sh stop).
        let _ = std::fs::write(dir.join("dataplane.pid"), child.id().unwrap_or(0).to_string());
        let started = std::time::Instant::now();
        status.waiting = None;
        status.running_since = Some(Time(Timestamp::now()));
        status.ready = false;
        let _ = write_status(&api, &name, &status, &container).await;

        let probe = readiness_probe(&container, ip);
        let mut sync = tokio::time::interval(settings.sync_interval);
        let exit = loop {
            tokio::select! {
                exit = child.wait() => break Some(exit),
                _ = stop.changed() => break None,
                _ = sync.tick() => {
                    mounts.sync(&client, &namespace).await;
                    let ready = match &probe {
                        Some((port, path)) => http_ok(ip, *port, path).await,
                        None => true,
                    };
                    if ready != status.ready {
                        status.ready = ready;
                        // A lost write is tried again at the next tick.
                        if write_status(&api, &name, &status, &container).await.is_err() {
                            status.ready = !ready;
                        }
                    }
                }
            }
        };
        match exit {
            None => {
                // Deleted: SIGTERM, then the grace period, then SIGKILL.
                if let Some(pid) = child.id() {
                    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status().await;
                }
                if tokio::time::timeout(Duration::from_secs(grace), child.wait()).await.is_err() {
                    let _ = child.kill().await;
                }
                pid_slot.store(0, Ordering::SeqCst);
                let _ = std::fs::remove_file(dir.join("dataplane.pid"));
                return;
            }
            Some(result) => {
                pid_slot.store(0, Ordering::SeqCst);
                let _ = std::fs::remove_file(dir.join("dataplane.pid"));
                let exit_code = result.as_ref().ok().and_then(|s| s.code()).unwrap_or(137);
                let code = result.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                status.last_terminated = Some((exit_code, termination_message(&dir, &container, exit_code)));
                status.restarts += 1;
                status.ready = false;
                status.running_since = None;
                status.waiting = Some(format!("CrashLoopBackOff: the process exited ({code}); restarting"));
                let _ = write_status(&api, &name, &status, &container).await;
                if wait_or_stop(&mut stop, backoff).await {
                    return;
                }
                // A process that ran a while before exiting starts the backoff afresh.
                backoff = if started.elapsed() > Duration::from_secs(10) {
                    settings.restart_backoff
                } else {
                    (backoff * 2).min(Duration::from_secs(10).max(settings.restart_backoff))
                };
            }
        }
    }
}

/// Sleeps `delay`; true when told to stop meanwhile.
async fn wait_or_stop(stop: &mut tokio::sync::watch::Receiver<bool>, delay: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

struct PodState {
    ip: Ipv4Addr,
    started_at: Time,
    running_since: Option<Time>,
    ready: bool,
    restarts: i32,
    waiting: Option<String>,
    /// Exit code and termination message of the last run that ended.
    last_terminated: Option<(i32, String)>,
}

/// What a kubelet reports as the termination message: the termination log, or with
/// `FallbackToLogsOnError` and a failed exit, the last lines of the log (at most 80 lines, 2 KiB).
fn termination_message(dir: &std::path::Path, container: &Container, exit_code: i32) -> String {
    let written = std::fs::read_to_string(dir.join("termination-log")).unwrap_or_default();
    if !written.is_empty() || exit_code == 0 {
        return written.chars().take(4096).collect();
    }
    if container.termination_message_policy.as_deref() != Some("FallbackToLogsOnError") {
        return String::new();
    }
    let log = std::fs::read_to_string(dir.join("dataplane.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let tail = lines[lines.len().saturating_sub(80)..].join("\n");
    let start = tail.len().saturating_sub(2048);
    let start = (start..tail.len()).find(|i| tail.is_char_boundary(*i)).unwrap_or(tail.len());
    tail[start..].to_string()
}

async fn write_status(api: &Api<Pod>, name: &str, state: &PodState, container: &Container) -> Result<(), kube::Error> {
    let now = Timestamp::now().to_string();
    let ready = if state.ready { "True" } else { "False" };
    let container_state = match (&state.running_since, &state.waiting) {
        (Some(since), _) => serde_json::json!({ "running": { "startedAt": since } }),
        (None, Some(reason)) => {
            let (reason, message) = reason.split_once(": ").unwrap_or((reason.as_str(), ""));
            serde_json::json!({ "waiting": { "reason": reason, "message": message } })
        }
        (None, None) => serde_json::json!({ "waiting": { "reason": "ContainerCreating" } }),
    };
    let ip = state.ip.to_string();
    let patch = serde_json::json!({ "status": {
        "phase": "Running",
        "hostIP": "127.0.0.1",
        "hostIPs": [{ "ip": "127.0.0.1" }],
        "podIP": ip,
        "podIPs": [{ "ip": ip }],
        "startTime": state.started_at,
        "conditions": [
            { "type": "PodScheduled", "status": "True", "lastTransitionTime": now },
            { "type": "Initialized", "status": "True", "lastTransitionTime": now },
            { "type": "ContainersReady", "status": ready, "lastTransitionTime": now },
            { "type": "Ready", "status": ready, "lastTransitionTime": now },
        ],
        "containerStatuses": [{
            "name": container.name,
            "image": container.image.clone().unwrap_or_default(),
            "imageID": "",
            "ready": state.ready,
            "started": state.running_since.is_some(),
            "restartCount": state.restarts,
            "state": container_state,
            "lastState": match &state.last_terminated {
                Some((code, message)) => serde_json::json!({ "terminated": {
                    "exitCode": code,
                    "reason": if *code == 0 { "Completed" } else { "Error" },
                    "message": message,
                    "finishedAt": now,
                }}),
                None => serde_json::json!({}),
            },
        }],
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Strategic(&patch)).await.map(|_| ())
}

/// The container's readiness probe, as (port, path) on the pod's address.
fn readiness_probe(container: &Container, _ip: Ipv4Addr) -> Option<(u16, String)> {
    let get = container.readiness_probe.as_ref()?.http_get.as_ref()?;
    let port = match &get.port {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port) => u16::try_from(*port).ok()?,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())?,
    };
    Some((port, get.path.clone().unwrap_or_else(|| "/".into())))
}

async fn http_ok(ip: Ipv4Addr, port: u16, path: &str) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect((ip, port)).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.ok()?;
        Some(head.starts_with(b"HTTP/1.1 2"))
    };
    tokio::time::timeout(Duration::from_secs(2), attempt).await.ok().flatten().unwrap_or(false)
}

/// The process environment: the container's env with field references and Secret keys resolved, plus
/// the pod's listener addresses on its own loopback IP and the kubelet's extras.
async fn environment(
    client: &Client,
    pod: &Pod,
    container: &Container,
    ip: Ipv4Addr,
    settings: &Settings,
) -> anyhow::Result<Vec<(String, String)>> {
    let namespace = pod.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let mut env: Vec<(String, String)> = Vec::new();
    if let Ok(path) = std::env::var("PATH") {
        env.push(("PATH".into(), path));
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(value), _) => value.clone(),
            (None, Some(from)) => {
                if let Some(field) = &from.field_ref {
                    match field.field_path.as_str() {
                        "metadata.name" => pod.name_any(),
                        "metadata.namespace" => namespace.clone(),
                        "status.podIP" => ip.to_string(),
                        other => anyhow::bail!("field reference {other} is not supported by the process kubelet"),
                    }
                } else if let Some(field) = &from.resource_field_ref {
                    cpu_field(pod, container, field)?
                } else if let Some(key) = &from.secret_key_ref {
                    let secret = secrets.get(&key.name).await?;
                    secret_value(&secret, &key.key)
                        .ok_or_else(|| anyhow::anyhow!("Secret {} has no key {}", key.name, key.key))?
                } else {
                    anyhow::bail!("env {} uses a source the process kubelet does not support", var.name)
                }
            }
            (None, None) => String::new(),
        };
        env.push((var.name.clone(), value));
    }
    for port in container.ports.iter().flatten() {
        match port.name.as_deref() {
            Some("http") => env.push(("UMW_HTTP_ADDRESS".into(), format!("{ip}:{}", port.container_port))),
            Some("admin") => env.push(("UMW_ADMIN_ADDRESS".into(), format!("{ip}:{}", port.container_port))),
            _ => {}
        }
    }
    env.extend(settings.extra_env.iter().cloned());
    Ok(env)
}

/// A CPU resource field as the kubelet exposes it: the container's limit (or request) divided by the
/// divisor and rounded up; without a limit, the node's CPUs.
fn cpu_field(pod: &Pod, container: &Container, field: &ResourceFieldSelector) -> anyhow::Result<String> {
    let target = match field.container_name.as_deref() {
        Some(name) if name != container.name => pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.iter().find(|c| c.name == name))
            .ok_or_else(|| anyhow::anyhow!("resource field names container {name}, which the pod lacks"))?,
        _ => container,
    };
    let resources = target.resources.as_ref();
    let quantity = match field.resource.as_str() {
        "limits.cpu" => resources.and_then(|r| r.limits.as_ref()).and_then(|l| l.get("cpu")),
        "requests.cpu" => resources.and_then(|r| r.requests.as_ref()).and_then(|l| l.get("cpu")),
        other => anyhow::bail!("resource field {other} is not supported by the process kubelet"),
    };
    let millis = match quantity {
        Some(q) => cpu_millis(&q.0)?,
        None => std::thread::available_parallelism().map_or(1, |n| n.get() as u64) * 1000,
    };
    let divisor = field.divisor.as_ref().map_or(Ok(1000), |d| cpu_millis(&d.0))?.max(1);
    Ok(millis.div_ceil(divisor).max(1).to_string())
}

/// `2`, `1.5` or `500m` as thousandths of a core.
fn cpu_millis(quantity: &str) -> anyhow::Result<u64> {
    let invalid = || anyhow::anyhow!("CPU quantity {quantity:?} is not understood by the process kubelet");
    if let Some(millis) = quantity.strip_suffix('m') {
        return millis.parse().map_err(|_| invalid());
    }
    let cores: f64 = quantity.parse().map_err(|_| invalid())?;
    if !(cores.is_finite() && cores >= 0.0) {
        return Err(invalid());
    }
    Ok((cores * 1000.0).ceil() as u64)
}

fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    if let Some(value) = secret.data.as_ref().and_then(|d| d.get(key)) {
        return Some(String::from_utf8_lossy(&value.0).to_string());
    }
    secret.string_data.as_ref().and_then(|d| d.get(key)).cloned()
}

/// The pod's volumes as directories, and their mount paths.
struct Volumes {
    /// mount path → (local directory, source)
    mounts: Vec<(String, PathBuf, Source)>,
}

#[derive(Clone)]
enum Source {
    ConfigMap(String),
    Secret(String),
}

impl Volumes {
    async fn prepare(client: &Client, pod: &Pod, container: &Container, dir: &Path) -> anyhow::Result<Self> {
        let volumes: BTreeMap<String, Source> = pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|v| {
                if let Some(cm) = v.config_map {
                    Some((v.name, Source::ConfigMap(cm.name)))
                } else {
                    v.secret.and_then(|s| s.secret_name).map(|s| (v.name, Source::Secret(s)))
                }
            })
            .collect();
        let mut mounts = Vec::new();
        for mount in container.volume_mounts.iter().flatten() {
            let Some(source) = volumes.get(&mount.name) else { continue };
            let local = dir.join("volumes").join(&mount.name);
            std::fs::create_dir_all(&local)?;
            mounts.push((mount.mount_path.clone(), local, source.clone()));
        }
        // Longest mount paths first, so that /etc/umw/secrets/x is rewritten before /etc/umw.
        mounts.sort_by_key(|m| std::cmp::Reverse(m.0.len()));
        let volumes = Self { mounts };
        let namespace = pod.namespace().unwrap_or_default();
        volumes.write_all(client, &namespace, true).await?;
        Ok(volumes)
    }

    fn rewrite(&self, arg: &str) -> String {
        for (path, local, _) in &self.mounts {
            if let Some(rest) = arg.strip_prefix(path.as_str())
                && (rest.is_empty() || rest.starts_with('/'))
            {
                return format!("{}{rest}", local.display());
            }
        }
        arg.to_string()
    }

    async fn sync(&self, client: &Client, namespace: &str) {
        if let Err(error) = self.write_all(client, namespace, false).await {
            eprintln!("[kubelet] syncing volumes in {namespace}: {error}");
        }
    }

    async fn write_all(&self, client: &Client, namespace: &str, required: bool) -> anyhow::Result<()> {
        for (_, local, source) in &self.mounts {
            let files: BTreeMap<String, Vec<u8>> = match source {
                Source::ConfigMap(name) => {
                    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
                    match api.get_opt(name).await? {
                        Some(cm) => cm.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.into_bytes())).collect(),
                        None if required => anyhow::bail!("ConfigMap {name} does not exist"),
                        None => continue,
                    }
                }
                Source::Secret(name) => {
                    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
                    match api.get_opt(name).await? {
                        Some(secret) => secret.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect(),
                        None if required => anyhow::bail!("Secret {name} does not exist"),
                        None => continue,
                    }
                }
            };
            for (file, content) in files {
                let path = local.join(&file);
                if std::fs::read(&path).ok().as_deref() == Some(content.as_slice()) {
                    continue;
                }
                // Write and rename, so that a reader never sees half a file.
                let tmp = local.join(format!(".{file}.tmp"));
                std::fs::write(&tmp, &content)?;
                std::fs::rename(&tmp, &path)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ResourceRequirements;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn container(limit: Option<&str>) -> Container {
        Container {
            name: "dataplane".into(),
            resources: limit.map(|l| ResourceRequirements {
                limits: Some([("cpu".to_string(), Quantity(l.into()))].into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn field(divisor: &str) -> ResourceFieldSelector {
        ResourceFieldSelector {
            container_name: Some("dataplane".into()),
            resource: "limits.cpu".into(),
            divisor: Some(Quantity(divisor.into())),
        }
    }

    #[test]
    fn a_cpu_limit_is_rounded_up_to_whole_divisors() {
        let pod = Pod::default();
        assert_eq!(cpu_field(&pod, &container(Some("500m")), &field("1")).unwrap(), "1");
        assert_eq!(cpu_field(&pod, &container(Some("2500m")), &field("1")).unwrap(), "3");
        assert_eq!(cpu_field(&pod, &container(Some("2")), &field("1")).unwrap(), "2");
        assert_eq!(cpu_field(&pod, &container(Some("1.5")), &field("1m")).unwrap(), "1500");
        let cores = std::thread::available_parallelism().unwrap().get().to_string();
        assert_eq!(cpu_field(&pod, &container(None), &field("1")).unwrap(), cores);
        assert!(cpu_field(&pod, &container(Some("lots")), &field("1")).is_err());
    }
}
