//! TCP across the boundary of the cluster's private network namespace, without touching the
//! host's network: a socket belongs to the namespace of the thread that created it, so a
//! short-lived thread joins the namespace (setns), creates the socket and hands it back, and
//! the bytes are copied in this process. Used both ways: the test reaches the API server in
//! the namespace through a port on the host's 127.0.0.1, and pods reach a registry etcd the
//! test runs on the host through an address inside the namespace.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// The network namespace of a running process.
#[derive(Debug, Clone)]
pub struct NetNs {
    path: PathBuf,
}

impl NetNs {
    pub fn of(pid: u32) -> NetNs {
        NetNs { path: PathBuf::from(format!("/proc/{pid}/ns/net")) }
    }

    /// Runs `f` on a new thread that has joined the namespace (the caller's threads never do).
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> std::io::Result<T> {
        let path = self.path.clone();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path)?;
            // SAFETY: setns on this thread only, with a namespace file we hold open.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            f()
        })
        .join()
        .expect("namespace thread panicked")
    }

    /// A connection from inside the namespace.
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
        self.run(move || TcpStream::connect_timeout(&addr, timeout))
    }

    /// A listener inside the namespace.
    pub fn bind(&self, addr: SocketAddr) -> std::io::Result<TcpListener> {
        self.run(move || TcpListener::bind(addr))
    }
}

/// A running port forward; dropping it closes the listener and every connection.
pub struct Forward {
    /// Where to connect: on the host for `out_of`, inside the namespace for `into`.
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Listens at `listen` inside `ns` and connects each connection to `target` on the host.
pub fn into(ns: &NetNs, listen: SocketAddr, target: SocketAddr) -> Forward {
    let listener = ns.bind(listen).unwrap_or_else(|e| panic!("listen on {listen} in the node's network namespace: {e}"));
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    serve(listener, stop.clone(), move || async move { tokio::net::TcpStream::connect(target).await });
    Forward { addr, stop }
}

/// Listens on a free port of the host's 127.0.0.1 and connects each connection to `target`
/// inside `ns` (the connection is made from inside: it never leaves the namespace).
pub fn out_of(ns: &NetNs, target: SocketAddr) -> Forward {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let ns = ns.clone();
    serve(listener, stop.clone(), move || {
        let ns = ns.clone();
        async move {
            let s = tokio::task::spawn_blocking(move || ns.connect(target, Duration::from_secs(5))).await.expect("connect task")?;
            s.set_nonblocking(true)?;
            tokio::net::TcpStream::from_std(s)
        }
    });
    Forward { addr, stop }
}

fn serve<F, Fut>(listener: TcpListener, stop: CancellationToken, dial: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = std::io::Result<tokio::net::TcpStream>> + Send + 'static,
{
    listener.set_nonblocking(true).unwrap();
    super::super::background().spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        loop {
            let (mut inbound, _) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(_) => continue,
                },
            };
            let outbound = dial();
            let stop = stop.clone();
            tokio::spawn(async move {
                let Ok(mut outbound) = outbound.await else { return };
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                }
            });
        }
    });
}
