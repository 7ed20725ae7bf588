//! What the integration tests of every package share: finding the real
//! binaries, starting a chat-server on 127.0.0.1, and stopping processes
//! and waiting for them with bounds, so that a hung binary fails a test
//! instead of hanging CI. A dev-dependency only; never shipped.

pub mod http;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// The longest any one wait may take; generous for slow, loaded machines.
pub const WAIT: Duration = Duration::from_secs(30);

/// A binary of a workspace package, from the directory cargo put it in
/// (`target/debug`). `cargo test --workspace` builds them all before any
/// test runs; a binary older than its sources is refused rather than
/// silently tested.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/TEST-HASH -> target/debug
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let hint = "run the tests with `cargo test --workspace`, or `cargo build --bins` first";
    let built = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("{} is missing: {hint}", path.display()));
    let package = match name {
        "chat-server" => "server",
        other => other,
    };
    // Its own sources, and the protocol crate every binary is built on.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for src in [
        root.join(package).join("src"),
        root.join("proto").join("src"),
    ] {
        if newest(&src).is_some_and(|t| t > built) {
            panic!(
                "{} is older than its sources in {}: {hint}",
                path.display(),
                src.display()
            );
        }
    }
    path
}

/// The newest modification time below `dir`; an entry that cannot be read
/// is skipped rather than hiding all the others.
fn newest(dir: &Path) -> Option<SystemTime> {
    let mut best = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let p = entry.path();
        let t = if p.is_dir() {
            newest(&p)
        } else {
            entry.metadata().and_then(|m| m.modified()).ok()
        };
        best = best.max(t);
    }
    best
}

/// Gives `cmd` a home of its own below `home`: runtime, data and config
/// directories (the runtime one created, private), and `HOME`, so that a
/// daemon or CLI under test touches nothing of the user running the tests.
pub fn isolate<'c>(cmd: &'c mut Command, home: &Path) -> &'c mut Command {
    let run = home.join("run");
    std::fs::create_dir_all(&run).expect("create the runtime directory");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700))
            .expect("make the runtime directory private");
    }
    cmd.env("XDG_RUNTIME_DIR", run)
        .env("XDG_DATA_HOME", home.join("data"))
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("HOME", home)
}

/// Checks that a finished command exited with `code` and said `needle` on
/// stderr (shown in full when it did not).
pub fn fails_with(out: &Output, code: i32, needle: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

/// SIGTERM first, so the process takes its clean path; SIGKILL if it has
/// not exited within `WAIT`. Returns how it exited.
pub fn terminate(child: &mut Child) -> ExitStatus {
    if let Ok(Some(status)) = child.try_wait() {
        return status;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().expect("wait for a killed child")
}

/// A child process stopped (see [`terminate`]) when the guard drops, so a
/// test that fails half-way leaves no process behind.
pub struct Guard(Option<Child>);

impl Guard {
    pub fn new(child: Child) -> Guard {
        Guard(Some(child))
    }

    /// The child, no longer guarded (to wait for its output).
    pub fn into_inner(mut self) -> Child {
        self.0.take().expect("guarded child")
    }
}

impl std::ops::Deref for Guard {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.0.as_ref().expect("guarded child")
    }
}

impl std::ops::DerefMut for Guard {
    fn deref_mut(&mut self) -> &mut Child {
        self.0.as_mut().expect("guarded child")
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            terminate(child);
        }
    }
}

/// A chat-server on 127.0.0.1, stopped when dropped.
pub struct Server {
    child: Guard,
    pub addr: SocketAddr,
}

impl Server {
    /// Starts the server with `args` on a free port. Per-IP limits are off
    /// unless `args` sets them, because every test connects from the same
    /// address.
    pub fn start(args: &[&str]) -> Server {
        Server::start_on(0, args)
    }

    pub fn start_on(port: u16, args: &[&str]) -> Server {
        let mut cmd = Command::new(bin("chat-server"));
        cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()]);
        for limit in ["--per-ip-rate", "--per-ip-conns"] {
            if !args.iter().any(|a| a.starts_with(limit)) {
                cmd.args([limit, "0"]);
            }
        }
        cmd.args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .env("RUST_LOG", "warn");
        let mut child = cmd.spawn().expect("start chat-server");
        let line = first_line(&mut child);
        // "listening on 127.0.0.1:PORT (tcp)"
        let addr = line.split_whitespace().nth(2).and_then(|a| a.parse().ok());
        let Some(addr) = addr else {
            terminate(&mut child);
            panic!("unexpected first line from chat-server: {line:?}");
        };
        Server {
            child: Guard::new(child),
            addr,
        }
    }

    /// Stops the server (see [`terminate`]) and returns how it exited.
    pub fn stop(&mut self) -> ExitStatus {
        terminate(&mut self.child)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// The first line `child` writes on its (piped) standard output, waiting
/// at most `WAIT`; on failure the child is stopped before the test fails.
pub fn first_line(child: &mut Child) -> String {
    let out = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    match rx.recv_timeout(WAIT) {
        Ok(line) => line,
        Err(_) => {
            terminate(child);
            panic!("no line from the child within {WAIT:?}");
        }
    }
}

/// Waits for a started child to end and collects its output; kills it
/// (with its process group, when it leads one: see [`run_bounded`]) and
/// fails the test if it takes longer than `WAIT`.
pub fn output_bounded(child: Child) -> Output {
    output_within(child, WAIT)
}

/// [`output_bounded`], for a child given `limit` rather than `WAIT`.
pub fn output_within(child: Child, limit: Duration) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait for the child"),
        Err(_) => {
            for target in [format!("-{pid}"), pid.to_string()] {
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &target])
                    .stderr(Stdio::null())
                    .status();
            }
            panic!("child {pid} did not finish within {limit:?}");
        }
    }
}

/// Runs a command to its end, feeding `input` on stdin; kills it and fails
/// the test if it takes longer than `WAIT`. It runs in a process group of
/// its own, so what it started (`chatctl demo`'s server and daemons) is
/// killed with it.
pub fn run_bounded(mut cmd: Command, input: Option<&str>) -> Output {
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    if let Some(text) = input {
        let mut stdin = child.stdin.take().expect("stdin");
        let text = text.to_owned();
        std::thread::spawn(move || {
            let _ = stdin.write_all(text.as_bytes());
        });
    }
    output_bounded(child)
}

/// Polls `f` until it returns true, for at most `WAIT`.
pub fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
