//! chatd, the chat daemon, as a library: `main.rs` only parses the command
//! line and calls [`run`]; `chatctl man` renders the man page from
//! [`config::Options`].
//!
//! [`session`] is the pure state machine; [`daemon`] is the core task that
//! drives it; [`peer`], [`rendezvous`] and [`ipc`] move bytes to peers, the
//! server and shells; [`history`] keeps everything in SQLite; [`systemd`]
//! speaks the service manager's protocols.

pub mod config;
pub mod daemon;
pub mod history;
pub mod ipc;
pub mod peer;
pub mod rendezvous;
pub mod session;
pub mod systemd;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use chat_proto::local;
use interprocess::local_socket::traits::Stream as _;
use interprocess::local_socket::{GenericFilePath, ListenerOptions, ToFsName};
use tokio::sync::mpsc;

use crate::config::Settings;
use crate::daemon::Core;
use crate::history::History;
use crate::session::{Config, Session};

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let id = settings.id;
    // Peers, shells and the server each hold descriptors: use what the
    // system allows rather than the shell's default of 1024.
    if let Ok(n) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::debug!("file descriptor limit: {n}");
    }
    if let Some(path) = &settings.config {
        tracing::info!(config = %path.display(), "configuration read");
    }
    // Signals are caught from here on, before the control socket says the
    // daemon is up: a SIGTERM right after that must still stop it cleanly
    // (socket file removed, peer told), not kill it.
    let caught = chat_proto::signals::catch()
        .inspect_err(|e| tracing::warn!("cannot catch SIGTERM and SIGINT: {e}; stop with SIGKILL"))
        .ok();
    // Under socket activation the socket is systemd's: take it, and leave
    // its file alone on the way out.
    let activated = systemd::activated_listener()?;
    let socket = match &settings.socket {
        Some(p) => {
            local::check_length(p)?;
            p.clone()
        }
        None => local::default_socket(&id)?,
    };
    if activated.is_none() {
        refuse_if_running(&socket)?;
    }
    let peers = peer::bind(settings.bind, settings.port).map_err(|e| {
        let p = settings.port;
        // Where it listens, said two ways: "127.0.0.1:4000" and "4000 on
        // 127.0.0.1", or "port 4000" and "4000".
        let (on, port) = match settings.bind {
            Some(ip) => (std::net::SocketAddr::new(ip, p).to_string(), format!("{p} on {ip}")),
            None => (format!("port {p}"), p.to_string()),
        };
        if e.kind() == std::io::ErrorKind::AddrInUse {
            // The port this daemon listens on for peers, not a peer's.
            anyhow::anyhow!(
                "the peer port {port} (where this daemon listens for peers) is already in use: choose another with --port, or 0 for any free one"
            )
        } else if settings.bind.is_some() {
            anyhow::anyhow!(
                "cannot listen for peers on {on}: {e}; --bind must be an address of this host"
            )
        } else {
            anyhow::anyhow!("cannot listen for peers on {on}: {e}")
        }
    })?;
    // With --port 0 the system picks the port; the server must be told
    // the real one.
    let port = peers
        .local_addr()
        .map(|a| a.port())
        .unwrap_or(settings.port);
    let data_dir = match &settings.data_dir {
        Some(d) => d.clone(),
        None => default_data_dir(&id)?,
    };
    create_private_dir(&data_dir)?;
    let mut history = History::open(&data_dir.join("history.db"), id)?;
    let token = history.token(&settings.server)?;
    let unconfirmed = history.settle_unconfirmed()?;

    let (listener, owned_socket) = match activated {
        Some(listener) => {
            tracing::info!("using the control socket systemd passed (socket activation)");
            (listener, None)
        }
        None => {
            let name = socket
                .as_path()
                .to_fs_name::<GenericFilePath>()
                .with_context(|| format!("bad socket path {}", socket.display()))?;
            let listener = listener_options(name)
                .create_tokio()
                .with_context(|| format!("cannot listen on {}", socket.display()))?;
            (listener, Some(socket.clone()))
        }
    };
    tracing::info!(%id, socket = %socket.display(), port, server = %settings.server, "chatd ready");

    let (events, rx) = mpsc::channel(4096);
    let session = Session::new(
        Config::new(id, port, settings.server.clone(), settings.turns),
        token,
    );
    let mut core = Core::new(
        id,
        session,
        history,
        rendezvous::Client::new(settings.server.clone()).from_source(settings.bind),
        events.clone(),
        Some(Box::new(systemd::report_status)),
    );
    core.started(unconfirmed);
    if settings.register {
        core.register_at_start();
    }
    tokio::spawn(peer::accept_loop(peers, events.clone()));
    tokio::spawn(ipc::accept_loop(listener, events.clone()));
    drop(events);
    // The control socket and the peer port are open: ready to serve.
    systemd::notify_ready(&format!("{id}: idle, peers on port {port}"));
    core.run(rx, async {
        let signal = match caught {
            Some(signal) => signal.await,
            None => std::future::pending().await,
        };
        tracing::info!("{signal}: stopping");
        systemd::notify_stopping();
    })
    .await;
    // The listener would remove its file when dropped; the runtime drops
    // the task holding it only after we return, so remove it now.
    if let Some(path) = owned_socket {
        let _ = std::fs::remove_file(path);
    }
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
/// crashed one (connection refused) is removed. Anything else at that
/// path is refused: Linux refuses a connection to a regular file too, and
/// a mistyped `--socket` must not delete someone's file.
fn refuse_if_running(socket: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    if let Ok(meta) = std::fs::symlink_metadata(socket) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            let what = if meta.is_dir() {
                "a directory"
            } else if meta.file_type().is_symlink() {
                "a symbolic link"
            } else {
                "a file that is not a socket"
            };
            bail!(
                "{} is {what}, not a chatd socket; chatd replaces only sockets: give another --socket (or socket in the configuration file)",
                socket.display()
            );
        }
    }
    let name = socket.to_fs_name::<GenericFilePath>()?;
    match interprocess::local_socket::Stream::connect(name) {
        Ok(_) => bail!(
            "already running: something (a chatd, most likely) answers on {}; stop it first, or give this one another --socket",
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

/// Makes the data directory private to its owner, whether it is new or
/// was given: it holds private conversations. One that is a symlink or
/// belongs to someone else is refused; one open to others is closed.
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
    }
    #[cfg(unix)]
    {
        use chat_proto::local::PathError;
        use std::os::unix::fs::PermissionsExt;
        let mode_before = std::fs::metadata(dir).map(|m| m.permissions().mode() & 0o777);
        chat_proto::local::ensure_private_dir(dir).map_err(|e| match e {
            PathError::Unsafe { .. } => anyhow::anyhow!(
                "{e}: the data directory holds private conversations; choose another --data-dir (or data-dir in the configuration file)"
            ),
            // Already says what it could not create, and why.
            other => anyhow::anyhow!("data directory: {other}"),
        })?;
        if let Ok(before) = mode_before
            && before & 0o077 != 0
        {
            // Said, not done silently: the user named this directory.
            tracing::warn!(
                "made the data directory {} private to you (mode {before:o} -> 700): it holds your conversations",
                dir.display()
            );
        }
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
    Ok(())
}

fn default_data_dir(id: &chat_proto::ClientId) -> anyhow::Result<PathBuf> {
    let dirs = directories::ProjectDirs::from("", "", "chat")
        .context("cannot find a home directory for the history: pass --data-dir")?;
    Ok(dirs.data_dir().join(id.as_str()))
}
