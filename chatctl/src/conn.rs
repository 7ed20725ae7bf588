//! One connection to a daemon's control socket, with blocking IO.
//!
//! chatctl is a short-lived process; plain blocking reads and writes start
//! faster than any async runtime, which is most of what `chatctl send`
//! costs.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chat_proto::ClientId;
use chat_proto::frame::{Decoder, encode};
use chat_proto::ipc::{
    ClientFrame, DaemonFrame, Failure, Hello, MAX_FRAME, Record, Reply, Request, Status, VERSION,
};
use chat_proto::local;
use interprocess::local_socket::traits::Stream as _;
use interprocess::local_socket::{GenericFilePath, Stream, ToFsName};

/// What went wrong, with the exit status it maps to.
#[derive(Debug)]
pub enum Error {
    /// No daemon could be reached (exit 3).
    Unreachable(String),
    /// The daemon refused or the operation failed (exit 1).
    Failed(String),
    /// The command line was wrong (exit 2).
    Usage(String),
    /// chatd did not answer within the read timeout set on the connection
    /// (exit 1).
    TimedOut,
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Failed(_) | Error::TimedOut => 1,
            Error::Usage(_) => 2,
            Error::Unreachable(_) => 3,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Error::Unreachable(m) | Error::Failed(m) | Error::Usage(m) => m,
            Error::TimedOut => "chatd did not answer in time",
        }
    }
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Error {
        Error::Failed(f.message)
    }
}

/// The control socket to use: `--socket`, else the daemon `--id` names,
/// else `CHATD_SOCKET`, else the only daemon running. (`CHATD_SOCKET` is
/// read here rather than by clap, so that `--id` can override it without
/// the two counting as conflicting flags.)
pub fn resolve_socket(given: Option<PathBuf>, id: Option<ClientId>) -> Result<PathBuf, Error> {
    if let Some(p) = given {
        return Ok(p);
    }
    if id.is_none()
        && let Some(p) = std::env::var_os("CHATD_SOCKET").filter(|p| !p.is_empty())
    {
        return Ok(PathBuf::from(p));
    }
    let found = local::list_sockets();
    let choices = || {
        let list: Vec<String> = found
            .iter()
            .map(|(id, p)| format!("  {id}: chatctl --id {id}  (--socket {})", p.display()))
            .collect();
        list.join("\n")
    };
    let none_running = |id: &str| {
        Error::Unreachable(format!(
            "no chatd is running: no socket in {}\n{}",
            local::socket_dir_name().display(),
            start_hint(id)
        ))
    };
    if let Some(id) = id {
        let id = id.to_string();
        return match found.iter().find(|(running, _)| *running == id) {
            Some((_, p)) => Ok(p.clone()),
            None if found.is_empty() => Err(none_running(&id)),
            None => Err(Error::Unreachable(format!(
                "no chatd with id {id} is running; these are:\n{}\n{}",
                choices(),
                start_hint(&id)
            ))),
        };
    }
    match found.len() {
        1 => Ok(found.into_iter().next().map(|(_, p)| p).unwrap_or_default()),
        0 => Err(none_running("ID")),
        _ => Err(Error::Usage(format!(
            "several daemons are running; choose one with --id (or --socket, or CHATD_SOCKET):\n{}",
            choices()
        ))),
    }
}

fn is_socket(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        true
    }
}

/// How to start a daemon, for messages.
pub fn start_hint(id: &str) -> String {
    format!(
        "start one with `chatd --id {id} --port PORT --server HOST:PORT`, or `systemctl --user start chatd@{id}`"
    )
}

/// How long chatctl waits for a daemon's hello. A live daemon says it at
/// once; one that is stopped (SIGSTOP, a debugger) or wedged accepts the
/// connection in the kernel and then says nothing, forever.
const HELLO_WAIT: Duration = Duration::from_secs(5);

/// An open connection.
///
/// Our hello goes out with the first request, in one write, and the
/// daemon's hello is checked when the first answer is read: a command
/// then costs one round trip to the daemon, not two.
pub struct Conn {
    // Shared with a [`Sender`], for `send -`, which writes from one thread
    // while another reads.
    stream: Arc<Stream>,
    decoder: Decoder,
    next_id: u64,
    /// Bytes not yet written (our hello, until the first request).
    pending: Vec<u8>,
    greeted: bool,
    /// For messages.
    path: PathBuf,
    /// What reads wait for once the hello is in (`None`: forever).
    read_timeout: Option<Duration>,
}

