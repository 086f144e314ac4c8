//! A TCP fault proxy: forwards bytes between a client and one target, and lets the test
//! break the path at any moment. Pure bytes, so it is transparent to TLS and HTTP/2 (gRPC).
//!
//! - `Pass`: forward as they come.
//! - `Blackhole`: the silently dead path. New connections are accepted and never forwarded
//!   (the target is not even dialled); existing ones stop forwarding in both directions but
//!   stay open, so only keepalives and deadlines can tell. When the mode changes back,
//!   forwarding resumes where it stopped, as TCP does after a partition heals.
//! - `Latency(d)`: every chunk is delayed by `d` in both directions, order preserved.
//! - `DropAnswers`: what the client sends reaches the target, what the target answers is
//!   dropped: a write lands and its answer is lost. The connections it leaves are garbled
//!   for good (bytes missing mid-stream): `reset_all()` after it.
//! - `reset_all()`: every current connection is closed with RST (SO_LINGER 0), both sides.
//! - `freeze_existing()`: every current connection stops forwarding for good and stays
//!   open, while new connections pass: a connection that died silently (a NAT entry
//!   dropped) beside a network that works.
//!
//! The proxy runs on the support's background runtime; its tasks end when it is dropped.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::{background, free_port};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Blackhole,
    Latency(Duration),
    DropAnswers,
}

/// One proxied connection: its sockets and the tasks that pump bytes between them.
#[derive(Default)]
struct Conn {
    sockets: Vec<Arc<TcpStream>>,
    tasks: Vec<AbortHandle>,
    /// Directions that have seen EOF and passed it on.
    closed_directions: u8,
    /// Forwards nothing ever again (`freeze_existing`).
    frozen: bool,
}

struct Shared {
    target: SocketAddr,
    mode: watch::Sender<Mode>,
    conns: Mutex<HashMap<u64, Conn>>,
    next_id: AtomicU64,
    accepted: AtomicU64,
}

impl Shared {
    fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    /// Waits while the path is blackholed.
    async fn open_path(&self) {
        let mut rx = self.mode.subscribe();
        let _ = rx.wait_for(|m| *m != Mode::Blackhole).await;
    }

    fn frozen(&self, id: u64) -> bool {
        self.conns.lock().unwrap().get(&id).is_some_and(|c| c.frozen)
    }

    /// A frozen connection's pumps park here for good.
    async fn unless_frozen(&self, id: u64) {
        if self.frozen(id) {
            std::future::pending::<()>().await;
        }
    }

    fn add_socket(&self, id: u64, s: Arc<TcpStream>) -> bool {
        match self.conns.lock().unwrap().get_mut(&id) {
            Some(c) => {
                c.sockets.push(s);
                true
            }
            None => false,
        }
    }

    fn add_task(&self, id: u64, t: AbortHandle) {
        match self.conns.lock().unwrap().get_mut(&id) {
            Some(c) => c.tasks.push(t),
            None => t.abort(),
        }
    }

    /// Closes connection `id`; with `rst`, both sockets send RST instead of FIN.
    fn close(&self, id: u64, rst: bool) {
        let conn = self.conns.lock().unwrap().remove(&id);
        if let Some(conn) = conn {
            close_conn(conn, rst);
        }
    }

    /// One direction passed its EOF on; the connection ends when both have.
    fn direction_done(&self, id: u64) {
        let mut conns = self.conns.lock().unwrap();
        let done = conns.get_mut(&id).map(|c| {
            c.closed_directions += 1;
            c.closed_directions >= 2
        });
        if done == Some(true) {
            let conn = conns.remove(&id).unwrap();
            drop(conns);
            close_conn(conn, false);
        }
    }
}

fn close_conn(conn: Conn, rst: bool) {
    if rst {
        for s in &conn.sockets {
            let _ = s.set_zero_linger();
        }
    }
    // The sockets close once the last task holding them is gone.
    for t in &conn.tasks {
        t.abort();
    }
}

/// A fault proxy in front of one TCP target. Dropping it closes its port and connections.
pub struct FaultProxy {
    port: u16,
    shared: Arc<Shared>,
    acceptor: AbortHandle,
}

