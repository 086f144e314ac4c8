//! A real one-node Kubernetes cluster (v1.37.2, or v1.34.4 for the compatibility subset), started on request: its own etcd, a
//! kube-apiserver with ServiceAccount admission and token signing, kube-controller-manager
//! with its default controllers (ReplicaSet, Deployment, EndpointSlice, the ServiceAccount
//! token controller), kube-scheduler, and one node: containerd 1.6 + runc + kubelet with
//! Debian's bridge CNI. Pods really run (busybox, pause and images imported from
//! docker-archive tarballs; nothing is pulled).
//!
//! The whole cluster runs inside private mount and network namespaces of its own
//! (scripts/node/nsinit.sh). Mounts: the host's /run, /var/lib, /var/log and the sysctls
//! kubelet rewrites are never touched. Network: the namespace has lo and the node's address
//! (`NODE_ADDRESS`) and no way out, so pod IPs are real and reachable inside it (kubelet's
//! httpGet probes, pods talking to pods, a consumer run with `in_node`) while no packet from
//! it can leave the machine and the host's network stays as it is. Never dial a pod or node
//! address from the host (it would leave through the default route): the test reaches the
//! API server through a port on the host's 127.0.0.1 (`netns::out_of`), `reach` does the
//! same for any address inside, and `expose` lets pods reach something the test runs on the
//! host (a registry etcd).
//!
//! All state is in a temp dir of the cluster and every port inside is the namespace's own,
//! so clusters run side by side. Dropping the cluster (also on panic) stops kubelet, kills
//! every container and shim explicitly (they are not our children), stops containerd and
//! the control plane, lets the namespaces go and removes the cgroups runc made
//! (`/k8s.io/<container id>` in every hierarchy: with `cgroupsPerQOS: false` kubelet names
//! no cgroup parent, so containerd's default is used); a test process killed outright runs
//! no destructor, and the next cluster's start sweeps what it left. `Leftovers` proves
//! nothing stayed on the host.
//!
//! Binaries come from `scripts/testbed.sh` (testbed.env), like the fast bed's.

pub mod netns;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::api::Api;
use kube::Client;

use super::{client_from, kill_child, kubeconfig_yaml, run, spawn_owned, testbed_path, Binaries, ADMIN_TOKEN};
use netns::{Forward, NetNs};

/// The one node's name.
pub const NODE_NAME: &str = "podlease-node";
/// The node's address, inside the cluster's network namespace only (the same in every
/// cluster: each has its own namespace).
pub const NODE_ADDRESS: &str = "10.77.0.1";
const NODE_CIDR: &str = "10.77.0.1/24";
/// Pod addresses (the bridge CNI's subnet, inside the namespace).
pub const POD_SUBNET: &str = "10.88.0.0/16";
/// The API server's port inside the namespace, on every address there (pods use
/// `NODE_ADDRESS:APISERVER_PORT`).
pub const APISERVER_PORT: u16 = 6443;
const STORAGE_PORTS: (u16, u16) = (2379, 2380);
const KUBELET_PORT: u16 = 10250;
const KUBELET_HEALTHZ_PORT: u16 = 10248;
const SCHEDULER_PORT: u16 = 10259;
const CONTROLLER_MANAGER_PORT: u16 = 10257;
const STREAM_SERVER_PORT: u16 = 10010;
/// The images every node has (imported at start; pods use `imagePullPolicy: Never`).
pub const PAUSE_IMAGE: &str = "local/pause:3.2";
pub const BUSYBOX_IMAGE: &str = "local/busybox:1";
/// containerd's namespace for Kubernetes (CRI).
const CRI_NAMESPACE: &str = "k8s.io";
/// Every cluster's temp dir starts with this (how `Leftovers::any` recognises them).
const DIR_PREFIX: &str = "plnode-";
/// The sysctls kubelet would rewrite on the host if it ran outside the mount namespace.
const GUARDED_SYSCTLS: &[&str] = &["vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops", "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes"];
/// Host paths containerd, kubelet and the CNI plugins hard-code; the mount namespace keeps
/// them off the host.
const GUARDED_PATHS: &[&str] = &["/run/containerd", "/var/lib/kubelet", "/var/lib/containerd", "/var/lib/cni", "/var/log/pods", "/var/log/containers"];

/// Paths of the node's binaries and images (testbed.env, written by scripts/testbed.sh).
#[derive(Debug, Clone)]
pub struct NodeBinaries {
    pub kubelet: PathBuf,
    pub kube_scheduler: PathBuf,
    /// Directory with containerd, ctr and containerd-shim-runc-v2.
    pub containerd_dir: PathBuf,
    pub runc: PathBuf,
    /// Debian's containernetworking-plugins (bridge, host-local, loopback).
    pub cni_bin_dir: PathBuf,
    pub pause_image: PathBuf,
    pub busybox_image: PathBuf,
}

impl NodeBinaries {
    pub fn locate() -> &'static NodeBinaries {
        static BINS: OnceLock<NodeBinaries> = OnceLock::new();
        BINS.get_or_init(|| NodeBinaries {
            kubelet: super::kube_binary("kubelet"),
            kube_scheduler: super::kube_binary("kube-scheduler"),
            containerd_dir: testbed_path("PODLEASE_CONTAINERD_DIR"),
            runc: testbed_path("PODLEASE_RUNC_BIN"),
            cni_bin_dir: testbed_path("PODLEASE_CNI_BIN_DIR"),
            pause_image: testbed_path("PODLEASE_PAUSE_IMAGE"),
            busybox_image: testbed_path("PODLEASE_BUSYBOX_IMAGE"),
        })
    }
}

fn node_scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/node")
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().unwrap()
}

/// How long the start took, step by step (for reports).
#[derive(Debug, Clone, Default)]
pub struct StartTimes {
    pub apiserver_ready: Duration,
    pub containerd_ready: Duration,
    pub node_ready: Duration,
}

/// A running mini-cluster. Everything stops when it is dropped (see the module docs).
pub struct MiniCluster {
    /// The admin's client and kubeconfig (through a port on the host's 127.0.0.1).
    pub kube: Client,
    pub kubeconfig: PathBuf,
    pub started: StartTimes,
    /// A directory every pod may mount as a hostPath (readiness files of exec probes).
    pub probe_dir: PathBuf,
    procs: Procs,
    forwards: Vec<Forward>,
    traces: Traces,
    dir: Option<tempfile::TempDir>,
}