impl Conn {
    /// Connects and exchanges versions.
    pub fn open(path: &Path) -> Result<Conn, Error> {
        let name = path
            .to_fs_name::<GenericFilePath>()
            .map_err(|e| Error::Usage(format!("bad socket path {}: {e}", path.display())))?;
        let stream = Stream::connect(name).map_err(|e| {
            let id = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("ID")
                .to_owned();
            let is_socket = is_socket(path);
            let why = match e.kind() {
                std::io::ErrorKind::NotFound => "no such socket".to_owned(),
                std::io::ErrorKind::ConnectionRefused if !is_socket => {
                    "it is not a socket".to_owned()
                }
                std::io::ErrorKind::ConnectionRefused => {
                    "connection refused (the daemon that made it is gone)".to_owned()
                }
                _ => e.to_string(),
            };
            // A socket in the default place is found by id; another needs
            // chatd told where to make it.
            let default = id
                .parse::<chat_proto::ClientId>()
                .ok()
                .map(|i| chat_proto::local::default_socket_name(&i));
            let hint = if default.as_deref() == Some(path) {
                start_hint(&id)
            } else {
                format!(
                    "start one with `chatd --id {id} --port PORT --server HOST:PORT --socket {}`",
                    path.display()
                )
            };
            Error::Unreachable(format!(
                "cannot reach chatd at {}: {why}\n{hint}",
                path.display()
            ))
        })?;
        let mut pending = Vec::new();
        encode(&Hello::ours("chatctl"), MAX_FRAME, &mut pending)
            .map_err(|e| Error::Failed(e.to_string()))?;
        Ok(Conn {
            stream: Arc::new(stream),
            decoder: Decoder::new(MAX_FRAME),
            next_id: 1,
            pending,
            greeted: false,
            path: path.to_owned(),
            read_timeout: None,
        })
    }

    /// Reads the daemon's hello, once, before anything else it sent.
    fn greet(&mut self) -> Result<(), Error> {
        if self.greeted {
            return Ok(());
        }
        self.flush()?;
        // The caller's own deadline, when it comes first, is the one kept.
        let callers = self.read_timeout.filter(|t| *t <= HELLO_WAIT);
        let wait = callers.unwrap_or(HELLO_WAIT);
        self.recv_timeout(Some(wait))?;
        let theirs: Hello = match self.read_frame() {
            Ok(hello) => hello,
            Err(ReadError::Other(Error::TimedOut)) if callers.is_some() => {
                return Err(Error::TimedOut);
            }
            Err(ReadError::Other(Error::TimedOut)) => {
                // A socket systemd holds accepts even while the daemon
                // behind it fails to start.
                let unit = self
                    .path
                    .file_stem()
                    .map(|id| format!(", or, started by systemd from its socket, failing to start (systemctl --user status chatd@{})", id.to_string_lossy()))
                    .unwrap_or_default();
                return Err(Error::Unreachable(format!(
                    "chatd at {} does not answer: nothing within {} s of connecting; it may be stopped (kill -CONT its pid), wedged (restart it){unit}",
                    self.path.display(),
                    HELLO_WAIT.as_secs()
                )));
            }
            // Its first bytes are not a hello: something else listens there.
            Err(ReadError::Undecodable(why)) => {
                return Err(Error::Failed(format!(
                    "{} does not speak chatd's control protocol ({why}); is it a chatd socket?",
                    self.path.display(),
                )));
            }
            Err(ReadError::Other(e)) => return Err(e),
        }
        .ok_or_else(|| Error::Failed("chatd closed the connection before saying hello".into()))?;
        self.recv_timeout(self.read_timeout)?;
        if theirs.protocol != VERSION {
            return Err(Error::Failed(format!(
                "chatctl {} speaks control protocol v{VERSION} but {} speaks v{}: use the chatctl that came with that chatd, or restart chatd after upgrading",
                env!("CARGO_PKG_VERSION"),
                theirs.software,
                theirs.protocol
            )));
        }
        self.greeted = true;
        Ok(())
    }

    /// Sends a request; returns its number.
    pub fn send(&mut self, request: Request) -> Result<u64, Error> {
        let id = self.next_id;
        self.next_id += 1;
        self.write(&ClientFrame { id, request })?;
        Ok(id)
    }

    /// One request, its records passed to `on_record`, then its reply.
    pub fn call(
        &mut self,
        request: Request,
        mut on_record: impl FnMut(Record),
    ) -> Result<Reply, Error> {
        let id = self.send(request)?;
        loop {
            match self.next_frame()? {
                DaemonFrame::Record { id: rid, record } if rid == id => on_record(record),
                DaemonFrame::Reply { id: rid, result } if rid == id => {
                    return result.map_err(Error::from);
                }
                _ => {}
            }
        }
    }

