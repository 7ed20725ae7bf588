//! `chat-server`: the rendezvous server, as a library so that its pure
//! parts can be tested and reused.
//!
//! The pure parts are [`registry`], [`limits`], [`replay`] and
//! [`defer`]; [`tcp`], [`connection`] and [`udp`] drive them over sockets;
//! [`state`] is what the transports share.

pub mod busy_poll;
pub mod config;
pub mod connection;
pub mod defer;
pub mod index;
pub mod limits;
pub mod proxy;
pub mod registry;
pub mod replay;
pub mod state;
pub mod stream;
pub mod tcp;
pub mod udp;

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chat_proto::rendezvous::Transports;
use tokio::sync::{mpsc, watch};

use crate::config::{Settings, Transport};
use crate::state::State;

/// How long shutdown waits for connections that are mid-request.
const DRAIN_TIME: Duration = Duration::from_secs(5);
/// How often lapsed registrations and idle rate buckets are dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Runs the server until SIGINT or SIGTERM.
///
/// The server runs as nginx does: one worker thread per core, each with
/// its own single-threaded runtime and its own listening sockets in a
/// SO_REUSEPORT group, so the kernel spreads connections over the workers
/// and a connection lives on the thread that accepted it, with no
/// cross-thread wake-ups. The registry is the one thing they share.
pub fn run(settings: Settings) -> anyhow::Result<()> {
    if let Some(path) = &settings.config {
        tracing::info!(config = %path.display(), "configuration read");
    }
    if !settings.trusted_proxies.is_empty() {
        let proxies = settings.trusted_proxies.describe();
        tracing::info!("believing X-Forwarded-For over TCP from {proxies}");
        if settings.trusted_proxies.trusts_everyone() {
            tracing::warn!(
                "--trusted-proxy {proxies} trusts every address: any client can claim any address; name the proxy's own address instead"
            );
        }
    }
    // Transient connections cost a descriptor each while they close; use
    // all the kernel allows us rather than the shell's default of 1024.
    if let Ok(n) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::debug!("file descriptor limit: {n}");
    }
    // Signals are caught from here on, before anything says the server is
    // up: a SIGTERM that follows the "listening" line or READY=1 at once
    // must still shut it down cleanly, not kill it.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let stop = {
        let _context = runtime.enter();
        chat_proto::signals::catch().context("cannot catch SIGTERM and SIGINT")?
    };
    let transport = settings.transport;
    let transports = Transports {
        tcp: transport != Transport::Udp,
        udp: transport != Transport::Tcp,
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = match settings.workers {
        0 => cores,
        n => n,
    };
    let state = Arc::new(State::new(transports, &settings.limits()));
    let polling = Arc::new(busy_poll::Shared::for_this_process(
        settings.busy_poll,
        cores,
    ));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    // Bind every socket before starting anything, so that a port in use is
    // an error at start-up, not a dead worker later.
    // SO_REUSEPORT would let us join a group another chat-server of the
    // same user already holds and silently split its traffic; a plain bind
    // first tells that the port is taken (and picks one for --port 0, which
    // every worker then shares).
    let addr = exclusive_probe(SocketAddr::new(settings.bind, settings.port), transports)?;
    let mut sockets: Vec<(Option<std::net::TcpListener>, Option<std::net::UdpSocket>)> = Vec::new();
    for i in 0..workers {
        let tcp = if transports.tcp {
            Some(tcp::bind(addr).map_err(|e| cannot_listen(e, "TCP", addr))?)
        } else {
            None
        };
        let udp = if transports.udp {
            Some(udp::bind(addr).map_err(|e| cannot_listen(e, "UDP", addr))?)
        } else {
            None
        };
        if i == 0 {
            if tcp.is_some() {
                announce(addr, "tcp");
            }
            if udp.is_some() {
                announce(addr, "udp");
            }
        }
        sockets.push((tcp, udp));
    }

    let mut threads = Vec::new();
    for (i, (tcp, udp)) in sockets.into_iter().enumerate() {
        let state = Arc::clone(&state);
        let polling = Arc::clone(&polling);
        let shutdown = shutdown_rx.clone();
        let timeouts = settings.timeouts();
        let thread = std::thread::Builder::new()
            .name(format!("worker-{i}"))
            .spawn(move || {
                let ended = worker(
                    tcp,
                    udp,
                    state,
                    polling,
                    timeouts,
                    udp::REPLAY_BYTES / workers,
                    shutdown,
                );
                // Said when it happens, not at shutdown: the other workers
                // go on serving, so nothing else would show it.
                if let Err(e) = &ended {
                    tracing::error!("worker {i} stopped: {e:#}");
                }
                ended
            })
            .context("cannot start a worker thread")?;
        threads.push(thread);
    }

    // Every socket is bound and every worker started: ready (Type=notify).
    notify_ready(addr);
    let signal = runtime.block_on(async {
        let sweeper = async {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            loop {
                tick.tick().await;
                let started = std::time::Instant::now();
                let dropped = state.sweep();
                if dropped > 0 {
                    tracing::debug!(
                        dropped,
                        live = state.registrations(),
                        took_ms = started.elapsed().as_millis() as u64,
                        "lapsed registrations dropped"
                    );
                }
            }
        };
        let watcher = async {
            if polling.enabled() {
                busy_poll::watch_spare(&polling).await;
            }
            std::future::pending::<()>().await;
        };
        tokio::select! {
            s = stop => s,
            () = sweeper => unreachable!("the sweeper never ends"),
            () = watcher => unreachable!("the watcher never ends"),
        }
    });
    tracing::info!("{signal}: shutting down");
    notify_stopping();
    let _ = shutdown_tx.send(true);
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// One worker thread: its listeners, its connections, until shutdown.
fn worker(
    tcp: Option<std::net::TcpListener>,
    udp: Option<std::net::UdpSocket>,
    state: Arc<State>,
    polling: Arc<busy_poll::Shared>,
    timeouts: connection::Timeouts,
    replay_bytes: usize,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a worker's runtime")?;
    runtime.block_on(async move {
        let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
        if polling.enabled() {
            // Not awaited: it ends with the runtime.
            tokio::spawn(async move { busy_poll::spin(&polling).await });
        }
        let mut tasks = Vec::new();
        if let Some(listener) = tcp {
            tasks.push(tokio::spawn(tcp::run(
                listener,
                Arc::clone(&state),
                timeouts,
                shutdown.clone(),
                done_tx.clone(),
            )));
        }
        if let Some(u) = udp {
            let socket = tokio::net::UdpSocket::from_std(u)?;
            tasks.push(tokio::spawn(udp::run(
                socket,
                Arc::clone(&state),
                replay_bytes,
                shutdown.clone(),
            )));
        }
        drop(done_tx);
        for t in tasks {
            let _ = t.await;
        }
        // Every connection task holds a clone of `done`; when all are
        // gone, recv returns None.
        if tokio::time::timeout(DRAIN_TIME, done_rx.recv())
            .await
            .is_err()
        {
            tracing::warn!(
                "connections still open after {} s; closing them",
                DRAIN_TIME.as_secs()
            );
        }
        Ok(())
    })
}
/// Binds `addr` without SO_REUSEPORT for each transport, then lets go:
/// fails if anything holds the port, and returns the address with the port
/// the kernel picked when asked for port 0.
fn exclusive_probe(addr: SocketAddr, transports: Transports) -> anyhow::Result<SocketAddr> {
    // With --port 0 a port free for TCP may be taken for UDP; try a few.
    for _ in 0..16 {
        let tcp = if transports.tcp {
            let l = std::net::TcpListener::bind(addr).map_err(|e| cannot_listen(e, "TCP", addr))?;
            Some(l)
        } else {
            None
        };
        let picked = match &tcp {
            Some(l) => l.local_addr()?,
            None => addr,
        };
        if !transports.udp {
            return Ok(picked);
        }
        match std::net::UdpSocket::bind(picked) {
            Ok(u) => return Ok(u.local_addr()?),
            Err(e) if addr.port() != 0 => {
                return Err(cannot_listen(e, "UDP", picked));
            }
            Err(_) => continue,
        }
    }
    anyhow::bail!(
        "cannot find a port free for both TCP and UDP on {}",
        addr.ip()
    )
}

/// Tells systemd (when it started us with Type=notify) that we serve.
#[cfg(unix)]
fn notify_ready(addr: SocketAddr) {
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!("serving on {addr}")),
    ]);
}

