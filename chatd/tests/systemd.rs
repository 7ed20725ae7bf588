//! chatd and chat-server under systemd's protocols, on the real binaries:
//! the units pass `systemd-analyze verify`, chatd serves a control socket
//! it did not create (socket activation, through `systemd-socket-activate`),
//! and READY=1 and STATUS= arrive on a NOTIFY_SOCKET we listen on.
//!
//! The systemd tools come from Debian's `systemd` package, which `.ci/run`
//! installs; elsewhere these tests say they were skipped.

#![cfg(unix)]

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use chat_testkit::{Guard, WAIT, bin, eventually, isolate, output_bounded, run_bounded, terminate};

fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("CI_REQUIRE_SYSTEMD").is_none(),
            "{name} is required here (CI_REQUIRE_SYSTEMD is set) but not installed"
        );
        eprintln!("skipped: {name} is not installed (apt-get install systemd)");
    }
    found
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn the_units_pass_systemd_analyze_verify() {
    let Some(analyze) = tool("systemd-analyze") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // The units name where `cargo install` and the install instructions
    // put the binaries; point them at the ones just built, so verify can
    // check they exist and are executable.
    let chatd = bin("chatd");
    let server = bin("chat-server");
    for unit in ["chatd@.service", "chatd@.socket", "chat-server.service"] {
        let text = std::fs::read_to_string(repo().join("systemd").join(unit)).unwrap();
        let text = text
            .replace("%h/.cargo/bin/chatd", chatd.to_str().unwrap())
            .replace("/usr/local/bin/chat-server", server.to_str().unwrap());
        std::fs::write(dir.path().join(unit), text).unwrap();
    }
    // Templates are verified through an instance.
    for (template, instance) in [
        ("chatd@.service", "chatd@alice.service"),
        ("chatd@.socket", "chatd@alice.socket"),
    ] {
        std::fs::copy(dir.path().join(template), dir.path().join(instance)).unwrap();
    }
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    for (args, units) in [
        (
            vec!["--user"],
            vec!["chatd@alice.service", "chatd@alice.socket"],
        ),
        (vec![], vec!["chat-server.service"]),
    ] {
        let paths: Vec<PathBuf> = units.iter().map(|u| dir.path().join(u)).collect();
        let mut verify = Command::new(&analyze);
        verify
            .args(&args)
            .args(["verify", "--man=no"])
            .args(&paths)
            .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.path().display()))
            // A user manager needs a runtime directory, even offline.
            .env("XDG_RUNTIME_DIR", &run);
        let out = run_bounded(verify, None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // verify warns (and still exits 0) about unknown keys and bad
        // values: any line about our files is a failure.
        let about_ours: Vec<&str> = stderr
            .lines()
            .filter(|l| {
                l.contains(dir.path().to_str().unwrap())
                    || l.contains("chatd@")
                    || l.contains("chat-server")
            })
            .collect();
        assert!(
            out.status.success() && about_ours.is_empty(),
            "systemd-analyze {args:?} verify {units:?} ({:?}):\n{stderr}",
            out.status
        );
    }
}

fn chatd_env(cmd: &mut Command, home: &Path) {
    isolate(cmd, home).env("RUST_LOG", "info");
}

fn chatctl_status(socket: &Path) -> Option<serde_json::Value> {
    let mut cmd = Command::new(bin("chatctl"));
    cmd.args(["--json", "--socket", socket.to_str().unwrap(), "status"]);
    let out = run_bounded(cmd, None);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).expect("status JSON"))
}

#[test]
fn chatd_serves_a_socket_systemd_made() {
    let Some(activate) = tool("systemd-socket-activate") else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    // Not where chatd would put its own: it must use what it is given.
    let socket = home.path().join("activated.sock");
    let mut cmd = Command::new(activate);
    cmd.args(["--listen", socket.to_str().unwrap()]);
    for var in [
        "XDG_RUNTIME_DIR",
        "XDG_DATA_HOME",
        "XDG_CONFIG_HOME",
        "HOME",
        "RUST_LOG",
    ] {
        cmd.args(["-E", var]);
    }
    cmd.arg(env!("CARGO_BIN_EXE_chatd"))
        .args(["--id", "socketed", "--port", "0", "--server", "127.0.0.1:9"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    chatd_env(&mut cmd, home.path());
    let mut child = Guard::new(cmd.spawn().unwrap());
    eventually("the activated socket", || socket.exists());
    // The first connection starts chatd, which answers on the socket it
    // was passed.
    let mut status = None;
    eventually("chatd to answer on the activated socket", || {
        status = chatctl_status(&socket);
        status.is_some()
    });
    terminate(&mut child);
    let status = status.expect("chatd answered on the activated socket");
    assert_eq!(status["id"], "socketed");
    assert_eq!(status["state"], "idle");
    let mut log = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut log);
    }
    assert!(log.contains("socket activation"), "{log}");
    // Its own default socket was never made.
    assert!(!home.path().join("run/chatd/socketed.sock").exists());
}

#[test]
fn chatd_tells_systemd_it_is_ready_and_what_it_does() {
    let home = tempfile::tempdir().unwrap();
    let notify_path = home.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(WAIT)).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatd"));
    cmd.args(["--id", "ready", "--port", "0", "--server", "127.0.0.1:9"])
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    chatd_env(&mut cmd, home.path());
    let mut child = Guard::new(cmd.spawn().unwrap());
    let mut buf = [0u8; 4096];
    let mut got = String::new();
    let deadline = Instant::now() + WAIT;
    while !got.contains("READY=1") && Instant::now() < deadline {
        match notify.recv(&mut buf) {
            Ok(n) => got.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(_) => break,
        }
    }
    let socket = home.path().join("run/chatd/ready.sock");
    // READY=1 means it answers now, without retrying.
    let status = chatctl_status(&socket);
    // And it says it is stopping (the datagram waits in the socket).
    terminate(&mut child);
    let mut stopping = String::new();
    while !stopping.contains("STOPPING=1") && Instant::now() < deadline {
        match notify.recv(&mut buf) {
            Ok(n) => stopping.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(_) => break,
        }
    }
    assert!(got.contains("READY=1"), "{got:?}");
    assert!(got.contains("STATUS=ready: idle"), "{got:?}");
    assert!(status.is_some(), "chatd answers once it said READY=1");
    assert!(stopping.contains("STOPPING=1"), "{stopping:?}");
}

#[test]
fn chat_server_tells_systemd_it_is_ready() {
    let home = tempfile::tempdir().unwrap();
    let notify_path = home.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(WAIT)).unwrap();
    let child = Guard::new(
        Command::new(bin("chat-server"))
            .args(["--bind", "127.0.0.1", "--port", "0"])
            .env("NOTIFY_SOCKET", &notify_path)
            .env("JOURNAL_STREAM", "8:1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut buf = [0u8; 4096];
    let got = notify
        .recv(&mut buf)
        .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let out = output_bounded(child.into_inner());
    let got = got.expect("a notification");
    assert!(
        got.contains("READY=1") && got.contains("STATUS=serving on 127.0.0.1:"),
        "{got:?}"
    );
    // Under the journal: no timestamps, no colours.
    let log = String::from_utf8_lossy(&out.stderr);
    let first = log.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(" INFO") || first.starts_with("INFO"),
        "{first:?}"
    );
    assert!(!log.contains('\u{1b}'), "no ANSI colours under the journal");
}