    /// The next frame from the daemon.
    pub fn next_frame(&mut self) -> Result<DaemonFrame, Error> {
        self.greet()?;
        match self.read::<DaemonFrame>()? {
            Some(DaemonFrame::Dropped { reason }) => Err(Error::Failed(format!("chatd: {reason}"))),
            Some(frame) => Ok(frame),
            None => Err(Error::Failed(
                "chatd closed the connection (it may have stopped)".into(),
            )),
        }
    }

    /// A second handle that sends requests while this one reads the
    /// answers (from another thread). Our hello goes out first.
    pub fn sender(&mut self) -> Result<Sender, Error> {
        self.flush()?;
        // The sender numbers its requests far from ours.
        Ok(Sender {
            stream: Arc::clone(&self.stream),
            next_id: 1 << 32,
        })
    }

    /// Bounds how long reads wait (`None`: forever).
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) -> Result<(), Error> {
        self.read_timeout = timeout;
        self.recv_timeout(timeout)
    }

    /// The daemon's status.
    pub fn status(&mut self) -> Result<Status, Error> {
        match self.call(Request::Status, |_| {})? {
            Reply::Status(s) => Ok(s),
            other => Err(Error::Failed(format!(
                "chatd answered status with {other:?}"
            ))),
        }
    }

    /// Sets the socket's receive timeout, leaving `read_timeout` as it is.
    fn recv_timeout(&self, timeout: Option<Duration>) -> Result<(), Error> {
        self.stream
            .set_recv_timeout(timeout)
            .map_err(|e| Error::Failed(format!("cannot set a timeout on the control socket: {e}")))
    }

    fn write<T: serde::Serialize>(&mut self, value: &T) -> Result<(), Error> {
        encode_frame(value, &mut self.pending)?;
        self.flush()
    }

    fn flush(&mut self) -> Result<(), Error> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let result = (&*self.stream).write_all(&self.pending);
        self.pending.clear();
        result.map_err(lost)
    }

    fn read<T: serde::de::DeserializeOwned>(&mut self) -> Result<Option<T>, Error> {
        self.read_frame().map_err(|e| match e {
            ReadError::Undecodable(why) => {
                Error::Failed(format!("unexpected data from chatd: {why}"))
            }
            ReadError::Other(e) => e,
        })
    }

    /// The next frame, or `None` at the end of the stream; a frame that
    /// does not decode is told apart, as the hello needs.
    fn read_frame<T: serde::de::DeserializeOwned>(&mut self) -> Result<Option<T>, ReadError> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.decoder.decode::<T>() {
                Ok(Some(v)) => return Ok(Some(v)),
                Ok(None) => {}
                Err(e) => return Err(ReadError::Undecodable(e.to_string())),
            }
            match (&*self.stream).read(&mut chunk) {
                Ok(0) => {
                    return self
                        .decoder
                        .finish()
                        .map(|()| None)
                        .map_err(|e| ReadError::Other(lost(e)));
                }
                Ok(n) => self.decoder.extend(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(ReadError::Other(Error::TimedOut));
                }
                Err(e) => return Err(ReadError::Other(lost(e))),
            }
        }
    }
}

/// Why a frame could not be read: it did not decode, or anything else.
enum ReadError {
    Undecodable(String),
    Other(Error),
}

/// Appends `value` to `out` as one frame.
fn encode_frame<T: serde::Serialize>(value: &T, out: &mut Vec<u8>) -> Result<(), Error> {
    encode(value, MAX_FRAME, out).map_err(|e| Error::Failed(e.to_string()))
}

fn lost(e: impl std::fmt::Display) -> Error {
    Error::Failed(format!("lost the connection to chatd: {e}"))
}

/// Sends requests on a connection whose answers another thread reads.
pub struct Sender {
    stream: Arc<Stream>,
    next_id: u64,
}

impl Sender {
    /// Sends a request. `numbered` learns its number before it is
    /// written, so that its answer never comes for a number nobody knows.
    pub fn send(&mut self, request: Request, numbered: impl FnOnce(u64)) -> Result<(), Error> {
        let id = self.next_id;
        self.next_id += 1;
        let mut out = Vec::new();
        encode_frame(&ClientFrame { id, request }, &mut out)?;
        numbered(id);
        (&*self.stream).write_all(&out).map_err(lost)
    }
}
