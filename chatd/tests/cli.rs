//! chatd's start-up checks, on the real binary: each failure says what is
//! wrong and exits non-zero, before anything is half started.

use std::process::{Command, Stdio};

use chat_testkit::{Guard, eventually, fails_with, isolate, run_bounded};

fn chatd(home: &std::path::Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatd"));
    isolate(&mut cmd, home)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// chatd with id `a`, a free peer port and a server nobody answers at,
/// then `more`.
fn chatd_a(home: &std::path::Path, more: &[&str]) -> Command {
    let mut args = vec!["--id", "a", "--port", "0", "--server", "127.0.0.1:1"];
    args.extend_from_slice(more);
    chatd(home, &args)
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
    fails_with(&out, 2, "only A-Z a-z 0-9 . _ - are allowed");
    // It would put the history in the data directory's parent.
    let out = run_bounded(
        chatd(
            home.path(),
            &["--id=..", "--port=1", "--server=127.0.0.1:1"],
        ),
        None,
    );
    fails_with(&out, 2, ". and .. name directories");
}

#[test]
fn a_peer_port_in_use_is_a_clear_error() {
    let home = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = run_bounded(
        chatd(
            home.path(),
            &["--id", "a", "--port", &port, "--server", "127.0.0.1:1"],
        ),
        None,
    );
    fails_with(
        &out,
        1,
        &format!("the peer port {port} (where this daemon listens for peers) is already in use"),
    );
}

#[test]
fn a_socket_path_too_long_is_refused_with_the_limit() {
    let home = tempfile::tempdir().unwrap();
    let long = home.path().join("x".repeat(120));
    let out = run_bounded(
        chatd_a(home.path(), &["--socket", long.to_str().unwrap()]),
        None,
    );
    fails_with(&out, 1, "this platform allows at most");
}

#[test]
fn a_socket_path_that_is_not_a_socket_is_left_alone() {
    let home = tempfile::tempdir().unwrap();
    let file = home.path().join("precious.txt");
    std::fs::write(&file, "important").unwrap();
    let out = run_bounded(
        chatd_a(home.path(), &["--socket", file.to_str().unwrap()]),
        None,
    );
    fails_with(
        &out,
        1,
        "is a file that is not a socket, not a chatd socket",
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "important");
    let out = run_bounded(
        chatd_a(home.path(), &["--socket", home.path().to_str().unwrap()]),
        None,
    );
    fails_with(&out, 1, "is a directory, not a chatd socket");
}

#[test]
fn two_daemons_cannot_share_a_history() {
    let home = tempfile::tempdir().unwrap();
    let data = home.path().join("shared");
    let data = data.to_str().unwrap();
    let mut first = Guard::new(chatd_a(home.path(), &["--data-dir", data]).spawn().unwrap());
    let sock = home.path().join("run").join("chatd").join("a.sock");
    eventually("the first chatd's socket", || {
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first chatd exited"
        );
        sock.exists()
    });
    let other_sock = home.path().join("b.sock");
    let started = std::time::Instant::now();
    let out = run_bounded(
        chatd_a(
            home.path(),
            &["--data-dir", data, "--socket", other_sock.to_str().unwrap()],
        ),
        None,
    );
    drop(first);
    fails_with(
        &out,
        1,
        "locked by another process, most likely another chatd",
    );
    // Said at once (the lock waits 250 ms), not after rusqlite's default
    // 5 s of waiting for a lock the first daemon keeps for life.
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_millis(4500), "{took:?}");
}

#[cfg(unix)]
#[test]
fn the_data_directory_is_made_private_or_refused() {
    use std::os::unix::fs::PermissionsExt;
    let home = tempfile::tempdir().unwrap();
    // Given open to others: closed before any history is written.
    let open = home.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let daemon = Guard::new(
        chatd_a(home.path(), &["--data-dir", open.to_str().unwrap()])
            .spawn()
            .unwrap(),
    );
    eventually("the history in the data directory", || {
        open.join("history.db").exists()
    });
    let mut daemon = daemon.into_inner();
    chat_testkit::terminate(&mut daemon);
    let out = chat_testkit::output_bounded(daemon);
    let mode = std::fs::metadata(&open).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    // And said so, since the user named that directory.
    let log = chat_testkit::stderr(&out);
    assert!(log.contains("mode 755 -> 700"), "{log}");
    // Behind a symlink: refused, saying what to do.
    let link = home.path().join("link");
    std::os::unix::fs::symlink(&open, &link).unwrap();
    let out = run_bounded(
        chatd_a(home.path(), &["--data-dir", link.to_str().unwrap()]),
        None,
    );
    fails_with(&out, 1, "choose another --data-dir");
}
