//! The units of `systemd/` under a running systemd, not only checked by
//! `systemd-analyze verify`: a Debian container of the host's release is
//! booted with `systemd-nspawn` (systemd as its PID 1, a user manager for
//! a user who lingers), the freshly built binaries and the repository's
//! units are installed in it as the README says, and then:
//! chat-server.service starts, says where it serves and answers on the
//! host's loopback; chatd@.socket starts chatd@alice on the first
//! `chatctl` command; two instances register, bridge, chat and keep their
//! history across a restart inside their sandbox; a bad configuration
//! fails chat-server with status 2 and no restart loop; a stop is clean.
//!
//! Needs root, `systemd-nspawn` (Debian's `systemd-container`),
//! `debootstrap` and a Debian mirror (`.ci/run` installs the tools). The
//! container's tree is made once per target directory (about a minute)
//! and copied for each run. Elsewhere the test says it skipped.

#![cfg(target_os = "linux")]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use chat_testkit::{WAIT, bin, eventually, output_within, stdout};

const MIRROR: &str = "http://deb.debian.org/debian";

/// Skips (returns None) with the reason, or fails when CI requires it.
fn skip(why: &str) -> Option<()> {
    assert!(
        std::env::var_os("CI_REQUIRE_SYSTEMD").is_none(),
        "{why}, and CI_REQUIRE_SYSTEMD is set"
    );
    eprintln!("skipped: {why}");
    None
}

fn found(tool: &str) -> bool {
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
        .iter()
        .any(|d| Path::new(d).join(tool).exists())
}

/// The host's Debian release, if the host is Debian.
fn debian_codename() -> Option<String> {
    let release = std::fs::read_to_string("/etc/os-release").ok()?;
    let value = |key: &str| {
        release
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim_matches('"').to_owned())
    };
    (value("ID=")? == "debian").then_some(())?;
    value("VERSION_CODENAME=")
}

/// Runs `cmd` to its end within `limit`, killed past it.
fn run_within(cmd: &mut Command, limit: Duration) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    output_within(child, limit)
}

