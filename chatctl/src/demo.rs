//! `chatctl demo`: the whole system on loopback in a few seconds.
//!
//! It starts a chat-server and two daemons (alice and bob) from the
//! binaries next to chatctl, in a temporary directory of their own, takes
//! them through register, bridge and chat, exchanges a few messages, and
//! prints what happened as a person would read it. Then it stops
//! everything, or with `--keep` leaves it running and prints the commands
//! to attach to either side.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chat_proto::ipc::{RecordKind, Request};

use crate::conn::{Conn, Error};

/// How long any one step may take before the demo gives up.
const STEP: Duration = Duration::from_secs(15);

struct Proc {
    name: &'static str,
    child: Child,
}

/// Everything the demo started, stopped on drop unless kept; the
/// directory (and the logs in it) is removed unless kept or the demo failed.
struct Demo {
    home: PathBuf,
    procs: Vec<Proc>,
    keep: bool,
    failed: bool,
}

impl Drop for Demo {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        for p in self.procs.iter_mut().rev() {
            terminate(&mut p.child);
        }
        if !self.failed {
            let _ = std::fs::remove_dir_all(&self.home);
        }
    }
}

fn terminate(child: &mut Child) {
    #[cfg(unix)]
    {
        // SIGTERM, so each part takes its clean way out.
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

pub fn run(keep: bool) -> Result<(), Error> {
    let home = std::env::temp_dir().join(format!("chat-demo-{}", std::process::id()));
    make_private(&home)?;
    let mut demo = Demo {
        home: home.clone(),
        procs: Vec::new(),
        keep,
        failed: false,
    };
    demo_in(&mut demo).map_err(|e| {
        demo.failed = true;
        Error::Failed(format!(
            "{}; the logs are kept in {}",
            e.message(),
            home.display()
        ))
    })
}

fn demo_in(demo: &mut Demo) -> Result<(), Error> {
    let keep = demo.keep;
    let home = demo.home.clone();
    let ctl = std::env::current_exe()
        .map_err(|e| Error::Failed(format!("cannot tell where chatctl is installed: {e}")))?;
    let bin = ctl
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::Failed("cannot tell where chatctl is installed".into()))?;
    let server_bin = bin.join(format!("chat-server{}", std::env::consts::EXE_SUFFIX));
    let chatd_bin = bin.join(format!("chatd{}", std::env::consts::EXE_SUFFIX));
    for b in [&server_bin, &chatd_bin] {
        if !b.exists() {
            return Err(Error::Failed(format!(
                "the demo runs {} next to chatctl, and it is not there: build everything with `cargo build --release` (or run ./demo.sh)",
                b.display()
            )));
        }
    }
    let run_dir = home.join("run");
    make_private(&run_dir)?;
    let env = |cmd: &mut Command| {
        cmd.env("XDG_RUNTIME_DIR", &run_dir)
            .env("XDG_DATA_HOME", home.join("data"))
            .env("XDG_CONFIG_HOME", home.join("config"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null());
    };

    say("starting a rendezvous server on 127.0.0.1");
    let mut server = Command::new(&server_bin);
    env(&mut server);
    server
        .args(["--bind", "127.0.0.1", "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(log(&home, "chat-server")?);
    let server = server
        .spawn()
        .map_err(|e| Error::Failed(format!("cannot start {}: {e}", server_bin.display())))?;
    demo.procs.push(Proc {
        name: "chat-server",
        child: server,
    });
    let addr = first_line(&mut demo.procs[0].child)?
        .split_whitespace()
        .nth(2)
        .map(str::to_owned)
        .ok_or_else(|| Error::Failed("chat-server did not say where it listens".into()))?;
    say(&format!("chat-server listens on {addr}"));

    let mut sockets = Vec::new();
    for id in ["alice", "bob"] {
        let socket = run_dir.join("chatd").join(format!("{id}.sock"));
        let mut d = Command::new(&chatd_bin);
        env(&mut d);
        // On loopback only, as the server: the demo opens nothing to the
        // network.
        d.args(["--id", id, "--bind", "127.0.0.1", "--port", "0"])
            .args(["--server", &addr])
            .stdout(Stdio::null())
            .stderr(log(&home, id)?);
        let child = d
            .spawn()
            .map_err(|e| Error::Failed(format!("cannot start {}: {e}", chatd_bin.display())))?;
        demo.procs.push(Proc {
            name: if id == "alice" {
                "chatd alice"
            } else {
                "chatd bob"
            },
            child,
        });
        sockets.push(socket);
    }
    let alice = &sockets[0];
    let bob = &sockets[1];
    for (s, p) in sockets.iter().zip(&mut demo.procs[1..]) {
        wait_for_daemon(s, p)?;
    }
    say("started chatd for alice and for bob, each with its own socket and history");
    println!();

    step(alice, "alice", Request::Register)?;
    step(bob, "bob", Request::Register)?;
    step(alice, "alice", Request::Bridge { peer: None })?;
    step(bob, "bob", Request::Bridge { peer: None })?;
    step(bob, "bob", Request::Chat)?;
    wait_chatting(alice)?;
    let lines = [
        (
            bob,
            "bob",
            "Hi Alice! This went straight from my daemon to yours.",
        ),
        (
            alice,
            "alice",
            "Hi Bob. It is in my history now, and your daemon got my ack.",
        ),
        (
            bob,
            "bob",
            "And we can both write whenever we like: no more taking turns.",
        ),
        (alice, "alice", "Bye for now!"),
    ];
    for (socket, who, text) in lines {
        step(
            socket,
            who,
            Request::Send {
                text: text.to_owned(),
            },
        )?;
    }
    println!();
    say("the conversation, from alice's history:");
    let mut conn = Conn::open(alice)?;
    conn.call(
        Request::History {
            peer: None,
            grep: None,
            limit: 100,
        },
        |r| {
            if let RecordKind::Message { from, text, .. } = &r.kind {
                let when = crate::output::local_time(r.time_ms, "%H:%M:%S");
                println!("    {when}  {from:>5}: {text}");
            }
        },
    )?;
    println!();

    if keep {
        let pids: Vec<String> = demo
            .procs
            .iter()
            .map(|p| p.child.id().to_string())
            .collect();
        let ctl = ctl.display();
        say("everything is still running; attach from any shell:");
        println!();
        println!("    {ctl} --socket {} tail -f", alice.display());
        println!(
            "    {ctl} --socket {} send \"hello from another shell\"",
            bob.display()
        );
        println!("    {ctl} --socket {} status", alice.display());
        println!("    {ctl} --socket {} shell", bob.display());
        println!();
        println!("  logs are in {}", home.display());
        println!("  stop it all with:");
        println!();
        println!("    kill {} && rm -rf {}", pids.join(" "), home.display());
        for p in &demo.procs {
            println!("  ({} is process {})", p.name, p.child.id());
        }
    } else {
        step(bob, "bob", Request::Quit)?;
        step(alice, "alice", Request::Quit)?;
        say("stopping the daemons and the server (run `chatctl demo --keep` to keep them)");
    }
    Ok(())
}

fn say(text: &str) {
    println!("* {text}");
}

/// Sends one request as `who` and prints it as `chatctl` would.
fn step(socket: &Path, who: &str, request: Request) -> Result<(), Error> {
    let shown = match &request {
        Request::Register => "register".to_owned(),
        Request::Bridge { .. } => "bridge".to_owned(),
        Request::Chat => "chat".to_owned(),
        Request::Quit => "quit".to_owned(),
        Request::Send { text } => format!("send {text:?}"),
        other => format!("{other:?}"),
    };
    let mut conn = Conn::open(socket)?;
    // `chatctl quit` says what it left, from the status before.
    let before = match request {
        Request::Quit => Some(conn.status()?),
        _ => None,
    };
    let reply = conn.call(request, |_| {})?;
    // Exactly what `chatctl` would print.
    let answer = match &before {
        Some(status) => crate::output::quit_text(status),
        None => crate::output::reply_text(&reply),
    };
    println!("  {who:>5}$ chatctl {shown}");
    println!("         {answer}");
    Ok(())
}

fn wait_chatting(socket: &Path) -> Result<(), Error> {
    let mut conn = Conn::open(socket)?;
    conn.set_read_timeout(Some(STEP))?;
    conn.call(
        Request::Wait {
            state: chat_proto::ipc::State::Chatting,
        },
        |_| {},
    )?;
    Ok(())
}

fn wait_for_daemon(socket: &Path, p: &mut Proc) -> Result<(), Error> {
    let deadline = Instant::now() + STEP;
    loop {
        if let Ok(mut c) = Conn::open(socket)
            && c.call(Request::Id, |_| {}).is_ok()
        {
            return Ok(());
        }
        if let Ok(Some(status)) = p.child.try_wait() {
            return Err(Error::Failed(format!("{} exited ({status})", p.name)));
        }
        if Instant::now() > deadline {
            return Err(Error::Failed(format!(
                "{} did not come up on {} within {} s",
                p.name,
                socket.display(),
                STEP.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn first_line(child: &mut Child) -> Result<String, Error> {
    let out = child
        .stdout
        .take()
        .ok_or_else(|| Error::Failed("no output from chat-server".into()))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(STEP)
        .map_err(|_| Error::Failed("chat-server did not start in time".into()))
}

fn log(home: &Path, name: &str) -> Result<std::fs::File, Error> {
    std::fs::File::create(home.join(format!("{name}.log")))
        .map_err(|e| Error::Failed(format!("cannot create a log in {}: {e}", home.display())))
}

/// The demo's directory is in the shared temporary directory under a name
/// others can guess: it must be a real directory of ours that nobody else
/// can enter, as chatd's own socket directory must.
fn make_private(dir: &Path) -> Result<(), Error> {
    #[cfg(unix)]
    return chat_proto::local::ensure_private_dir(dir).map_err(|e| Error::Failed(e.to_string()));
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Failed(format!("cannot create {}: {e}", dir.display())))
}
