//! `chatd`: the chat daemon, one per identity.
//!
//! [`session`] is the pure state machine; [`daemon`] is the core task that
//! drives it; [`peer`], [`rendezvous`] and [`ipc`] move bytes to peers, the
//! server and shells; [`history`] keeps everything in SQLite.

mod config;
mod daemon;
mod history;
mod ipc;
mod peer;
mod rendezvous;
mod session;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use chat_proto::local;
use clap::Parser;
use interprocess::local_socket::traits::Stream as _;
use interprocess::local_socket::{GenericFilePath, ListenerOptions, ToFsName};
use tokio::sync::mpsc;

use crate::config::Options;
use crate::daemon::Core;
use crate::history::History;
use crate::session::{Config, Session};

fn main() -> ExitCode {
    let options = Options::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chatd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chatd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(options: Options) -> anyhow::Result<()> {
    let id = options.id;
    let socket = match &options.socket {
        Some(p) => {
            local::check_length(p)?;
            p.clone()
        }
        None => local::default_socket(&id)?,
    };
    refuse_if_running(&socket)?;
    let peers = peer::bind(options.port).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!(
                "peer port {} is already in use: choose another with --port",
                options.port
            )
        } else {
            anyhow::anyhow!("cannot listen for peers on port {}: {e}", options.port)
        }
    })?;
    // With --port 0 the system picks the port; the server must be told
    // the real one.
    let port = peers.local_addr().map(|a| a.port()).unwrap_or(options.port);
    let data_dir = match &options.data_dir {
        Some(d) => d.clone(),
        None => default_data_dir(&id)?,
    };
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let history = History::open(&data_dir.join("history.db"), id)?;
    let token = history.token(&options.server)?;

    let name = socket
        .as_path()
        .to_fs_name::<GenericFilePath>()
        .with_context(|| format!("bad socket path {}", socket.display()))?;
    let listener = listener_options(name)
        .create_tokio()
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    tracing::info!(%id, socket = %socket.display(), port, server = %options.server, "chatd ready");

    let (events, rx) = mpsc::channel(4096);
    let session = Session::new(
        Config::new(id, port, options.server.clone(), options.turns),
        token,
    );
    let mut core = Core::new(
        id,
        session,
        history,
        options.server.clone(),
        events.clone(),
        None,
    );
    if options.register {
        core.register_at_start();
    }
    tokio::spawn(peer::accept_loop(peers, events.clone()));
    tokio::spawn(ipc::accept_loop(listener, events.clone()));
    drop(events);
    core.run(rx, async {
        let signal = wait_for_signal().await;
        tracing::info!("{signal}: stopping");
    })
    .await;
    // The listener would remove its file when dropped; the runtime drops
    // the task holding it only after we return, so remove it now.
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

#[cfg(unix)]
fn listener_options(name: interprocess::local_socket::Name<'_>) -> ListenerOptions<'_> {
    use interprocess::os::unix::local_socket::ListenerOptionsExt;
    // Owner only: nobody else may drive this daemon. interprocess applies
    // the mode before bind, so there is no window with a wider one.
    ListenerOptions::new().name(name).mode(0o600)
}

#[cfg(not(unix))]
fn listener_options(name: interprocess::local_socket::Name<'_>) -> ListenerOptions<'_> {
    ListenerOptions::new().name(name)
}

/// A live daemon on `socket` is left alone; a stale socket left by a
/// crashed one (connection refused) is removed.
fn refuse_if_running(socket: &Path) -> anyhow::Result<()> {
    let name = socket.to_fs_name::<GenericFilePath>()?;
    match interprocess::local_socket::Stream::connect(name) {
        Ok(_) => bail!(
            "already running: a chatd answers on {}; stop it first, or give this one another --socket",
            socket.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            tracing::info!(socket = %socket.display(), "removing the stale socket of a daemon that is gone");
            std::fs::remove_file(socket)
                .with_context(|| format!("cannot remove the stale socket {}", socket.display()))?;
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| {
            format!(
                "cannot check whether a chatd already runs on {}",
                socket.display()
            )
        }),
    }
}

fn default_data_dir(id: &chat_proto::ClientId) -> anyhow::Result<PathBuf> {
    let dirs = directories::ProjectDirs::from("", "", "chat")
        .context("cannot find a home directory for the history: pass --data-dir")?;
    Ok(dirs.data_dir().join(id.as_str()))
}

async fn wait_for_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            },
            _ => {
                tracing::warn!("cannot handle signals; stop with SIGKILL");
                std::future::pending().await
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}