fn ok(cmd: &mut Command, limit: Duration) -> String {
    let out = run_within(cmd, limit);
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The container's tree, made once: a minimal Debian with systemd, D-Bus
/// and PAM's systemd module (for the user manager), and the user alice.
/// `None` when the mirror cannot be reached (twice): the network's doing,
/// not the units', so the test says it skipped.
fn base_tree(codename: &str) -> Option<PathBuf> {
    let target = bin("chatd")
        .parent()
        .and_then(Path::parent)
        .expect("target directory")
        .to_path_buf();
    let tree = target.join(format!("systemd-container-{codename}"));
    if tree.join(".complete").exists() {
        return Some(tree);
    }
    let partial = target.join(format!("systemd-container-{codename}.partial"));
    let fetched = (0..2).any(|_| {
        let _ = std::fs::remove_dir_all(&partial);
        let out = run_within(
            Command::new("debootstrap").args([
                "--variant=minbase",
                "--include=systemd,systemd-sysv,dbus,libpam-systemd",
                codename,
                partial.to_str().unwrap(),
                MIRROR,
            ]),
            Duration::from_secs(900),
        );
        if !out.status.success() {
            let log = std::fs::read_to_string(partial.join("debootstrap/debootstrap.log"))
                .unwrap_or_default();
            eprintln!(
                "debootstrap failed: {}{}",
                String::from_utf8_lossy(&out.stderr),
                log.lines().rev().take(5).collect::<Vec<_>>().join("\n")
            );
        }
        out.status.success()
    });
    if !fetched {
        eprintln!("skipped: no Debian tree could be fetched from {MIRROR}");
        return None;
    }
    ok(
        Command::new("chroot")
            .arg(&partial)
            .args(["useradd", "-m", "-s", "/bin/sh", "alice"]),
        WAIT,
    );
    std::fs::write(partial.join(".complete"), "").unwrap();
    let _ = std::fs::remove_dir_all(&tree);
    std::fs::rename(&partial, &tree).unwrap();
    Some(tree)
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn install(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("copy {from:?} to {to:?}: {e}"));
}

fn link(target: &str, at: &Path) {
    std::fs::create_dir_all(at.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(target, at).unwrap();
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The container's PID 1 among `nspawn`'s descendants (it forks a helper
/// first, which forks init into the new PID namespace): the process whose
/// innermost PID is 1.
fn container_init(nspawn: u32) -> Option<u32> {
    let children = |pid: u32| -> Vec<u32> {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    let mut todo = children(nspawn);
    while let Some(pid) = todo.pop() {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let innermost = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .and_then(|ids| ids.split_whitespace().last());
        if innermost == Some("1") {
            return Some(pid);
        }
        todo.extend(children(pid));
    }
    None
}

/// A booted container, powered off (or killed) when dropped.
struct Container {
    nspawn: Child,
    /// systemd, PID 1 inside, as the host numbers it.
    init: u32,
    uid: u32,
}

impl Container {
    fn boot(root: &Path, log: &Path) -> Option<Container> {
        let name = format!("chattest{}", std::process::id());
        let nspawn = Command::new("systemd-nspawn")
            .args(["--quiet", "--boot", "--register=no", "--keep-unit"])
            .args(["--machine", &name, "--directory"])
            .arg(root)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(log).unwrap())
            .stderr(Stdio::from(
                std::fs::File::create(log.with_extension("err")).unwrap(),
            ))
            .spawn()
            .expect("spawn systemd-nspawn");
        let mut c = Container {
            nspawn,
            init: 0,
            uid: 0,
        };
        let deadline = Instant::now() + WAIT;
        while c.init == 0 {
            if Instant::now() > deadline || matches!(c.nspawn.try_wait(), Ok(Some(_))) {
                // The machine's doing, not the units': said, not failed.
                let why = std::fs::read_to_string(log.with_extension("err")).unwrap_or_default();
                eprintln!("skipped: systemd-nspawn could not start a container here: {why}");
                return None;
            }
            c.init = container_init(c.nspawn.id()).unwrap_or(0);
            std::thread::sleep(Duration::from_millis(50));
        }
        // Until systemd has come up far enough to answer, systemctl says it
        // was not booted with systemd. "degraded" counts as booted: a
        // failed unit is for the checks to name.
        loop {
            let out = c.inside(&["systemctl", "is-system-running"]);
            let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if state == "running" || state == "degraded" {
                break;
            }
            assert!(
                Instant::now() < deadline + WAIT,
                "the container did not boot: {state} {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                c.journal()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let uid = c.inside(&["id", "-u", "alice"]);
        c.uid = String::from_utf8_lossy(&uid.stdout)
            .trim()
            .parse()
            .expect("alice's uid");
        Some(c)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args([
            "-t",
            &self.init.to_string(),
            "-m",
            "-u",
            "-i",
            "-n",
            "-p",
            "-C",
            "--",
        ])
        .args(args);
        cmd
    }

    fn inside(&self, args: &[&str]) -> Output {
        run_within(&mut self.command(args), WAIT)
    }

    /// `args` run as alice, with her user manager's bus.
    fn alice(&self, args: &[&str]) -> Output {
        let runtime = format!("/run/user/{}", self.uid);
        let mut all = vec![
            "runuser".to_owned(),
            "-u".into(),
            "alice".into(),
            "--".into(),
            "env".into(),
            format!("XDG_RUNTIME_DIR={runtime}"),
            format!("DBUS_SESSION_BUS_ADDRESS=unix:path={runtime}/bus"),
        ];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        self.inside(&all)
    }

    fn alice_ok(&self, args: &[&str]) -> String {
        let out = self.alice(args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{args:?}: {}\n{text}{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.journal()
        );
        text
    }

    /// `systemctl show` of the properties asked for, as `key=value` lines.
    fn show(&self, user: bool, unit: &str, props: &str) -> String {
        let mut args = vec!["systemctl"];
        if user {
            args.push("--user");
        }
        args.extend(["show", "-p", props, unit]);
        let out = if user {
            self.alice(&args)
        } else {
            self.inside(&args)
        };
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn journal(&self) -> String {
        let out = self.inside(&["journalctl", "--no-pager", "-n", "60"]);
        format!(
            "the container's journal:\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    }

    /// Polls `show` until it has every line of `want`.
    fn until(&self, user: bool, unit: &str, props: &str, want: &[&str]) {
        let deadline = Instant::now() + WAIT;
        loop {
            let now = self.show(user, unit, props);
            if want.iter().all(|w| now.lines().any(|l| l == *w)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{unit}: wanted {want:?}, have:\n{now}\n{}",
                self.journal()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.init != 0 {
            // SIGRTMIN+4 asks systemd to power off.
            let _ = Command::new("kill")
                .args(["-s", "RTMIN+4", &self.init.to_string()])
                .status();
        }
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if matches!(self.nspawn.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Killing PID 1 of the container ends every process in it.
        if self.init != 0 {
            let _ = Command::new("kill")
                .args(["-KILL", &self.init.to_string()])
                .status();
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

/// A PROBE from the host, over the loopback the container shares.
fn probe(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to chat-server");
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"PROBE / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
}

#[test]
fn the_units_run_under_a_booted_systemd() {
    if !found("systemd-nspawn") || !found("debootstrap") || !found("nsenter") {
        skip(
            "systemd-nspawn, debootstrap or nsenter is not installed (apt-get install systemd-container debootstrap)",
        );
        return;
    }
    let uid = Command::new("id").arg("-u").output().expect("id -u");
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        eprintln!("skipped: booting a container needs root");
        return;
    }
    let Some(codename) = debian_codename() else {
        skip("the container is built from the host's Debian release; this host is not Debian");
        return;
    };
    let Some(base) = base_tree(&codename) else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    ok(
        Command::new("cp").arg("-a").arg(&base).arg(&root),
        Duration::from_secs(120),
    );

    // As the README installs them.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let units = repo.join("systemd");
    let port = free_port();
    install(&bin("chat-server"), &root.join("usr/local/bin/chat-server"));
    install(&bin("chatctl"), &root.join("usr/local/bin/chatctl"));
    install(
        &units.join("chat-server.service"),
        &root.join("etc/systemd/system/chat-server.service"),
    );
    link(
        "/etc/systemd/system/chat-server.service",
        &root.join("etc/systemd/system/multi-user.target.wants/chat-server.service"),
    );
    let server_config = root.join("etc/chat-server/config.toml");
    let good = format!("bind = \"127.0.0.1\"\nport = {port}\n");
    write(&server_config, &good);
    let home = root.join("home/alice");
    install(&bin("chatd"), &home.join(".cargo/bin/chatd"));
    let user_units = home.join(".config/systemd/user");
    for unit in ["chatd@.service", "chatd@.socket"] {
        install(&units.join(unit), &user_units.join(unit));
    }
    for id in ["alice", "bob"] {
        link(
            "/home/alice/.config/systemd/user/chatd@.socket",
            &user_units.join(format!("sockets.target.wants/chatd@{id}.socket")),
        );
        write(
            &home.join(format!(".config/chatd/{id}.toml")),
            &format!("port = 0\nserver = \"127.0.0.1:{port}\"\n"),
        );
    }
    ok(
        Command::new("chroot")
            .arg(&root)
            .args(["chown", "-R", "alice:alice", "/home/alice"]),
        WAIT,
    );
    // Her user manager starts at boot, as after `loginctl enable-linger`.
    write(&root.join("var/lib/systemd/linger/alice"), "");

    let Some(c) = Container::boot(&root, &work.path().join("nspawn.log")) else {
        return;
    };

    // The server: notified ready, with its status, sandboxed, reachable.
    c.until(
        false,
        "chat-server.service",
        "ActiveState,StatusText",
        &[
            "ActiveState=active",
            &format!("StatusText=serving on 127.0.0.1:{port}"),
        ],
    );
    let answer = probe(port);
    assert!(answer.starts_with("HTTP/1.1 200 PROBEACK\r\n"), "{answer}");
    // Its sandbox leaves it what busy polling reads (/proc/stat): it says
    // so before "listening", in the same stream, when it cannot.
    let mut log = String::new();
    eventually("'listening on' in chat-server's journal", || {
        log = stdout(&c.inside(&["journalctl", "--no-pager", "-u", "chat-server.service"]));
        log.contains("listening on")
    });
    assert!(!log.contains("busy polling off"), "{log}");

    // Socket activation: the socket listens, the daemon starts on the
    // first command.
    c.until(
        true,
        "chatd@alice.socket",
        "ActiveState",
        &["ActiveState=active"],
    );
    let before = c.show(true, "chatd@alice.service", "ActiveState");
    assert_eq!(before.trim(), "ActiveState=inactive");
    let registered = c.alice_ok(&["chatctl", "--id", "alice", "register"]);
    assert!(
        registered.starts_with("registered as 127.0.0.1:"),
        "{registered}"
    );
    c.until(
        true,
        "chatd@alice.service",
        "ActiveState,StatusText",
        &["ActiveState=active", "StatusText=alice: registered"],
    );

    // A chat between two instances, each in its own sandbox.
    c.alice_ok(&["chatctl", "--id", "bob", "register"]);
    c.alice_ok(&["chatctl", "--id", "bob", "bridge"]);
    c.alice_ok(&["chatctl", "--id", "alice", "bridge"]);
    c.alice_ok(&["chatctl", "--id", "alice", "chat"]);
    c.alice_ok(&[
        "chatctl",
        "--id",
        "bob",
        "wait",
        "chatting",
        "--timeout",
        "20",
    ]);
    let sent = c.alice_ok(&["chatctl", "--id", "alice", "send", "hello under systemd"]);
    assert!(sent.starts_with("delivered"), "{sent}");
    c.until(
        true,
        "chatd@bob.service",
        "StatusText",
        &["StatusText=bob: chatting with alice"],
    );
    // The history is written where the sandbox lets it, and kept.
    c.alice_ok(&["systemctl", "--user", "restart", "chatd@bob.service"]);
    let history = c.alice_ok(&["chatctl", "--id", "bob", "history"]);
    assert!(
        history.contains("alice → bob: hello under systemd"),
        "{history}"
    );

    // A configuration error: status 2, and no restart loop.
    write(&server_config, &format!("{good}bogus = 1\n"));
    let _ = c.inside(&["systemctl", "restart", "chat-server.service"]);
    c.until(
        false,
        "chat-server.service",
        "ActiveState,ExecMainStatus",
        &["ActiveState=failed", "ExecMainStatus=2"],
    );
    // Not restarted, nor waiting to be: a restart to come shows as the
    // sub-state `auto-restart` from the exit on, and its retries would end
    // in a failure with NRestarts above 0.
    c.until(
        false,
        "chat-server.service",
        "ActiveState,SubState,NRestarts",
        &["ActiveState=failed", "SubState=failed", "NRestarts=0"],
    );

    // Mended, it starts again; a stop is a clean exit on SIGTERM.
    write(&server_config, &good);
    let _ = c.inside(&["systemctl", "reset-failed", "chat-server.service"]);
    let _ = c.inside(&["systemctl", "start", "chat-server.service"]);
    c.until(
        false,
        "chat-server.service",
        "ActiveState",
        &["ActiveState=active"],
    );
    let _ = c.inside(&["systemctl", "stop", "chat-server.service"]);
    c.until(
        false,
        "chat-server.service",
        "ActiveState,Result,ExecMainStatus",
        &["ActiveState=inactive", "Result=success", "ExecMainStatus=0"],
    );
}
