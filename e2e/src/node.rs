//! The real-node lane: the control plane of this test binary with a real kubelet joined to it
//! (`e2e/testenv/up.sh --node`): containerd and runc run the images built from the project's Dockerfiles
//! (`make images`), with kube-proxy for Services and CoreDNS for their names.
//!
//! Call [`real_node`] before anything else that starts the control plane in a test binary of this lane.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use crate::{CONTROL_PLANE, ControlPlane, repo_root};

/// The node of a control plane started by [`real_node`].
#[derive(Clone, Debug)]
pub struct Node {
    /// The node's address on its bridge: servers that pods reach listen here.
    pub ip: Ipv4Addr,
    /// The pods' addresses (a CIDR).
    pub subnet: String,
    /// containerd's socket.
    pub containerd: PathBuf,
}

/// Starts the control plane with a real node on first use; later calls return the same one.
pub fn real_node() -> &'static ControlPlane {
    let cp = CONTROL_PLANE.get_or_init(|| match crate::start_control_plane(true) {
        Ok(cp) => cp,
        Err(error) => panic!(
            "no test control plane with a real node: {error:#}\n\
             The real-node lane needs root, containerd, runc, the CNI plugins, buildah and the tools of \
             `make testenv`, and the images of `make images`: run `make testenv images` (make test does both), \
             then run the tests again."
        ),
    });
    assert!(cp.node.is_some(), "this test binary started its control plane without a node: call real_node() first");
    cp
}

impl ControlPlane {
    /// The real node; panics in a lane without one.
    pub fn node(&self) -> &Node {
        self.node.as_ref().expect("a control plane started by real_node()")
    }
}

/// The images `make images` built, by their role.
pub struct Images {
    pub operator: String,
    pub dataplane: String,
}

pub fn images() -> Images {
    let out = Command::new("bash")
        .arg(repo_root().join("e2e/testenv/images.sh"))
        .arg("--print-names")
        .output()
        .expect("running e2e/testenv/images.sh");
    let names: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    let find = |part: &str| {
        names.iter().find(|n| n.contains(part)).cloned().unwrap_or_else(|| panic!("no {part} image in {names:?}"))
    };
    Images { operator: find("umw-operator:"), dataplane: find("umw-dataplane:") }
}

impl Node {
    /// `ctr` in containerd's `k8s.io` namespace (where the kubelet's containers are).
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.containerd)
            .args(["--namespace", "k8s.io"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running ctr")
    }

    /// The host pid of a running container's main process.
    pub fn container_pid(&self, container_id: &str) -> Option<u32> {
        let out = self.ctr(&["tasks", "ls"]);
        String::from_utf8_lossy(&out.stdout).lines().find_map(|line| {
            let mut fields = line.split_whitespace();
            (fields.next()? == container_id).then(|| fields.next()?.parse().ok()).flatten()
        })
    }

    /// The ids of the containers containerd runs for pods in `namespace` (sandboxes included).
    pub fn containers_in(&self, namespace: &str) -> Vec<String> {
        let out = self.ctr(&["containers", "ls", &format!("labels.\"io.kubernetes.pod.namespace\"=={namespace}")]);
        assert!(out.status.success(), "ctr containers ls: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    }
}

/// What a process looks like from the host: its user, capabilities and security settings
/// (`/proc/PID/status`), and its root file system (`/proc/PID/root`).
pub struct Process {
    pub pid: u32,
}

impl Process {
    pub fn status_field(&self, field: &str) -> Option<String> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        status.lines().find_map(|l| l.strip_prefix(&format!("{field}:")).map(|v| v.trim().to_string()))
    }

    /// A path inside the process's root file system.
    pub fn path(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{path}", self.pid))
    }

    /// The options of the mount at `mount_point` in the process's mount namespace (`ro,nosuid,...`).
    pub fn mount_options(&self, mount_point: &str) -> Option<String> {
        let mounts = std::fs::read_to_string(format!("/proc/{}/mountinfo", self.pid)).ok()?;
        mounts.lines().rev().find_map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            (fields.get(4) == Some(&mount_point)).then(|| fields.get(5).map(|o| o.to_string())).flatten()
        })
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) the process, as a hung process would look to its probes.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([&format!("-{signal}"), &self.pid.to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal} {}", self.pid);
    }
}