impl FaultProxy {
    /// Listens on a free 127.0.0.1 port and forwards every connection to `target`.
    pub fn start(target: SocketAddr) -> FaultProxy {
        let rt = background();
        let (port, listener) = loop {
            let port = free_port();
            if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                l.set_nonblocking(true).unwrap();
                break (port, l);
            }
        };
        let listener = {
            let _guard = rt.enter();
            TcpListener::from_std(listener).expect("tokio listener")
        };
        let (mode, _) = watch::channel(Mode::Pass);
        let shared = Arc::new(Shared {
            target,
            mode,
            conns: Mutex::default(),
            next_id: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
        });
        let acceptor = rt
            .spawn(accept_loop(listener, shared.clone()))
            .abort_handle();
        FaultProxy {
            port,
            shared,
            acceptor,
        }
    }

    /// A proxy in front of `127.0.0.1:<port>`.
    pub fn to_port(port: u16) -> FaultProxy {
        FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// A proxy in front of the host:port of `url` (e.g. an etcd endpoint `http://127.0.0.1:2379`).
    pub fn to_url(url: &str) -> FaultProxy {
        let hostport = url.split("://").last().unwrap().trim_end_matches('/');
        FaultProxy::start(
            hostport
                .parse()
                .unwrap_or_else(|e| panic!("proxy target {url}: {e}")),
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `<scheme>://127.0.0.1:<port>`
    pub fn endpoint(&self, scheme: &str) -> String {
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn target(&self) -> SocketAddr {
        self.shared.target
    }

    pub fn set_mode(&self, mode: Mode) {
        self.shared.mode.send_replace(mode);
    }

    pub fn mode(&self) -> Mode {
        self.shared.mode()
    }

    /// Closes every current connection with RST (both the client's and the target's side).
    /// The mode is unchanged: new connections are served as before.
    pub fn reset_all(&self) {
        self.close_all(true);
    }

    /// Closes every current connection (with RST when `rst`).
    fn close_all(&self, rst: bool) {
        let conns: Vec<Conn> = self.shared.conns.lock().unwrap().drain().map(|(_, c)| c).collect();
        for c in conns {
            close_conn(c, rst);
        }
    }

    /// Stops every current connection for good (both directions, no FIN, no RST); new
    /// connections are served as the mode says.
    pub fn freeze_existing(&self) {
        for c in self.shared.conns.lock().unwrap().values_mut() {
            c.frozen = true;
        }
    }

    /// Connections open right now.
    pub fn connections(&self) -> usize {
        self.shared.conns.lock().unwrap().len()
    }

    /// Connections accepted since the start.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.close_all(false);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        let _ = client.set_nodelay(true);
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let client = Arc::new(client);
        shared.conns.lock().unwrap().insert(
            id,
            Conn {
                sockets: vec![client.clone()],
                ..Default::default()
            },
        );
        let task = tokio::spawn(connect(shared.clone(), id, client));
        shared.add_task(id, task.abort_handle());
    }
}

/// Dials the target once the path is open, then pumps both directions.
async fn connect(shared: Arc<Shared>, id: u64, client: Arc<TcpStream>) {
    shared.open_path().await;
    let server = match TcpStream::connect(shared.target).await {
        Ok(s) => Arc::new(s),
        // As close as a proxy gets to "connection refused".
        Err(_) => return shared.close(id, true),
    };
    let _ = server.set_nodelay(true);
    if !shared.add_socket(id, server.clone()) {
        let _ = server.set_zero_linger();
        return;
    }
    for (from, to, answers) in [(client.clone(), server.clone(), false), (server, client, true)] {
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_side(shared.clone(), id, from, tx, answers));
        shared.add_task(id, reader.abort_handle());
        let writer = tokio::spawn(write_side(shared.clone(), id, to, rx));
        shared.add_task(id, writer.abort_handle());
    }
}

enum Chunk {
    Data(Instant, Vec<u8>),
    Eof,
}

async fn read_side(
    shared: Arc<Shared>,
    id: u64,
    from: Arc<TcpStream>,
    tx: mpsc::UnboundedSender<Chunk>,
    answers: bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        shared.open_path().await;
        if from.readable().await.is_err() {
            return shared.close(id, true);
        }
        match from.try_read(&mut buf) {
            Ok(0) => {
                let _ = tx.send(Chunk::Eof);
                return;
            }
            Ok(n) => {
                shared.unless_frozen(id).await;
                let delay = match shared.mode() {
                    Mode::Latency(d) => d,
                    Mode::DropAnswers if answers => continue,
                    _ => Duration::ZERO,
                };
                let _ = tx.send(Chunk::Data(Instant::now() + delay, buf[..n].to_vec()));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            // Reset by the peer: pass the reset on to the other side.
            Err(_) => return shared.close(id, true),
        }
    }
}

async fn write_side(
    shared: Arc<Shared>,
    id: u64,
    to: Arc<TcpStream>,
    mut rx: mpsc::UnboundedReceiver<Chunk>,
) {
    while let Some(chunk) = rx.recv().await {
        match chunk {
            Chunk::Data(due, data) => {
                tokio::time::sleep_until(due).await;
                shared.open_path().await;
                shared.unless_frozen(id).await;
                let mut rest = &data[..];
                while !rest.is_empty() {
                    if to.writable().await.is_err() {
                        return shared.close(id, true);
                    }
                    match to.try_write(rest) {
                        Ok(n) => rest = &rest[n..],
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                        Err(_) => return shared.close(id, true),
                    }
                }
            }
            Chunk::Eof => {
                // Half-close: the other side may still be sending.
                // SAFETY: shutdown(2) on a socket this connection owns.
                unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) };
                return shared.direction_done(id);
            }
        }
    }
}