/// The cluster's processes, all inside its namespaces. containerd's shims and the containers
/// are not among them: they are daemons of containerd, found and killed at teardown.
struct Procs {
    /// `sleep infinity` holding the namespaces open.
    holder: Option<Child>,
    storage: Option<Child>,
    apiserver: Option<Child>,
    controller_manager: Option<Child>,
    scheduler: Option<Child>,
    containerd: Option<Child>,
    kubelet: Option<Child>,
}

/// What a cluster may have left on the host, to look for after teardown.
#[derive(Debug, Clone)]
pub struct Traces {
    /// The cluster's temp dir (every state path, socket and process argument is under it).
    pub dir: PathBuf,
    /// Inodes of the private mount and network namespaces (no process may stay in them).
    pub mount_ns: Option<u64>,
    pub net_ns: Option<u64>,
    /// Every container containerd ran (its cgroup is `/k8s.io/<id>` in every hierarchy).
    pub container_ids: BTreeSet<String>,
    /// What the host looked like before the cluster started.
    pub before: HostState,
}

impl MiniCluster {
    /// Starts the whole cluster and waits until the node is Ready and schedulable.
    pub async fn start() -> MiniCluster {
        let t0 = Instant::now();
        sweep_stale_clusters();
        let before = HostState::capture();
        let dir = cluster_dir();
        let root = dir.path().to_path_buf();
        std::fs::write(root.join(OWNER_FILE), owner_stamp(std::process::id()).expect("own stamp")).unwrap();
        let traces = Traces { dir: root.clone(), mount_ns: None, net_ns: None, container_ids: BTreeSet::new(), before };
        let probe_dir = root.join("probe");
        std::fs::create_dir_all(&probe_dir).unwrap();
        let mut c = MiniCluster {
            kube: Client::try_from(kube::Config::new("https://127.0.0.1:1".parse().unwrap())).unwrap(),
            kubeconfig: root.join("kubeconfig"),
            started: StartTimes::default(),
            probe_dir,
            procs: Procs { holder: None, storage: None, apiserver: None, controller_manager: None, scheduler: None, containerd: None, kubelet: None },
            forwards: Vec::new(),
            traces,
            dir: Some(dir),
        };
        c.start_namespaces();
        c.start_control_plane().await;
        c.started.apiserver_ready = t0.elapsed();
        c.write_node_config();
        c.start_containerd();
        let nbins = NodeBinaries::locate();
        c.import_image(&nbins.pause_image);
        c.import_image(&nbins.busybox_image);
        c.started.containerd_ready = t0.elapsed();
        c.start_kubelet();
        c.wait_node_ready().await;
        c.started.node_ready = t0.elapsed();
        c
    }

    fn root(&self) -> &Path {
        &self.traces.dir
    }

    /// The cluster's temp dir (logs: kube-apiserver.log, containerd.log, kubelet.log, ...).
    pub fn dir(&self) -> &Path {
        self.root()
    }

    fn sock(&self) -> PathBuf {
        self.root().join("containerd.sock")
    }

    /// The kubeconfig the cluster's own components use (the API server inside the namespace).
    fn node_kubeconfig(&self) -> PathBuf {
        self.root().join("node-kubeconfig")
    }

    fn holder_pid(&self) -> u32 {
        self.procs.holder.as_ref().map(|c| c.id()).expect("the cluster's namespaces")
    }

    /// The cluster's network namespace.
    pub fn netns(&self) -> NetNs {
        NetNs::of(self.holder_pid())
    }

