//! The fault proxy of the test support, on its own against a local echo server: each mode
//! does what the fault tests rely on. No test bed needed; runs in about two seconds.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::DEADLINE;
use support::proxy::{FaultProxy, Mode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long "nothing arrives" is watched for.
const SILENCE: Duration = Duration::from_secs(1);

/// An echo server; counts the bytes it received.
async fn echo_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(AtomicUsize::new(0));
    let count = received.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            count.fetch_add(n, Ordering::SeqCst);
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, received)
}

async fn read_exactly(s: &mut TcpStream, n: usize, within: Duration) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(within, s.read_exact(&mut buf))
        .await
        .expect("bytes within the deadline")
        .expect("read");
    buf
}

async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.unwrap();
    read_exactly(s, msg.len(), DEADLINE).await
}

#[tokio::test]
async fn pass_forwards_both_ways() {
    let (echo, _) = echo_server().await;
    let proxy = FaultProxy::start(echo);
    assert_eq!(
        proxy.endpoint("http"),
        format!("http://127.0.0.1:{}", proxy.port())
    );
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port()))
        .await
        .unwrap();
    assert_eq!(round_trip(&mut s, b"hello").await, b"hello");
    // Bigger than one read buffer, in order.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = s.into_split();
    let send = tokio::spawn({
        let big = big.clone();
        async move { w.write_all(&big).await.unwrap() }
    });
    let mut back = vec![0u8; big.len()];
    tokio::time::timeout(DEADLINE, r.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    send.await.unwrap();
    assert!(back == big, "bytes changed or reordered");
    assert_eq!(proxy.accepted(), 1);
}

#[tokio::test]
async fn blackhole_forwards_nothing_and_keeps_connections_open_until_healed() {
    let (echo, received) = echo_server().await;
    let proxy = FaultProxy::start(echo);
    let mut old = TcpStream::connect(("127.0.0.1", proxy.port()))
        .await
        .unwrap();
    assert_eq!(round_trip(&mut old, b"before").await, b"before");
    let before = received.load(Ordering::SeqCst);

    proxy.set_mode(Mode::Blackhole);
    // An existing connection: the write is accepted locally, nothing comes back, and the
    // connection is not closed either (a read would return 0 or an error).
    old.write_all(b"lost?").await.unwrap();
    let mut buf = [0u8; 16];
    assert!(
        tokio::time::timeout(SILENCE, old.read(&mut buf))
            .await
            .is_err(),
        "bytes or EOF through a blackhole"
    );
    // A new connection is accepted and never forwarded.
    let mut new = tokio::time::timeout(DEADLINE, TcpStream::connect(("127.0.0.1", proxy.port())))
        .await
        .unwrap()
        .unwrap();
    new.write_all(b"new").await.unwrap();
    assert!(
        tokio::time::timeout(SILENCE, new.read(&mut buf))
            .await
            .is_err(),
        "bytes or EOF through a blackhole"
    );
    assert_eq!(
        received.load(Ordering::SeqCst),
        before,
        "the target got bytes through a blackhole"
    );

    // Healed: what was held back arrives, on both connections.
    proxy.set_mode(Mode::Pass);
    assert_eq!(read_exactly(&mut old, 5, DEADLINE).await, b"lost?");
    assert_eq!(read_exactly(&mut new, 3, DEADLINE).await, b"new");
}

#[tokio::test]
async fn latency_delays_each_direction_and_keeps_order() {
    let (echo, _) = echo_server().await;
    let proxy = FaultProxy::start(echo);
    let mut s = TcpStream::connect(("127.0.0.1", proxy.port()))
        .await
        .unwrap();
    assert_eq!(round_trip(&mut s, b"warm").await, b"warm");
    let fast = {
        let t = Instant::now();
        round_trip(&mut s, b"x").await;
        t.elapsed()
    };

    let delay = Duration::from_millis(300);
    proxy.set_mode(Mode::Latency(delay));
    let t = Instant::now();
    assert_eq!(round_trip(&mut s, b"slow").await, b"slow");
    let rtt = t.elapsed();
    assert!(
        rtt >= 2 * delay,
        "round trip {rtt:?} under latency {delay:?} each way (unproxied {fast:?})"
    );
    assert!(
        rtt < 2 * delay + Duration::from_secs(2),
        "round trip {rtt:?} far beyond the latency"
    );

    // Many small writes in a row come back in order.
    let msgs: Vec<u8> = (0..100u8).collect();
    for m in &msgs {
        s.write_all(&[*m]).await.unwrap();
    }
    assert_eq!(read_exactly(&mut s, msgs.len(), DEADLINE).await, msgs);

    proxy.set_mode(Mode::Pass);
    let t = Instant::now();
    round_trip(&mut s, b"fast again").await;
    assert!(
        t.elapsed() < delay,
        "latency outlived its mode: {:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn reset_all_resets_every_connection_and_keeps_serving() {
    let (echo, _) = echo_server().await;
    let proxy = FaultProxy::start(echo);
    let mut a = TcpStream::connect(("127.0.0.1", proxy.port()))
        .await
        .unwrap();
    let mut b = TcpStream::connect(("127.0.0.1", proxy.port()))
        .await
        .unwrap();
    assert_eq!(round_trip(&mut a, b"a").await, b"a");
    assert_eq!(round_trip(&mut b, b"b").await, b"b");
    assert_eq!(proxy.connections(), 2);

    proxy.reset_all();
    for s in [&mut a, &mut b] {
        let mut buf = [0u8; 8];
        let err = tokio::time::timeout(DEADLINE, s.read(&mut buf))
            .await
            .expect("the reset arrives")
            .expect_err("a reset, not bytes or a clean EOF");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    }
    assert_eq!(proxy.connections(), 0);
    // The mode is untouched: a new connection works.
    let mut c = TcpStream::connect(("127.0.0.1", proxy.port()))
        .await
        .unwrap();
    assert_eq!(round_trip(&mut c, b"again").await, b"again");
}

#[tokio::test]
async fn a_dead_target_resets_the_client_and_a_dropped_proxy_closes_everything() {
    // Nothing listens on the target: the accepted client connection is reset.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let proxy = FaultProxy::start(dead);
    let mut buf = [0u8; 8];
    // The kernel completes the handshake before the proxy accepts, so the reset can land
    // before the connect future is polled to completion: then connect itself reports it
    // (SO_ERROR), otherwise the first read does. Either way it is a reset.
    let r = match TcpStream::connect(("127.0.0.1", proxy.port())).await {
        Err(e) => Err(e),
        Ok(mut s) => tokio::time::timeout(DEADLINE, s.read(&mut buf))
            .await
            .expect("closed within the deadline"),
    };
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{r:?}"
    );

    let (echo, _) = echo_server().await;
    let proxy = FaultProxy::start(echo);
    let port = proxy.port();
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    assert_eq!(round_trip(&mut s, b"x").await, b"x");
    drop(proxy);
    let r = tokio::time::timeout(DEADLINE, s.read(&mut buf))
        .await
        .expect("closed within the deadline");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    support::wait_until("the proxy's port to close", DEADLINE, || async {
        TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
            .then_some(())
    })
    .await;
}