#[cfg(unix)]
fn notify_stopping() {
    notify(&[sd_notify::NotifyState::Stopping]);
}

#[cfg(unix)]
fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("cannot notify systemd: {e}");
    }
}

// Without systemd (not Unix) there is no one to tell.
#[cfg(not(unix))]
fn notify_ready(_addr: SocketAddr) {}
#[cfg(not(unix))]
fn notify_stopping() {}

fn announce(addr: SocketAddr, transport: &str) {
    // The line on stdout says it already (and reaches the journal too).
    tracing::debug!(%addr, transport, "listening");
    // On stdout too, for scripts and tests that started us with --port 0.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "listening on {addr} ({transport})");
    let _ = out.flush();
}

/// Why the server cannot listen on `addr`, with what to do about it.
fn cannot_listen(e: std::io::Error, transport: &str, addr: SocketAddr) -> anyhow::Error {
    let hint = match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            "; another program (another chat-server?) holds that port: stop it, or choose another --port"
        }
        std::io::ErrorKind::PermissionDenied if addr.port() < 1024 => {
            "; ports below 1024 need privilege: choose --port 1024 or higher"
        }
        std::io::ErrorKind::AddrNotAvailable => {
            "; that address is not one of this machine's: check --bind"
        }
        _ => "",
    };
    anyhow::anyhow!("cannot listen on {transport} {addr}: {e}{hint}")
}