    fn start_namespaces(&mut self) {
        let ns_dir = self.root().join("ns");
        let mut cmd = Command::new("unshare");
        cmd.args(["-m", "-n", "--propagation", "private"]).arg(node_scripts().join("nsinit.sh")).arg(&ns_dir).arg(NODE_CIDR).args(["sleep", "infinity"]);
        let mut child = spawn_owned(&mut cmd, &self.root().join("ns.log"));
        let pid = child.id();
        // nsinit.sh execs `sleep` once its mounts and interfaces are in place (same PID).
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("namespace setup failed ({status}): {}", std::fs::read_to_string(self.root().join("ns.log")).unwrap_or_default());
            }
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmdline.starts_with(b"sleep\0") {
                break;
            }
            assert!(start.elapsed() < super::DEADLINE, "the namespace holder did not come up");
            std::thread::sleep(Duration::from_millis(10));
        }
        let (mnt, net) = (ns_inode(pid, "mnt"), ns_inode(pid, "net"));
        let me = std::process::id();
        assert!(mnt.is_some() && mnt != ns_inode(me, "mnt"), "the holder shares the host's mount namespace");
        assert!(net.is_some() && net != ns_inode(me, "net"), "the holder shares the host's network namespace");
        self.traces.mount_ns = mnt;
        self.traces.net_ns = net;
        self.procs.holder = Some(child);
        self.assert_sealed();
    }

    /// The network namespace has no way off this machine: no default route, no route to
    /// anything but its own subnets, no interface but its own (lo, the node's veth pair, the
    /// pods' bridge and their veths, whose other ends are in pod namespaces).
    pub fn assert_sealed(&self) {
        let ip = |args: &[&str]| {
            let out = self.in_node("ip").args(args).output().expect("ip in the node's namespace");
            assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).to_string()
        };
        let routes = ip(&["-4", "route", "show", "table", "all"]);
        for r in routes.lines().filter(|l| !l.trim().is_empty()) {
            let local = r.starts_with("local ") || r.starts_with("broadcast ") || r.contains(" proto kernel ");
            assert!(local && !r.starts_with("default"), "a route that could lead off the machine in the node's namespace: {r}\n{routes}");
        }
        let links = ip(&["-o", "link", "show"]);
        for l in links.lines() {
            let name = l.split(':').nth(1).unwrap_or("").trim().split('@').next().unwrap_or("");
            assert!(["lo", "node0", "node1", "cni0"].contains(&name) || name.starts_with("veth"), "an interface the node's namespace should not have: {l}");
        }
    }

    /// A command run inside the cluster's mount and network namespaces: where everything of
    /// the cluster runs, and where pod and node addresses may be dialled.
    pub fn in_node(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t").arg(self.holder_pid().to_string()).args(["-m", "-n", "--"]).arg(program);
        cmd
    }

    /// Waits until something listens at `addr` inside the namespace.
    fn wait_listening(&mut self, what: &str, addr: SocketAddr, log: &str) {
        let ns = self.netns();
        let start = Instant::now();
        while ns.connect(addr, Duration::from_secs(1)).is_err() {
            assert!(start.elapsed() < super::DEADLINE, "{what} did not listen on {addr}; log:\n{}", self.log_tail(log, 30));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    async fn start_control_plane(&mut self) {
        let root = self.root().to_path_buf();
        let bins = Binaries::locate();
        let nbins = NodeBinaries::locate();
        let (client_port, peer_port) = STORAGE_PORTS;
        let mut cmd = self.in_node(&bins.etcd);
        cmd.arg("--name=storage")
            .arg(format!("--data-dir={}", root.join("etcd-storage").display()))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client_port}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client_port}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"))
            .arg(format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"))
            .arg(format!("--initial-cluster=storage=http://127.0.0.1:{peer_port}"))
            .arg("--log-level=warn");
        self.procs.storage = Some(spawn_owned(&mut cmd, &root.join("etcd-storage.log")));
        self.wait_listening("etcd", addr("127.0.0.1", client_port), "etcd-storage.log");

        let sa_key = root.join("sa.key");
        let sa_pub = root.join("sa.pub");
        run(Command::new("openssl").args(["genrsa", "-out"]).arg(&sa_key).arg("2048"));
        run(Command::new("openssl").args(["rsa", "-in"]).arg(&sa_key).args(["-pubout", "-out"]).arg(&sa_pub));
        let tokens = root.join("tokens.csv");
        std::fs::write(&tokens, format!("{ADMIN_TOKEN},admin,admin,system:masters\n")).unwrap();
        let mut cmd = self.in_node(&bins.kube_apiserver);
        cmd.arg(format!("--etcd-servers=http://127.0.0.1:{client_port}"))
            .arg("--bind-address=0.0.0.0")
            // Pods find the API server here (the `kubernetes` Endpoints); the self-signed
            // certificate names it.
            .arg(format!("--advertise-address={NODE_ADDRESS}"))
            .arg(format!("--secure-port={APISERVER_PORT}"))
            .arg(format!("--cert-dir={}", root.join("certs").display()))
            .arg(format!("--token-auth-file={}", tokens.display()))
            .arg("--authorization-mode=Node,RBAC")
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!("--service-account-key-file={}", sa_pub.display()))
            .arg(format!("--service-account-signing-key-file={}", sa_key.display()))
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            // kubectl logs/exec: the API server dials the kubelet at the node's address,
            // which is only ever inside the namespace.
            .arg("--kubelet-preferred-address-types=InternalIP")
            .arg("--v=1");
        self.procs.apiserver = Some(spawn_owned(&mut cmd, &root.join("kube-apiserver.log")));
        std::fs::write(self.node_kubeconfig(), kubeconfig_yaml(APISERVER_PORT, ADMIN_TOKEN)).unwrap();
        let forward = netns::out_of(&self.netns(), addr("127.0.0.1", APISERVER_PORT));
        std::fs::write(&self.kubeconfig, kubeconfig_yaml(forward.addr.port(), ADMIN_TOKEN)).unwrap();
        self.forwards.push(forward);
        self.kube = super::wait_apiserver_ready(&self.kubeconfig, &root).await;

        let kubeconfig = self.node_kubeconfig();
        let mut cmd = self.in_node(&bins.kube_controller_manager);
        cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg("--controllers=*")
            .arg("--leader-elect=false")
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={CONTROLLER_MANAGER_PORT}"))
            .arg(format!("--cert-dir={}", root.join("kcm-certs").display()))
            .arg(format!("--service-account-private-key-file={}", sa_key.display()))
            // The root CA publisher puts this CA into every namespace's kube-root-ca.crt.
            .arg(format!("--root-ca-file={}", root.join("certs/apiserver.crt").display()))
            .arg(format!("--flex-volume-plugin-dir={}", root.join("kcm-flex").display()))
            .arg("--v=1");
        self.procs.controller_manager = Some(spawn_owned(&mut cmd, &root.join("kube-controller-manager.log")));
        let mut cmd = self.in_node(&nbins.kube_scheduler);
        cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg("--leader-elect=false")
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--secure-port={SCHEDULER_PORT}"))
            .arg(format!("--cert-dir={}", root.join("scheduler-certs").display()))
            .arg("--v=1");
        self.procs.scheduler = Some(spawn_owned(&mut cmd, &root.join("kube-scheduler.log")));
    }

    /// Lets pods reach `target`, a port on the host's 127.0.0.1 (e.g. a registry etcd the
    /// test started), at the returned address inside the namespace (`NODE_ADDRESS`, same port).
    pub fn expose(&mut self, target: SocketAddr) -> SocketAddr {
        let f = netns::into(&self.netns(), addr(NODE_ADDRESS, target.port()), target);
        let at = f.addr;
        self.forwards.push(f);
        at
    }

    /// A port on the host's 127.0.0.1 that reaches `target` inside the namespace (a pod's
    /// metrics, a hostNetwork server): the connection is made from inside.
    pub fn reach(&mut self, target: SocketAddr) -> SocketAddr {
        let f = netns::out_of(&self.netns(), target);
        let at = f.addr;
        self.forwards.push(f);
        at
    }

    fn write_node_config(&self) {
        let root = self.root();
        let nbins = NodeBinaries::locate();
        for d in ["containerd/root", "containerd/state", "containerd/opt", "cni/net.d", "cni/ipam", "kubelet/pki", "kubelet/volume-plugins"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let containerd = format!(
            r#"version = 2
root = "{root}/containerd/root"
state = "{root}/containerd/state"
oom_score = 0
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  level = "info"
[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{root}/containerd/opt"
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "{PAUSE_IMAGE}"
    # No CAP_SYS_RESOURCE here: without it every sandbox fails ("can't get final child's PID").
    restrict_oom_score_adj = true
    disable_hugetlb_controller = true
    tolerate_missing_hugetlb_controller = true
    netns_mounts_under_state_dir = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "{STREAM_SERVER_PORT}"
    disable_apparmor = true
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          BinaryName = "{runc}"
          SystemdCgroup = false
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{cni_bin}"
      conf_dir = "{root}/cni/net.d"
"#,
            root = root.display(),
            sock = self.sock().display(),
            runc = nbins.runc.display(),
            cni_bin = nbins.cni_bin_dir.display(),
        );
        std::fs::write(root.join("containerd.toml"), containerd).unwrap();
        // A bridge in the namespace; pods route everything to it, and the namespace routes
        // nothing further (no masquerade, no way out). Written before containerd starts, so
        // the network is ready from its first sync.
        std::fs::write(
            root.join("cni/net.d/10-pods.conflist"),
            format!(
                r#"{{"cniVersion": "0.4.0", "name": "pods", "plugins": [{{"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "ipam": {{"type": "host-local", "subnet": "{POD_SUBNET}", "dataDir": "{}", "routes": [{{"dst": "0.0.0.0/0"}}]}}}}]}}"#,
                root.join("cni/ipam").display()
            ),
        )
        .unwrap();
        let kubelet = format!(
            "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# On every address of the namespace: the API server dials the node's (logs, exec).
address: 0.0.0.0
port: {KUBELET_PORT}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {KUBELET_HEALTHZ_PORT}
authentication:
  anonymous: {{enabled: true}}
  webhook: {{enabled: false}}
authorization:
  mode: AlwaysAllow
containerRuntimeEndpoint: unix://{sock}
imageServiceEndpoint: unix://{sock}
volumePluginDir: {root}/kubelet/volume-plugins
# The hybrid cgroup layout here: cgroupfs, no QoS hierarchy, no allocatable enforcement.
# kubelet 1.35+ refuses cgroup v1 unless told otherwise, and this machine's hierarchy is v1.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
evictionHard: {{}}
failSwapOn: false
makeIPTablesUtilChains: false
registerNode: true
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
syncFrequency: 10s
fileCheckFrequency: 10s
nodeStatusUpdateFrequency: 10s
# Images are imported, never pulled: never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
",
            sock = self.sock().display(),
            root = root.display(),
        );
        std::fs::write(root.join("kubelet.yaml"), kubelet).unwrap();
    }

    fn start_containerd(&mut self) {
        let nbins = NodeBinaries::locate();
        let path = format!("{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", nbins.containerd_dir.display());
        let mut cmd = self.in_node("/usr/bin/env");
        cmd.arg(format!("PATH={path}")).arg(nbins.containerd_dir.join("containerd")).arg("--config").arg(self.root().join("containerd.toml"));
        self.procs.containerd = Some(spawn_owned(&mut cmd, &self.root().join("containerd.log")));
        let start = Instant::now();
        loop {
            if let Some(status) = self.procs.containerd.as_mut().unwrap().try_wait().unwrap() {
                panic!("containerd exited ({status}); log:\n{}", self.log_tail("containerd.log", 30));
            }
            if self.sock().exists() && self.ctr(&["version"]).status.success() {
                return;
            }
            assert!(start.elapsed() < super::DEADLINE, "containerd did not serve; log:\n{}", self.log_tail("containerd.log", 30));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn start_kubelet(&mut self) {
        let root = self.root().to_path_buf();
        let nbins = NodeBinaries::locate();
        let mut cmd = self.in_node(&nbins.kubelet);
        cmd.arg(format!("--config={}", root.join("kubelet.yaml").display()))
            .arg(format!("--kubeconfig={}", self.node_kubeconfig().display()))
            .arg(format!("--root-dir={}", root.join("kubelet").display()))
            .arg(format!("--cert-dir={}", root.join("kubelet/pki").display()))
            .arg(format!("--hostname-override={NODE_NAME}"))
            // kubelet refuses a loopback node IP; this one exists in the namespace only.
            .arg(format!("--node-ip={NODE_ADDRESS}"))
            .arg("--v=1");
        self.procs.kubelet = Some(spawn_owned(&mut cmd, &root.join("kubelet.log")));
    }

    /// Runs `ctr -n k8s.io ARGS` inside the node's mount namespace (ctr makes its fifos under
    /// /run/containerd, which is the namespace's own).
    pub fn ctr(&self, args: &[&str]) -> Output {
        let nbins = NodeBinaries::locate();
        let mut cmd = self.in_node(nbins.containerd_dir.join("ctr"));
        cmd.arg("-a").arg(self.sock()).args(["-n", CRI_NAMESPACE]).args(args);
        cmd.output().expect("run ctr")
    }

    /// Imports a docker-archive image tarball into the node's containerd (pods then use it with
    /// `imagePullPolicy: Never`).
    pub fn import_image(&self, tarball: &Path) {
        let path = tarball.to_str().expect("UTF-8 image path");
        let out = self.ctr(&["images", "import", "--no-unpack", path]);
        assert!(out.status.success(), "ctr images import {path}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The image references containerd has.
    pub fn images(&self) -> Vec<String> {
        let out = self.ctr(&["images", "ls", "-q"]);
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
    }

    /// The containers containerd runs for pods (pause sandboxes included).
    pub fn containers(&self) -> Vec<String> {
        let out = self.ctr(&["containers", "ls", "-q"]);
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.is_empty()).map(str::to_string).collect()
    }

    /// Waits until the node is Ready and carries no taint (kube-controller-manager lifts the
    /// not-ready taint once the kubelet reports Ready).
    pub async fn wait_node_ready(&mut self) {
        let nodes: Api<Node> = Api::all(self.kube.clone());
        let start = Instant::now();
        loop {
            if let Some(status) = self.procs.kubelet.as_mut().unwrap().try_wait().unwrap() {
                panic!("kubelet exited ({status}); log:\n{}", self.log_tail("kubelet.log", 40));
            }
            if let Ok(Some(node)) = nodes.get_opt(NODE_NAME).await {
                let ready = node
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                let tainted = node.spec.as_ref().and_then(|s| s.taints.as_ref()).is_some_and(|t| !t.is_empty());
                if ready && !tainted {
                    // The kubelet of the release this test runs on (1.37, or 1.34 for the
                    // compatibility subset), stamped as upstream's build stamps it.
                    let kubelet = node.status.as_ref().and_then(|s| s.node_info.as_ref()).map(|i| i.kubelet_version.clone()).unwrap_or_default();
                    assert_eq!(kubelet, Binaries::locate().kube_version, "the node's kubeletVersion");
                    return;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "node {NODE_NAME} not Ready and untainted within 120 s; kubelet log:\n{}",
                self.log_tail("kubelet.log", 40)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until ServiceAccount `name` in `ns` exists, and the namespace's
    /// `kube-root-ca.crt` with it: pods that use the account are admitted only then, and
    /// kubelet mounts its projected token (TokenRequest, the API server's CA from that
    /// ConfigMap; no token Secret since 1.24).
    pub async fn wait_service_account(&self, ns: &str, name: &str) {
        use k8s_openapi::api::core::v1::ConfigMap;
        let api: Api<ServiceAccount> = Api::namespaced(self.kube.clone(), ns);
        let cms: Api<ConfigMap> = Api::namespaced(self.kube.clone(), ns);
        super::wait_until(&format!("ServiceAccount {ns}/{name} and ConfigMap kube-root-ca.crt"), Duration::from_secs(60), || {
            let (api, cms) = (api.clone(), cms.clone());
            async move {
                api.get_opt(name).await.ok()??;
                cms.get_opt("kube-root-ca.crt").await.ok()??;
                Some(())
            }
        })
        .await;
    }

    /// Waits until Deployment `ns/name` has `replicas` ready and available replicas of its
    /// latest generation; returns how long that took.
    pub async fn wait_deployment(&self, ns: &str, name: &str, replicas: i32, within: Duration) -> Duration {
        use k8s_openapi::api::apps::v1::Deployment;
        let api: Api<Deployment> = Api::namespaced(self.kube.clone(), ns);
        let start = Instant::now();
        super::wait_until(&format!("Deployment {ns}/{name} with {replicas} available replicas"), within, || {
            let api = api.clone();
            async move { rolled_out(&api, name, replicas).await.then_some(()) }
        })
        .await;
        start.elapsed()
    }

    /// Installs `chart` as release `name` in `ns` with real Helm (scripts/helm.py), as
    /// `helm install --create-namespace` does; panics with Helm's error.
    pub fn helm_install(&self, chart: &Path, name: &str, ns: &str, values: &serde_json::Value) -> serde_json::Value {
        self.helm("install", chart, name, ns, values)
    }

    /// `helm upgrade` of release `name` in `ns` to `chart` with `values`.
    pub fn helm_upgrade(&self, chart: &Path, name: &str, ns: &str, values: &serde_json::Value) -> serde_json::Value {
        self.helm("upgrade", chart, name, ns, values)
    }

    fn helm(&self, action: &str, chart: &Path, name: &str, ns: &str, values: &serde_json::Value) -> serde_json::Value {
        super::helm::release(action, chart, name, ns, &self.kubeconfig, values)
    }

    /// The real kubectl with the admin's kubeconfig and a cache dir of the cluster's.
    fn kubectl_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&Binaries::locate().kubectl);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).arg("--cache-dir").arg(self.root().join("kubecache")).args(args);
        cmd
    }

    /// Runs the real kubectl against the cluster and returns its output.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = self.kubectl_command(args).output().expect("kubectl");
        assert!(out.status.success(), "kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("kubectl prints UTF-8")
    }

    /// A fresh client for the cluster's admin.
    pub async fn client(&self) -> Client {
        client_from(&self.kubeconfig).await
    }

    /// The last `n` lines of one of the cluster's logs.
    pub fn log_tail(&self, log: &str, n: usize) -> String {
        super::tail(&std::fs::read_to_string(self.root().join(log)).unwrap_or_default(), n, "\n")
    }

    /// Stops everything (as dropping does) and hands back what to look for on the host.
    pub fn shutdown(mut self) -> Traces {
        self.teardown();
        self.traces.clone()
    }

    fn teardown(&mut self) {
        // kubelet first, so nothing restarts what is killed next.
        if let Some(mut k) = self.procs.kubelet.take() {
            terminate(&mut k, Duration::from_secs(10));
        }
        if self.procs.containerd.is_some() {
            self.kill_containers();
        }
        // Shims whose containers are gone exit; any still there belong to nobody now (their
        // command line names the container and our containerd's socket).
        let sock = self.sock().display().to_string();
        for (_, cmd) in processes() {
            if cmd.contains(&sock) {
                if let Some(id) = shim_container_id(&cmd) {
                    self.traces.container_ids.insert(id);
                }
            }
        }
        kill_matching(|cmd| cmd.contains(&sock), "shim");
        if let Some(mut c) = self.procs.containerd.take() {
            terminate(&mut c, Duration::from_secs(10));
        }
        kill_cgroups(&self.traces.container_ids);
        self.forwards.clear();
        let p = &mut self.procs;
        for child in [p.scheduler.take(), p.controller_manager.take(), p.apiserver.take(), p.storage.take()].into_iter().flatten() {
            let mut child = child;
            kill_child(&mut child);
        }
        // The last process in the namespaces: their mounts (overlays, pod netns, tmpfs) and
        // interfaces (bridge, veths) go with it.
        if let Some(mut h) = self.procs.holder.take() {
            kill_child(&mut h);
        }
        remove_cgroups(&self.traces.container_ids);
        if let Some(dir) = self.dir.take() {
            if std::thread::panicking() && std::env::var_os("PODLEASE_KEEP_TESTBED").is_some() {
                eprintln!("mini-cluster kept in {}", dir.keep().display());
            } else if let Err(e) = std::fs::remove_dir_all(dir.path()) {
                eprintln!("could not remove {}: {e}", dir.path().display());
            }
        }
    }

    /// Kills every container's task and deletes the containers, through containerd.
    fn kill_containers(&mut self) {
        let start = Instant::now();
        loop {
            let ids = self.containers();
            if ids.is_empty() {
                return;
            }
            self.traces.container_ids.extend(ids.iter().cloned());
            for id in &ids {
                self.ctr(&["tasks", "kill", "-a", "-s", "KILL", id]);
            }
            for id in &ids {
                self.ctr(&["tasks", "delete", "-f", id]);
                self.ctr(&["containers", "delete", id]);
            }
            if start.elapsed() > Duration::from_secs(15) {
                eprintln!("containers left after 15 s: {ids:?} (their cgroups are killed next)");
                return;
            }
        }
    }
}

impl Drop for MiniCluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// A short temp dir (unix socket paths must stay under 108 bytes, the shims' included).
fn cluster_dir() -> tempfile::TempDir {
    let base = std::env::temp_dir();
    let base = if base.as_os_str().len() > 40 { PathBuf::from("/tmp") } else { base };
    tempfile::Builder::new().prefix(DIR_PREFIX).tempdir_in(base).expect("cluster temp dir")
}

/// The file in a cluster's dir naming the process that owns it ("pid start-time").
const OWNER_FILE: &str = "owner";

/// "pid start-time" of a live process (start time tells a reused pid apart).
fn owner_stamp(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22 (starttime) is the 20th after the ')' that ends the command name.
    let start = stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.to_string();
    Some(format!("{pid} {start}"))
}

/// Whether the process that started the cluster in `dir` still runs.
fn owner_alive(dir: &Path) -> bool {
    let Ok(stamp) = std::fs::read_to_string(dir.join(OWNER_FILE)) else { return false };
    let Some(pid) = stamp.split_whitespace().next().and_then(|p| p.parse::<u32>().ok()) else { return false };
    owner_stamp(pid).as_deref() == Some(stamp.trim())
}

/// The cluster dir a process argument names, if any (`.../plnode-XXXX/...`).
fn cluster_dir_in(cmd: &str) -> Option<PathBuf> {
    cmd.split(|c: char| c.is_whitespace() || c == '=' || c == ',').find_map(|word| {
        let at = word.find(&format!("/{DIR_PREFIX}"))?;
        let end = word[at + 1..].find('/').map(|e| at + 1 + e).unwrap_or(word.len());
        Some(PathBuf::from(&word[..end]))
    })
}

/// Clears what clusters of killed test processes left (a SIGKILLed or timed-out test runs
/// no destructor: PR_SET_PDEATHSIG takes kubelet and containerd down, but the shims and
/// their containers are not our children and live on). Clusters whose owner still runs are
/// left alone.
pub fn sweep_stale_clusters() {
    let mut stale: BTreeSet<PathBuf> = BTreeSet::new();
    for (_, cmd) in processes() {
        if let Some(dir) = cluster_dir_in(&cmd) {
            if !owner_alive(&dir) {
                stale.insert(dir);
            }
        }
    }
    // Containers name no dir in their arguments, but their mounts do (rootfs, /etc/hosts).
    let containers = running_containers();
    for (_, dir) in &containers {
        if !owner_alive(dir) {
            stale.insert(dir.clone());
        }
    }
    for base in [std::env::temp_dir(), PathBuf::from("/tmp")] {
        for e in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(DIR_PREFIX) && !owner_alive(&e.path()) {
                stale.insert(e.path());
            }
        }
    }
    for dir in stale {
        let name = format!("{}/", dir.display());
        let mut ids: BTreeSet<String> = containers.iter().filter(|(_, d)| *d == dir).map(|(id, _)| id.clone()).collect();
        for (_, cmd) in processes() {
            if cmd.contains(&name) {
                ids.extend(shim_container_id(&cmd));
            }
        }
        eprintln!("clearing the stale mini-cluster {name} (containers {ids:?})");
        kill_matching(|cmd| cmd.contains(&name), "process of a stale cluster");
        kill_cgroups(&ids);
        remove_cgroups(&ids);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Every container cgroup (`/k8s.io/<id>`) with processes in it, and the cluster dir its
/// processes' mounts name.
fn running_containers() -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for parent in cgroup_parents() {
        for e in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
            let id = e.file_name().to_string_lossy().to_string();
            let dir = pids_in(&e.path()).into_iter().find_map(|pid| {
                let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).ok()?;
                mounts.lines().find_map(cluster_dir_in)
            });
            if let Some(dir) = dir {
                if !out.iter().any(|(i, _)| *i == id) {
                    out.push((id, dir));
                }
            }
        }
    }
    out
}

/// SIGTERM, then SIGKILL after `grace`.
fn terminate(child: &mut Child, grace: Duration) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    while start.elapsed() < grace {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    kill_child(child);
}

/// Every process on the host: (pid, command line with spaces).
fn processes() -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        out.push((pid, cmd.trim().to_string()));
    }
    out
}

fn kill_matching(matches: impl Fn(&str) -> bool, what: &str) {
    let me = std::process::id();
    for (pid, cmd) in processes() {
        if pid != me && matches(&cmd) {
            eprintln!("killing leftover {what} {pid}: {cmd}");
            // SAFETY: a process of this cluster (its command line names the cluster's dir).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// The inode of a process's namespace of `kind` ("mnt", "net").
fn ns_inode(pid: u32, kind: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/ns/{kind}")).ok().map(|m| m.ino())
}

/// Every cgroup hierarchy's mount point (v1 controllers and the v2 unified one).
fn cgroup_mounts() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let fstype = post.split_whitespace().next()?;
            let point = PathBuf::from(pre.split_whitespace().nth(4)?);
            (fstype == "cgroup" || fstype == "cgroup2").then_some(point)
        })
        .collect()
}

/// containerd's parent cgroup of every container (its CRI namespace).
const CGROUP_PARENT: &str = CRI_NAMESPACE;

/// The cgroup dirs of these containers that exist, in every hierarchy, deepest first.
fn cgroup_dirs(ids: &BTreeSet<String>) -> Vec<PathBuf> {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(&e.path(), out);
            }
        }
        out.push(d.to_path_buf());
    }
    let mut out = Vec::new();
    for m in cgroup_mounts() {
        for id in ids {
            let d = m.join(CGROUP_PARENT).join(id);
            if d.is_dir() {
                walk(&d, &mut out);
            }
        }
    }
    out
}

