//! The real binaries on 127.0.0.1: a chat-server, daemons each with their
//! own runtime, data and config directories, and chatctl driving them.
//! Every wait is bounded; every process is stopped when its handle drops.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

#[cfg(unix)]
pub use chat_testkit::http::read_to_close;
pub use chat_testkit::http::request;
pub use chat_testkit::{
    Guard, Server, WAIT, bin, eventually, fails_with, isolate, output_bounded, run_bounded, stderr,
    stdout, terminate,
};

pub fn chatctl() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_chatctl"))
}

/// A chatd with its own directories, and chatctl pointed at it.
pub struct Daemon {
    child: Option<Guard>,
    pub id: String,
    pub home: tempfile::TempDir,
    pub socket: PathBuf,
    args: Vec<String>,
    stderr_log: PathBuf,
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
        isolate(cmd, self.home.path())
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
        self.child = Some(Guard::new(cmd.spawn().expect("start chatd")));
        eventually(&format!("chatd {} to answer", self.id), || {
            if let Some(c) = &mut self.child
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!(
                    "chatd {} exited ({status}); its log:\n{}",
                    self.id,
                    self.log()
                );
            }
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
            "chatctl {args:?} on {} failed ({:?}): {}{}\nchatd's log:\n{}",
            self.id,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
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
            "{} never reached {state}: {}; now {}\nchatd's log:\n{}",
            self.id,
            String::from_utf8_lossy(&out.stderr),
            self.state(),
            self.log()
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
        if let Some(mut c) = self.child.take().map(Guard::into_inner) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and waits for the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.child.take().map(|c| terminate(&mut c.into_inner()))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }
}

/// A server, and alice and bob chatting through it (alice waited, bob
/// called). Keep the server bound (`_server`, not `_`): dropping it stops
/// it.
pub fn chatting_pair() -> (Server, Daemon, Daemon) {
    let server = Server::start(&[]);
    let alice = Daemon::start("alice", server.addr, &[]);
    let bob = Daemon::start("bob", server.addr, &[]);
    connect_pair(&alice, &bob);
    (server, alice, bob)
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

/// Runs chatctl with `args`, and `env` set on top of the test's own
/// environment (no `CHATD_SOCKET`); bounded.
pub fn run_chatctl(args: &[&str], env: &[(&str, &std::path::Path)]) -> Output {
    let mut cmd = Command::new(chatctl());
    cmd.args(args).env_remove("CHATD_SOCKET");
    for (name, value) in env {
        cmd.env(name, value);
    }
    run_bounded(cmd, None)
}
