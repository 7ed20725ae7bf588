//! The README's nginx `location` block, run as written in front of the
//! real `chat-server` on 127.0.0.1: a client behind the proxy is
//! registered at its own address, not the proxy's, and cannot claim
//! another. nginx is Debian's `nginx-light`, which `.ci/run` installs; on
//! a machine without it the test says so and passes, unless
//! `CI_REQUIRE_NGINX` is set, as CI sets it.

use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use chat_testkit::http::{Reply, build, connect_from, read_to_close};
use chat_testkit::{Guard, Server, eventually};

/// nginx's binary: `$NGINX`, else `nginx` on the PATH, else Debian's.
fn nginx() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NGINX") {
        return Some(p.into());
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join("nginx"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| Some(PathBuf::from("/usr/sbin/nginx")).filter(|p| p.is_file()))
}

/// The fenced `nginx` block of the README.
fn readme_block() -> String {
    let readme = include_str!("../../README.md");
    let start = readme
        .find("```nginx\n")
        .expect("an nginx block in the README")
        + 9;
    let len = readme[start..].find("```").expect("the block's end");
    readme[start..start + len].to_owned()
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("local addr").port()
}

/// nginx in the foreground, one process, everything under `dir`.
fn start_nginx(bin: &Path, dir: &Path, port: u16, location: &str) -> Guard {
    let d = dir.display();
    let conf = format!(
        "master_process off;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n access_log off;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
         server {{\n listen 127.0.0.1:{port};\n{location}\n }}\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), conf).expect("write nginx.conf");
    let child = Command::new(bin)
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start nginx");
    Guard::new(child)
}

#[cfg(target_os = "linux")]
#[test]
fn the_readme_nginx_block_passes_the_clients_address() {
    let Some(bin) = nginx() else {
        assert!(
            std::env::var_os("CI_REQUIRE_NGINX").is_none(),
            "CI_REQUIRE_NGINX is set but nginx is not installed"
        );
        eprintln!("skipped: nginx is not installed (apt-get install nginx-light)");
        return;
    };
    let server = Server::start(&["--trusted-proxy", "127.0.0.1"]);
    let location = readme_block();
    assert!(location.contains("127.0.0.1:5555"), "{location}");
    let location = location.replace("127.0.0.1:5555", &server.addr.to_string());
    let dirs = tempfile::tempdir().expect("tempdir");
    // The port is free when picked; should something take it before
    // nginx binds it, nginx exits and another is picked (each try in a
    // directory of its own, so a log speaks of its own try only).
    let (_proxy, at) = (0..5)
        .find_map(|n| {
            let port = free_port();
            let dir = dirs.path().join(n.to_string());
            std::fs::create_dir(&dir).expect("a directory for nginx");
            let mut proxy = start_nginx(&bin, &dir, port, &location);
            let at: SocketAddr = ([127, 0, 0, 1], port).into();
            let mut exited = None;
            eventually("nginx to listen, or to exit", || {
                if let Ok(Some(status)) = proxy.try_wait() {
                    exited = Some(status);
                    return true;
                }
                std::net::TcpStream::connect(at).is_ok()
            });
            let Some(status) = exited else {
                return Some((proxy, at));
            };
            let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
            assert!(log.contains("in use"), "nginx exited ({status}): {log}");
            None
        })
        .expect("a free port for nginx in 5 tries");

    let client: IpAddr = [127, 0, 0, 9].into();
    let ask = |headers: &[(&str, &str)], method: &str| {
        let mut c = connect_from(at, client);
        c.write_all(build(method, headers, true).as_bytes())
            .unwrap();
        Reply::parse(&read_to_close(&mut c))
    };
    let r = ask(
        &[("Client-Id", "alice"), ("Client-Port", "4000")],
        "REGISTER",
    );
    assert_eq!((r.status, r.phrase.as_str()), (200, "REGACK"), "{r:?}");
    assert_eq!(r.header("Client-Addr"), Some("127.0.0.9:4000"), "{r:?}");
    let alice = r.header("Client-Token").expect("a token").to_owned();
    // A client's own X-Forwarded-For is replaced by the address nginx
    // saw.
    let forged = [
        ("Client-Id", "bob"),
        ("Client-Port", "4001"),
        ("X-Forwarded-For", "127.0.0.66"),
    ];
    let r = ask(&forged, "REGISTER");
    assert_eq!(r.header("Client-Addr"), Some("127.0.0.9:4001"), "{r:?}");
    let bob = r.header("Client-Token").expect("a token").to_owned();
    // Even from the proxy's own (trusted) address.
    let mut c = connect_from(at, [127, 0, 0, 1].into());
    let carol = [
        ("Client-Id", "carol"),
        ("Client-Port", "4002"),
        ("X-Forwarded-For", "127.0.0.66"),
    ];
    c.write_all(build("REGISTER", &carol, true).as_bytes())
        .unwrap();
    let r = Reply::parse(&read_to_close(&mut c));
    assert_eq!(r.header("Client-Addr"), Some("127.0.0.1:4002"), "{r:?}");
    // The other verbs pass too, and PROBEACK keeps its Server header.
    let r = ask(&[], "PROBE");
    assert_eq!((r.status, r.phrase.as_str()), (200, "PROBEACK"), "{r:?}");
    assert!(
        r.header("Server")
            .is_some_and(|s| s.starts_with("chat-server/")),
        "{r:?}"
    );
    let r = ask(
        &[("Client-Id", "alice"), ("Client-Token", &alice)],
        "BRIDGE",
    );
    assert_eq!(
        (r.status, r.header("Peer-Id")),
        (200, None),
        "alice waits: {r:?}"
    );
    let r = ask(
        &[
            ("Client-Id", "bob"),
            ("Client-Token", &bob),
            ("Peer-Id", "alice"),
        ],
        "BRIDGE",
    );
    assert_eq!(r.header("Peer-Addr"), Some("127.0.0.9:4000"), "{r:?}");
    let r = ask(&[("Client-Id", "bob"), ("Client-Token", &bob)], "QUIT");
    assert_eq!((r.status, r.phrase.as_str()), (200, "QUITACK"), "{r:?}");
}