/// The container id in a shim's command line (`containerd-shim-runc-v2 ... -id <id> ...`).
fn shim_container_id(cmd: &str) -> Option<String> {
    let mut words = cmd.split_whitespace();
    words.find(|w| *w == "-id")?;
    words.next().map(str::to_string)
}

fn pids_in(cgroup: &Path) -> Vec<u32> {
    std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// SIGKILLs every process left in the containers' cgroups (a container whose shim is gone).
fn kill_cgroups(ids: &BTreeSet<String>) {
    let start = Instant::now();
    loop {
        let pids: Vec<u32> = cgroup_dirs(ids).iter().flat_map(|d| pids_in(d)).collect();
        if pids.is_empty() || start.elapsed() > Duration::from_secs(10) {
            return;
        }
        for pid in pids {
            // SAFETY: the process is in one of this cluster's container cgroups.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Removes the containers' (empty) cgroup dirs, and the parent once no cluster uses it (a
/// parent another cluster still uses is not empty: rmdir refuses).
fn remove_cgroups(ids: &BTreeSet<String>) {
    let start = Instant::now();
    loop {
        for d in cgroup_dirs(ids) {
            let _ = std::fs::remove_dir(d);
        }
        if cgroup_dirs(ids).is_empty() || start.elapsed() > Duration::from_secs(10) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for m in cgroup_mounts() {
        let _ = std::fs::remove_dir(m.join(CGROUP_PARENT));
    }
}

/// The hierarchies that have the containers' parent cgroup.
fn cgroup_parents() -> Vec<PathBuf> {
    cgroup_mounts().into_iter().map(|m| m.join(CGROUP_PARENT)).filter(|d| d.is_dir()).collect()
}

/// The host's state a node could change: mount points, guarded sysctls and paths, whether
/// containerd's parent cgroup exists.
#[derive(Debug, Clone, PartialEq)]
pub struct HostState {
    pub mounts: BTreeSet<String>,
    pub sysctls: BTreeMap<String, String>,
    pub paths: BTreeMap<String, bool>,
    pub cgroup_parents: Vec<PathBuf>,
}

impl HostState {
    pub fn capture() -> HostState {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let fstype = l.split_once(" - ").and_then(|(_, p)| p.split_whitespace().next()).unwrap_or("?");
                Some(format!("{} ({fstype})", f.get(4)?))
            })
            .collect();
        let sysctls = GUARDED_SYSCTLS
            .iter()
            .map(|s| (s.to_string(), std::fs::read_to_string(format!("/proc/sys/{s}")).unwrap_or_default().trim().to_string()))
            .collect();
        let paths = GUARDED_PATHS.iter().map(|p| (p.to_string(), Path::new(p).exists())).collect();
        HostState { mounts, sysctls, paths, cgroup_parents: cgroup_parents() }
    }
}

/// What is left on the host after a cluster was torn down.
#[derive(Debug, Default)]
pub struct Leftovers(pub Vec<String>);

impl Leftovers {
    /// Everything `traces`' cluster could have left: processes naming its dir or still in its
    /// mount namespace, mounts that appeared (or mention its dir), its cgroups, changed
    /// sysctls, host paths that appeared, its dir itself.
    pub fn of(traces: &Traces) -> Leftovers {
        let dir = traces.dir.display().to_string();
        let mut found = Vec::new();
        for (pid, cmd) in processes() {
            if pid == std::process::id() {
                continue;
            }
            if cmd.contains(&dir) {
                found.push(format!("process {pid}: {cmd}"));
            } else if traces.mount_ns.is_some() && ns_inode(pid, "mnt") == traces.mount_ns {
                found.push(format!("process {pid} in the cluster's mount namespace: {cmd}"));
            } else if traces.net_ns.is_some() && ns_inode(pid, "net") == traces.net_ns {
                found.push(format!("process {pid} in the cluster's network namespace: {cmd}"));
            }
        }
        let now = HostState::capture();
        for m in now.mounts.difference(&traces.before.mounts) {
            found.push(format!("mount {m}"));
        }
        for m in &now.mounts {
            if m.contains(&dir) {
                found.push(format!("mount {m}"));
            }
        }
        for d in cgroup_dirs(&traces.container_ids) {
            found.push(format!("cgroup {} (pids {:?})", d.display(), pids_in(&d)));
        }
        // The parent, if this cluster made it and it is empty (another cluster's stays busy).
        for d in &now.cgroup_parents {
            let empty = std::fs::read_dir(d).into_iter().flatten().flatten().all(|e| !e.file_type().map(|t| t.is_dir()).unwrap_or(false));
            if empty && !traces.before.cgroup_parents.contains(d) {
                found.push(format!("cgroup {} (empty, made by this cluster)", d.display()));
            }
        }
        for (k, v) in &now.sysctls {
            let was = traces.before.sysctls.get(k).cloned().unwrap_or_default();
            if *v != was {
                found.push(format!("sysctl {k} changed: {was} -> {v}"));
            }
        }
        for (p, exists) in &now.paths {
            if *exists && !traces.before.paths.get(p).copied().unwrap_or(false) {
                found.push(format!("host path {p} appeared"));
            }
        }
        if traces.dir.exists() {
            found.push(format!("dir {dir}"));
        }
        Leftovers(found)
    }

    /// What any mini-cluster could have left (for the end of a suite, when none runs): a
    /// process, mount or temp dir named after a cluster's dir (`plnode-*`: every containerd,
    /// kubelet and shim of a cluster names it in its arguments), containerd's cgroup parent
    /// (`k8s.io`) in any hierarchy, or a host path containerd or kubelet hard-code.
    pub fn any() -> Leftovers {
        let marker = format!("/{DIR_PREFIX}");
        let mut found = Vec::new();
        for (pid, cmd) in processes() {
            if pid != std::process::id() && cmd.contains(&marker) {
                found.push(format!("process {pid}: {cmd}"));
            }
        }
        for m in HostState::capture().mounts {
            if m.contains(&marker) {
                found.push(format!("mount {m}"));
            }
        }
        for d in cgroup_parents() {
            found.push(format!("cgroup {}", d.display()));
        }
        for p in GUARDED_PATHS {
            if Path::new(p).exists() {
                found.push(format!("host path {p}"));
            }
        }
        for base in [std::env::temp_dir(), PathBuf::from("/tmp")] {
            for e in std::fs::read_dir(&base).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().starts_with(DIR_PREFIX) {
                    found.push(format!("dir {}", e.path().display()));
                }
            }
        }
        found.sort();
        found.dedup();
        Leftovers(found)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Waits (processes killed a moment ago may still be exiting) until `check` finds nothing,
/// and fails the test with what it found otherwise.
pub fn assert_nothing_left(what: &str, check: impl Fn() -> Leftovers) {
    let start = Instant::now();
    loop {
        let left = check();
        if left.is_empty() {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "{what} left on the host: {:#?}", left.0);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether Deployment `name` has rolled out its current spec to exactly `replicas`
/// replicas, all ready and available.
async fn rolled_out(api: &Api<k8s_openapi::api::apps::v1::Deployment>, name: &str, replicas: i32) -> bool {
    let Ok(d) = api.get(name).await else { return false };
    let generation = d.metadata.generation;
    d.status.is_some_and(|s| {
        s.observed_generation == generation
            && s.updated_replicas == Some(replicas)
            && s.ready_replicas == Some(replicas)
            && s.available_replicas == Some(replicas)
            && s.replicas == Some(replicas)
    })
}

/// The chart in this tree (charts/podlease).
pub fn podlease_chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/podlease")
}

/// The podlease image `local/podlease:<tag>` as a docker-archive in `dir`, made by
/// scripts/image.sh from the binary `bin` (a test's `env!("CARGO_BIN_EXE_podlease")`);
/// import it with [`MiniCluster::import_image`].
pub fn podlease_image(dir: &Path, bin: &Path, tag: &str) -> PathBuf {
    let tarball = dir.join(format!("podlease-{tag}.tar"));
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/image.sh"))
        .arg(&tarball)
        .arg(format!("local/podlease:{tag}"))
        .env("PODLEASE_BIN", bin)
        .output()
        .expect("run scripts/image.sh");
    assert!(out.status.success(), "scripts/image.sh: {}", String::from_utf8_lossy(&out.stderr));
    tarball
}

/// The chart values every install on the node needs and nothing more: the imported image
/// `local/podlease:<tag>` (never pulled), the registry `endpoints`, and the API server at the
/// node's address for in-cluster config (no kube-proxy routes the `kubernetes` Service here).
pub fn podlease_values(tag: &str, endpoints: &[String]) -> serde_json::Value {
    serde_json::json!({
        "image": {"repository": "local/podlease", "tag": tag, "pullPolicy": "Never"},
        "etcd": {"endpoints": endpoints},
        // What each replica did, should a test have to show it (logging changes nothing else).
        "log": {"level": "info,podlease=debug"},
        "extraEnv": [
            {"name": "KUBERNETES_SERVICE_HOST", "value": NODE_ADDRESS},
            {"name": "KUBERNETES_SERVICE_PORT", "value": APISERVER_PORT.to_string()},
        ],
    })
}

impl MiniCluster {
    /// Waits like [`wait_deployment`](Self::wait_deployment); on timeout the panic shows what
    /// the Deployment's pods say: their phase, container states, and each one's log
    /// (`kubectl logs`, the previous run's too when it restarted).
    pub async fn wait_deployment_explained(&self, ns: &str, name: &str, selector: &str, replicas: i32, within: Duration) -> Duration {
        use k8s_openapi::api::apps::v1::Deployment;
        let api: Api<Deployment> = Api::namespaced(self.kube.clone(), ns);
        let start = Instant::now();
        loop {
            if rolled_out(&api, name, replicas).await {
                return start.elapsed();
            }
            if start.elapsed() >= within {
                panic!("timed out after {within:?} waiting for Deployment {ns}/{name} with {replicas} available replicas; its pods:\n{}", self.pods_explained(ns, selector));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The pods matching `selector` in `ns`: `kubectl get pods -o wide`, then each pod's
    /// container statuses and its log (and its previous container's, if any).
    pub fn pods_explained(&self, ns: &str, selector: &str) -> String {
        let run = |args: &[&str]| {
            let out = self.kubectl_command(args).output().expect("kubectl");
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
        };
        let mut text = run(&["get", "pods", "-n", ns, "-l", selector, "-o", "wide"]);
        let names = run(&["get", "pods", "-n", ns, "-l", selector, "-o", "jsonpath={.items[*].metadata.name}"]);
        for pod in names.split_whitespace() {
            let statuses = run(&["get", "pod", "-n", ns, pod, "-o", "jsonpath={.status.containerStatuses}"]);
            let log = run(&["logs", "-n", ns, pod, "--tail=20"]);
            text += &format!("\n--- {pod}: container statuses {statuses}\n--- {pod}: log\n{log}");
            // A crashed container's log is the current one until it runs again.
            let previous = run(&["logs", "-n", ns, pod, "--previous", "--tail=20"]);
            if !previous.contains("not found") && previous != log {
                text += &format!("--- {pod}: previous container's log\n{previous}");
            }
        }
        text
    }
}

/// Every pod of `selector` in `ns` streams its log into a file of its own (`kubectl logs
/// -f`, started once its container runs), so that what a pod said is still there after it
/// is deleted: a failure that involves a replaced pod can show that pod's side.
pub struct LogTap {
    dir: PathBuf,
    streams: std::sync::Arc<std::sync::Mutex<Vec<Child>>>,
    _task: super::AbortOnDrop,
}

impl MiniCluster {
    pub fn tap_logs(&self, ns: &str, selector: &str, dir: &Path) -> LogTap {
        use k8s_openapi::api::core::v1::Pod;
        std::fs::create_dir_all(dir).unwrap();
        let streams = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (pods, selector, ns) = (Api::<Pod>::namespaced(self.kube.clone(), ns), selector.to_string(), ns.to_string());
        let (kubeconfig, out, all) = (self.kubeconfig.clone(), dir.to_path_buf(), streams.clone());
        let task = tokio::spawn(async move {
            let mut tapped = BTreeSet::new();
            loop {
                let list = pods.list(&kube::api::ListParams::default().labels(&selector)).await.map(|l| l.items).unwrap_or_default();
                for p in list {
                    let name = p.metadata.name.clone().unwrap_or_default();
                    let running = p.status.iter().flat_map(|s| s.container_statuses.iter().flatten()).any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()));
                    if running && tapped.insert(name.clone()) {
                        let mut cmd = Command::new(&Binaries::locate().kubectl);
                        cmd.arg("--kubeconfig").arg(&kubeconfig).args(["-n", &ns, "logs", "-f", "--timestamps", &name]);
                        all.lock().unwrap().push(spawn_owned(&mut cmd, &out.join(format!("{name}.log"))));
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        LogTap { dir: dir.to_path_buf(), streams, _task: super::AbortOnDrop(task.abort_handle()) }
    }
}

impl LogTap {
    /// Each pod's log so far, its last `lines` lines.
    pub fn dump(&self, lines: usize) -> String {
        let mut text = String::new();
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let log = std::fs::read_to_string(e.path()).unwrap_or_default();
            text += &format!("--- {} (last {lines} lines)\n{}\n", e.file_name().to_string_lossy(), super::tail(&log, lines, "\n"));
        }
        text
    }
}

impl Drop for LogTap {
    fn drop(&mut self) {
        for c in self.streams.lock().unwrap().iter_mut() {
            kill_child(c);
        }
    }
}
