//! The TCP listener: accept, apply the connection caps, hand each
//! connection to its own task.
//!
//! A connection over a cap still gets an answer (503 when the server is
//! full, 429 when its address holds too many), written by a short task of
//! its own; those tasks are capped too, and past that cap a connection is
//! simply closed, so a flood cannot make the server hold more sockets than
//! its limits say.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chat_proto::rendezvous::{ErrorStatus, Failure, Response, ResponseFraming};
use tokio::sync::{mpsc, watch};

use crate::connection::{self, Timeouts};
use crate::limits::{ConnRefusal, Source};
use crate::state::{State, lock};
use crate::stream::{Listener, Stream};

/// Most refused connections being answered at once.
const MAX_REFUSING: usize = 256;

/// Binds a listener the way a server should: address reuse so a restart
/// does not wait out TIME_WAIT, port reuse so each worker has a listener
/// of its own, and a deep backlog for bursts of transient connections.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    #[cfg(all(
        unix,
        not(any(target_os = "solaris", target_os = "illumos", target_os = "cygwin"))
    ))]
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        // `--bind ::` serves IPv4 too, as most servers do.
        let _ = socket.set_only_v6(false);
    }
    // Accepted sockets inherit TCP_NODELAY from the listener on Linux,
    // which saves a system call per connection.
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Accepts connections until shutdown.
pub async fn run(
    listener: std::net::TcpListener,
    state: Arc<State>,
    timeouts: Timeouts,
    mut shutdown: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
) {
    let mut listener = match Listener::new(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("cannot watch the listening socket: {e}");
            return;
        }
    };
    let refusing = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                accept_error(e).await;
                continue;
            }
        };
        // A trusted proxy carries many clients: it is held to
        // `--max-conns` only, and its clients to their request rates.
        let source = (!state.trusted_proxies.contains(peer.ip())).then(|| Source::from(peer.ip()));
        let opened = lock(&state.conns).open(source);
        match opened {
            Ok(()) => {
                // Counted out however the task ends, even by a panic.
                let slot = Slot {
                    state: Arc::clone(&state),
                    source,
                };
                let shutdown = shutdown.clone();
                let done = done.clone();
                tokio::spawn(async move {
                    connection::serve(stream, peer, &slot.state, timeouts, shutdown).await;
                    drop(done);
                });
                // An idle worker serves the new connection before it
                // tries to accept another. That accept nearly always finds
                // nothing then, and it came first: a system call between
                // the client's request and its answer. A busy worker
                // accepts on, as before (docs/BENCHMARKS.md).
                if listener.idle() {
                    let_queued_run().await;
                }
            }
            Err(refusal) => refuse(stream, peer, refusal, &refusing, &state),
        }
    }
}

/// Lets the tasks already queued (a connection just spawned) run before
/// this one goes on: the task wakes itself, which puts it at the back of
/// its worker's queue. `tokio::task::yield_now` would instead wait for the
/// next poll of the reactor, a system call of its own.
async fn let_queued_run() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            return std::task::Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await
}

/// A connection's place in the connection counts, given back on drop.
struct Slot {
    state: Arc<State>,
    source: Option<Source>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.state.conns).close(self.source);
    }
}

fn refuse(
    stream: Stream,
    peer: SocketAddr,
    refusal: ConnRefusal,
    refusing: &Arc<AtomicUsize>,
    state: &State,
) {
    if refusing.fetch_add(1, Ordering::Relaxed) >= MAX_REFUSING {
        refusing.fetch_sub(1, Ordering::Relaxed);
        return; // dropped: closed without a word
    }
    let failure = match refusal {
        ConnRefusal::ServerFull => {
            tracing::debug!(%peer, open = lock(&state.conns).total(), "refusing connection: server full");
            Failure {
                retry_after: Some(5),
                ..Failure::new(
                    ErrorStatus::Unavailable,
                    "server full: too many connections; retry later",
                )
            }
        }
        ConnRefusal::SourceFull => Failure {
            retry_after: Some(5),
            ..Failure::new(
                ErrorStatus::TooManyRequests,
                "too many connections from your address; close some and retry",
            )
        },
    };
    let refusing = Arc::clone(refusing);
    tokio::spawn(async move {
        let mut out = Vec::new();
        Response::Error(failure).encode(
            &mut out,
            &ResponseFraming {
                close: true,
                ..Default::default()
            },
        );
        let mut stream = stream;
        let deadline = tokio::time::Instant::now() + connection::LINGER_TIME;
        if stream.write_all(&out, deadline).await.is_ok() {
            connection::linger(stream).await;
        }
        refusing.fetch_sub(1, Ordering::Relaxed);
    });
}

/// Accept fails mostly when the process is out of file descriptors; the
/// pending connection stays queued, so pause instead of spinning on it.
async fn accept_error(e: io::Error) {
    let exhausted = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
    if exhausted {
        tracing::warn!("accept failed: {e}; out of file descriptors, pausing for 100 ms");
        tokio::time::sleep(Duration::from_millis(100)).await;
    } else {
        tracing::debug!("accept failed: {e}");
    }
}
