//! chatd's start-up checks, on the real binary: each failure says what is
//! wrong and exits non-zero, before anything is half started.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chat_testkit::{Guard, WAIT, run_bounded, stderr};

fn chatd(home: &std::path::Path, args: &[&str]) -> Command {
    let run = home.join("run");
    std::fs::create_dir_all(&run).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatd"));
    cmd.args(args)
        .env("XDG_RUNTIME_DIR", &run)
        .env("XDG_DATA_HOME", home.join("data"))
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("HOME", home)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

#[test]
fn a_bad_id_is_a_usage_error() {
    let home = tempfile::tempdir().unwrap();
    let out = run_bounded(
        chatd(
            home.path(),
            &["--id=no spaces", "--port=1", "--server=127.0.0.1:1"],
        ),
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("only A-Z a-z 0-9 . _ - are allowed"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_peer_port_in_use_is_a_clear_error() {
    let home = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = run_bounded(
        chatd(
            home.path(),
            &["--id", "a", "--port", &port, "--server", "127.0.0.1:1"],
        ),
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("peer port {port} is already in use")),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_socket_path_too_long_is_refused_with_the_limit() {
    let home = tempfile::tempdir().unwrap();
    let long = home.path().join("x".repeat(120));
    let out = run_bounded(
        chatd(
            home.path(),
            &[
                "--id",
                "a",
                "--port",
                "0",
                "--server",
                "127.0.0.1:1",
                "--socket",
                long.to_str().unwrap(),
            ],
        ),
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("this platform allows at most"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn two_daemons_cannot_share_a_history() {
    let home = tempfile::tempdir().unwrap();
    let data = home.path().join("shared");
    let data = data.to_str().unwrap();
    let mut first = chatd(
        home.path(),
        &[
            "--id",
            "a",
            "--port",
            "0",
            "--server",
            "127.0.0.1:1",
            "--data-dir",
            data,
        ],
    );
    let mut first = Guard::new(first.spawn().unwrap());
    let sock = home.path().join("run").join("chatd").join("a.sock");
    let deadline = Instant::now() + WAIT;
    while !sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let other_sock = home.path().join("b.sock");
    let out = run_bounded(
        chatd(
            home.path(),
            &[
                "--id",
                "a",
                "--port",
                "0",
                "--server",
                "127.0.0.1:1",
                "--data-dir",
                data,
                "--socket",
                other_sock.to_str().unwrap(),
            ],
        ),
        None,
    );
    let _ = first.kill();
    let _ = first.wait();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("in use by another chatd"),
        "{}",
        stderr(&out)
    );
}
