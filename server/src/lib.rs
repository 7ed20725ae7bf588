//! `chat-server`: the rendezvous server, as a library so that its pure
//! parts can be tested and reused.
//!
//! The pure parts are [`registry`], [`limits`] and [`replay`]; [`tcp`],
//! [`connection`] and [`udp`] drive them over sockets; [`state`] is what
//! the transports share.

pub mod config;
pub mod connection;
pub mod limits;
pub mod registry;
pub mod replay;
pub mod state;
pub mod tcp;
pub mod udp;

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use chat_proto::rendezvous::Transports;
use tokio::sync::{mpsc, watch};

use crate::config::{Options, Transport};
use crate::state::State;

/// How long shutdown waits for connections that are mid-request.
const DRAIN_TIME: Duration = Duration::from_secs(5);
/// How often lapsed registrations and idle rate buckets are dropped.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Runs the server until SIGINT or SIGTERM.
pub async fn run(options: Options) -> anyhow::Result<()> {
    // Transient connections cost a descriptor each while they close; use
    // all the kernel allows us rather than the shell's default of 1024.
    if let Ok(n) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::debug!("file descriptor limit: {n}");
    }
    let transport = options.transport();
    let transports = Transports {
        tcp: transport != Transport::Udp,
        udp: transport != Transport::Tcp,
    };
    let state = Arc::new(State::new(transports, &options.limits()));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);

    let mut addr = SocketAddr::new(options.bind, options.port);
    let mut tasks = Vec::new();
    if transports.tcp {
        let listener = tcp::bind(addr).with_context(|| format!("cannot listen on TCP {addr}"))?;
        // With --port 0, UDP takes the port TCP was given.
        addr = listener.local_addr()?;
        announce(addr, "tcp");
        tasks.push(tokio::spawn(tcp::run(
            listener,
            Arc::clone(&state),
            options.timeouts(),
            shutdown_rx.clone(),
            done_tx.clone(),
        )));
    }
    if transports.udp {
        let socket = udp::bind(addr).with_context(|| format!("cannot listen on UDP {addr}"))?;
        addr = socket.local_addr()?;
        announce(addr, "udp");
        tasks.push(tokio::spawn(udp::run(
            socket,
            Arc::clone(&state),
            shutdown_rx.clone(),
        )));
    }
    drop(done_tx);

    let sweeper = {
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            loop {
                tick.tick().await;
                let dropped = state.sweep();
                if dropped > 0 {
                    tracing::debug!(
                        dropped,
                        live = state.registrations(),
                        "lapsed registrations dropped"
                    );
                }
            }
        })
    };

    let signal = wait_for_signal().await?;
    tracing::info!("{signal}: shutting down");
    let _ = shutdown_tx.send(true);
    sweeper.abort();
    for t in tasks {
        let _ = t.await;
    }
    // Every connection task holds a clone of `done`; when all are gone,
    // recv returns None.
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
}

fn announce(addr: SocketAddr, transport: &str) {
    tracing::info!(%addr, transport, "listening");
    // On stdout too, for scripts and tests that started us with --port 0.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "listening on {addr} ({transport})");
    let _ = out.flush();
}

async fn wait_for_signal() -> anyhow::Result<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        tokio::select! {
            _ = term.recv() => Ok("SIGTERM"),
            _ = int.recv() => Ok("SIGINT"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c()
            .await
            .context("cannot handle Ctrl-C")?;
        Ok("Ctrl-C")
    }
}
