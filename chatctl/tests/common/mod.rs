//! The real binaries on 127.0.0.1: a chat-server, daemons each with their
//! own runtime, data and config directories, and chatctl driving them.
//! Every wait is bounded; every process is stopped when its handle drops.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The longest any one wait may take; generous for slow, loaded machines.
pub const WAIT: Duration = Duration::from_secs(30);

/// A binary of another workspace package, from the directory cargo put it
/// in (`target/debug`). `cargo test --workspace` builds them all before any
/// test runs; a binary older than its sources is refused rather than
/// silently tested.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/e2e-HASH -> target/debug
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
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(package)
        .join("src");
    if let Some(newer) = newest(&src).filter(|t| *t > built) {
        let _ = newer;
        panic!(
            "{} is older than its sources in {}: {hint}",
            path.display(),
            src.display()
        );
    }
    path
}

fn newest(dir: &Path) -> Option<std::time::SystemTime> {
    let mut best = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let p = entry.path();
        let t = if p.is_dir() {
            newest(&p)
        } else {
            entry.metadata().ok()?.modified().ok()
        };
        best = best.max(t);
    }
    best
}

pub fn chatctl() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_chatctl"))
}

fn stop(child: &mut Child) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A chat-server on a free port of 127.0.0.1.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
}

impl Server {
    pub fn start(args: &[&str]) -> Server {
        Server::start_on(0, args)
    }

    pub fn start_on(port: u16, args: &[&str]) -> Server {
        let mut child = Command::new(bin("chat-server"))
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--per-ip-rate",
                "0",
                "--per-ip-conns",
                "0",
            ])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("start chat-server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the listening line");
        let addr = line
            .split_whitespace()
            .nth(2)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from chat-server: {line:?}"));
        Server { child, addr }
    }

    pub fn stop(&mut self) {
        stop(&mut self.child);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A chatd with its own directories, and chatctl pointed at it.
pub struct Daemon {
    child: Option<Child>,
    pub id: String,
    pub home: tempfile::TempDir,
    pub socket: PathBuf,
    args: Vec<String>,
    pub stderr_log: PathBuf,
}

impl Daemon {
    /// Starts `chatd --id ID --port 0 --server ADDR ARGS` and waits until it
    /// answers.
    pub fn start(id: &str, server: SocketAddr, args: &[&str]) -> Daemon {
        let home = tempfile::Builder::new()
            .prefix("chat-e2e-")
            .tempdir()
            .expect("temp dir");
        let mut d = Daemon {
            child: None,
            id: id.to_owned(),
            socket: home
                .path()
                .join("run")
                .join("chatd")
                .join(format!("{id}.sock")),
            stderr_log: home.path().join("chatd.log"),
            home,
            args: ["--id", id, "--port", "0", "--server", &server.to_string()]
                .iter()
                .chain(args)
                .map(|s| s.to_string())
                .collect(),
        };
        d.spawn();
        d
    }

    /// Environment for both chatd and chatctl: everything under `home`.
    fn env(&self, cmd: &mut Command) {
        let h = self.home.path();
        let run = h.join("run");
        std::fs::create_dir_all(&run).expect("runtime dir");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700));
        }
        cmd.env("XDG_RUNTIME_DIR", run)
            .env("XDG_DATA_HOME", h.join("data"))
            .env("XDG_CONFIG_HOME", h.join("config"))
            .env("HOME", h)
            .env_remove("CHATD_SOCKET")
            .env("RUST_LOG", "info");
    }

    /// Starts the process again (after `kill9` or `stop`).
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_log)
            .expect("log file");
        let mut cmd = Command::new(bin("chatd"));
        cmd.args(&self.args).stdout(Stdio::null()).stderr(log);
        self.env(&mut cmd);
        self.child = Some(cmd.spawn().expect("start chatd"));
        eventually(&format!("chatd {} to answer", self.id), || {
            self.ctl(&["status"]).status.success()
        });
    }

    /// Tries to start a second chatd with the same directories.
    pub fn start_again_output(&self) -> Output {
        let mut cmd = Command::new(bin("chatd"));
        cmd.args(&self.args);
        self.env(&mut cmd);
        run_bounded(cmd, None)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).expect("running")
    }

    /// chatctl with this daemon's environment (no --socket: it finds the
    /// only socket in its runtime directory).
    pub fn ctl_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(chatctl());
        cmd.args(args);
        self.env(&mut cmd);
        cmd
    }

    pub fn ctl(&self, args: &[&str]) -> Output {
        run_bounded(self.ctl_cmd(args), None)
    }

    pub fn ctl_stdin(&self, args: &[&str], input: &str) -> Output {
        run_bounded(self.ctl_cmd(args), Some(input))
    }

    /// Runs chatctl and insists it succeeds; returns its standard output.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "chatctl {args:?} on {} failed ({:?}): {}{}",
            self.id,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `chatctl --json status`, parsed.
    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["--json", "status"])).expect("status JSON")
    }

    pub fn state(&self) -> String {
        self.status()["state"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Waits (bounded) until the daemon is in `state`.
    pub fn wait_for(&self, state: &str) {
        let out = self.ctl(&["wait", state, "--timeout", &WAIT.as_secs().to_string()]);
        assert!(
            out.status.success(),
            "{} never reached {state}: {}; now {}",
            self.id,
            String::from_utf8_lossy(&out.stderr),
            self.state()
        );
    }

    /// Messages in the history, as (from, to, text).
    pub fn messages(&self) -> Vec<(String, String, String)> {
        let out = self.ok(&["--json", "history", "--limit", "100000"]);
        out.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("history JSON"))
            .map(|v| {
                (
                    v["from"].as_str().unwrap_or_default().to_owned(),
                    v["to"].as_str().unwrap_or_default().to_owned(),
                    v["text"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and waits for the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        stop(&mut c);
        c.try_wait().ok().flatten()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop(&mut c);
        }
    }
}

/// Runs a command with a bounded wait, feeding `input` on stdin.
pub fn run_bounded(mut cmd: Command, input: Option<&str>) -> Output {
    use std::io::Write;
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
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(WAIT) {
        Ok(out) => out.expect("wait for command"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("command did not finish within {WAIT:?}");
        }
    }
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

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Registers both, has `waiter` wait and `caller` bridge to it and chat.
pub fn connect_pair(waiter: &Daemon, caller: &Daemon) {
    waiter.ok(&["register"]);
    caller.ok(&["register"]);
    assert!(waiter.ok(&["bridge"]).contains("waiting"));
    let out = caller.ok(&["bridge"]);
    assert!(out.contains(&format!("peer {}", waiter.id)), "{out}");
    assert!(
        caller
            .ok(&["chat"])
            .contains(&format!("chatting with {}", waiter.id))
    );
    waiter.wait_for("chatting");
}
