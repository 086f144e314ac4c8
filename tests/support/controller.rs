//! The podlease binary under test, as a child process (so it can be SIGKILLed, SIGSTOPped
//! and restarted like the real thing).

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::{DEADLINE, TestBed, free_port, spawn_owned};

pub struct Controller {
    pub child: Option<Child>,
    pub metrics_port: u16,
    pub log: PathBuf,
    args: Vec<String>,
    /// Extra environment for the next start (e.g. a failpoint).
    pub env: Vec<(String, String)>,
    name: String,
    kubeconfig: PathBuf,
    etcd: String,
    log_dir: PathBuf,
    runs: usize,
}

impl Controller {
    /// Starts `podlease run` against the bed, with `extra` flags, and waits for /readyz.
    pub async fn start(bed: &TestBed, name: &str, extra: &[&str]) -> Controller {
        Controller::start_as(bed, name, bed.kubeconfig.clone(), extra).await
    }

    /// Starts `podlease run` authenticating with `kubeconfig` (e.g. a ServiceAccount token).
    pub async fn start_as(bed: &TestBed, name: &str, kubeconfig: PathBuf, extra: &[&str]) -> Controller {
        let mut c = Controller::new(bed, name, kubeconfig, extra);
        c.restart().await;
        c
    }

    /// A controller that is not started yet (`spawn` or `restart` it).
    pub fn new(bed: &TestBed, name: &str, kubeconfig: PathBuf, extra: &[&str]) -> Controller {
        Controller {
            child: None,
            metrics_port: 0,
            log: PathBuf::new(),
            args: extra.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
            name: name.to_string(),
            kubeconfig,
            etcd: bed.etcd_endpoint(),
            log_dir: bed.dir.path().to_path_buf(),
            runs: 0,
        }
    }

    /// Starts the process again (after `kill`) and waits until it is ready.
    pub async fn restart(&mut self) {
        self.spawn();
        self.wait_ready().await;
    }

    /// Starts the process without waiting.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "controller {} already running", self.name);
        self.runs += 1;
        self.metrics_port = free_port();
        self.log = self.log_dir.join(format!("podlease-{}-{}.log", self.name, self.runs));
        let mut cmd = Command::new(binary());
        cmd.arg("run").arg("--kubeconfig").arg(&self.kubeconfig);
        // The bed's registry etcd unless the test names its own (the flag accumulates).
        if !self.args.iter().any(|a| a == "--etcd-endpoints") {
            cmd.arg("--etcd-endpoints").arg(&self.etcd);
        }
        cmd.arg("--metrics-addr")
            .arg(format!("127.0.0.1:{}", self.metrics_port))
            .args(&self.args)
            .env("PODLEASE_LOG_LEVEL", "info,podlease=debug")
            .env("POD_NAME", &self.name)
            // The bed's defaults, whatever namespace the test runner itself runs in: the
            // leader Lease in `default`, install id `default.podlease` (the observer's).
            .env_remove("POD_NAMESPACE")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        self.child = Some(spawn_owned(&mut cmd, &self.log));
    }

    pub async fn wait_ready(&mut self) {
        let url = format!("http://127.0.0.1:{}/readyz", self.metrics_port);
        let start = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("podlease exited with {status} before becoming ready; log:\n{}", self.log_text());
            }
            if http_get(&url).await.is_some_and(|(code, _)| code == 200) {
                return;
            }
            assert!(start.elapsed() < DEADLINE, "podlease not ready within {DEADLINE:?}; log:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `sig`; a SIGSTOP returns once every thread has stopped (see `proc::stop`).
    pub fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().expect("running").id();
        if sig == libc::SIGSTOP {
            return super::proc::stop(pid);
        }
        // SAFETY: sending a signal to our own child.
        unsafe {
            libc::kill(pid as i32, sig);
        }
    }

    /// SIGKILL: no cleanup at all, as on a node failure.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then SIGKILL if the process is still running after `grace`, as the kubelet
    /// does at a pod's termination grace period. Whether it exited within the grace.
    pub fn terminate_within(&mut self, grace: Duration) -> bool {
        self.signal(libc::SIGTERM);
        let mut c = self.child.take().expect("running");
        if exit_within(&mut c, grace).is_some() {
            return true;
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    /// SIGTERM and wait for the exit (a rollout).

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        let mut c = self.child.take().expect("running");
        exit_within(&mut c, DEADLINE).expect("podlease did not exit on SIGTERM")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn metrics(&self) -> String {
        http_get(&format!("http://127.0.0.1:{}/metrics", self.metrics_port)).await.expect("metrics").1
    }

    /// One sample of a metric without labels (0 when absent or unreachable).
    pub async fn metric(&self, name: &str) -> f64 {
        let Some((_, text)) = http_get(&format!("http://127.0.0.1:{}/metrics", self.metrics_port)).await else { return 0.0 };
        metric(&text, name)
    }

    /// Whether this replica currently leads (runs a registry term).
    pub async fn leads(&self) -> bool {
        self.metric("podlease_leader").await == 1.0
    }

    /// Waits until the process has exited (e.g. at a failpoint) and returns its status.
    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(s)) = c.try_wait()
            {
                self.child = None;
                return s;
            }
            assert!(start.elapsed() < DEADLINE, "podlease {} did not exit", self.name);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The exit status of `c` once it has exited, or None if it is still running after `within`.
fn exit_within(c: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Ok(Some(s)) = c.try_wait() {
            return Some(s);
        }
        if start.elapsed() >= within {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A fresh bed with the CRD applied and one podlease, "c1", started with `extra` flags.
pub async fn bed_and_controller(extra: &[&str]) -> (TestBed, Controller) {
    let bed = TestBed::start().await;
    bed.apply_crd().await;
    let c = Controller::start(&bed, "c1", extra).await;
    (bed, c)
}

/// Waits until one of `replicas` leads; its index.
pub async fn wait_leader<'a>(replicas: &'a [&'a Controller]) -> usize {
    super::wait_until("a leader", DEADLINE, || async {
        for (i, c) in replicas.iter().enumerate() {
            if c.leads().await {
                return Some(i);
            }
        }
        None
    })
    .await
}

/// Waits until `c` leads and has adopted (/readyz says "leader").
pub async fn wait_adopted(c: &Controller, within: Duration) {
    super::wait_until("the replica leads and has adopted", within, || async {
        let (code, body) = http_get(&format!("http://127.0.0.1:{}/readyz", c.metrics_port)).await?;
        (code == 200 && body.contains("leader")).then_some(())
    })
    .await;
}

/// The value of an unlabelled sample `name` in a Prometheus text exposition.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The podlease binary: $PODLEASE_BIN when set (the demo example; or another build, to see
/// a test fail on it), else cargo's.
pub fn binary() -> PathBuf {
    match (std::env::var_os("PODLEASE_BIN"), option_env!("CARGO_BIN_EXE_podlease")) {
        (Some(p), _) => PathBuf::from(p),
        (None, Some(p)) => PathBuf::from(p),
        (None, None) => panic!("set PODLEASE_BIN to the podlease binary"),
    }
}

/// A tiny HTTP/1.0 GET (status code, body); None when nothing answers.
pub async fn http_get(url: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut s = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(host)).await.ok()?.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.ok()?.ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((code, body))
}
