//! `chatctl shell`: the seed projects' prompt, on top of the daemon.
//!
//! `/id /register /bridge /chat /quit` do what they did in the seeds; any
//! other line is sent as a message. A second connection follows the
//! daemon's records, so what the peer writes appears as it arrives, while
//! the user types: no more turn-taking because the program could not read
//! and write at once.

use std::path::Path;

use chat_proto::ipc::{RecordKind, Reply, Request};

use crate::conn::{Conn, Error};
use crate::output::Printer;

const HELP: &str = "/id  /register  /bridge [PEER]  /chat  /quit  /status  /help  /exit (or Ctrl-D); \
any other line is sent (start it with // to send a line beginning with /)";

pub fn run(mut conn: Conn, socket: &Path, p: &Printer) -> Result<(), Error> {
    let mut follow = Conn::open(socket)?;
    let me = match conn.call(Request::Id, |_| {})? {
        Reply::Id { id } => id,
        other => return Err(Error::Failed(format!("unexpected answer: {other:?}"))),
    };
    let json = p.is_json();
    std::thread::spawn(move || {
        let printer = Printer::new(json);
        let result = follow.call(
            Request::Tail {
                last: 0,
                follow: true,
            },
            |r| {
                // What this shell sent was typed here; everything else is news.
                if !matches!(r.kind, RecordKind::Message { outgoing: true, .. }) {
                    printer.record(&r);
                }
            },
        );
        if let Err(e) = result {
            eprintln!("chatctl: stopped following chatd: {}", e.message());
        }
    });
    if !json {
        eprintln!("chatd {me}: {HELP}");
    }
    for line in crate::stdin_lines() {
        let line = line.trim_end();
        let (command, arg) = match line.split_once(char::is_whitespace) {
            Some((c, a)) => (c, a.trim()),
            None => (line, ""),
        };
        let request = match command {
            "" => continue,
            "/exit" => break,
            "/help" => {
                eprintln!("{HELP}");
                continue;
            }
            "/id" => Request::Id,
            "/register" => Request::Register,
            "/bridge" if arg.is_empty() => Request::Bridge { peer: None },
            "/bridge" => match arg.parse() {
                Ok(peer) => Request::Bridge { peer: Some(peer) },
                Err(e) => {
                    eprintln!("chatctl: bad peer id {arg:?}: {e}");
                    continue;
                }
            },
            "/chat" => Request::Chat,
            "/quit" => Request::Quit,
            "/status" => Request::Status,
            c if c.starts_with('/') && !c.starts_with("//") => {
                eprintln!("chatctl: unknown command {c}; /help lists them");
                continue;
            }
            _ => Request::Send {
                text: line
                    .strip_prefix('/')
                    .filter(|_| line.starts_with("//"))
                    .unwrap_or(line)
                    .to_owned(),
            },
        };
        let sending = matches!(request, Request::Send { .. });
        match conn.call(request, |_| {}) {
            // Delivery is the normal case: say nothing unless asked.
            Ok(reply) if sending && !json => drop(reply),
            // In the shell, the next step is /chat, not `chatctl chat`.
            Ok(Reply::Bridged {
                peer: Some((id, addr)),
            }) if !json => {
                println!("peer {id} at {addr}: /chat to start chatting");
            }
            Ok(reply) => p.reply(&reply),
            Err(Error::Failed(m)) => eprintln!("chatctl: {m}"),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
