//! `chatctl`: the control CLI of chatd.
//!
//! Each command opens the daemon's local socket, states its protocol
//! version, sends one request (or, for `send -`, one per line, pipelined)
//! and prints the answer for people, or as JSON with `--json`.
//! Exit status: 0 success, 1 refused or failed, 2 usage, 3 no daemon.

mod conn;
mod demo;
mod output;
mod shell;

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use chat_proto::ClientId;
use chat_proto::ipc::{DaemonFrame, Reply, Request, State};
use clap::{CommandFactory, Parser, Subcommand};

use crate::conn::{Conn, Error, resolve_socket};
use crate::output::Printer;

/// Drive a chatd daemon: register with the server, bridge to a peer, chat,
/// and read the history.
#[derive(Parser, Debug)]
#[command(name = "chatctl", version, max_term_width = 100)]
struct Cli {
    /// The daemon's control socket [default: $CHATD_SOCKET, else the only
    /// one running]
    #[arg(long, global = true)]
    socket: Option<PathBuf>,

    /// The running daemon with this id, when several run (wins over
    /// $CHATD_SOCKET)
    #[arg(long, global = true, value_name = "ID", conflicts_with = "socket")]
    id: Option<ClientId>,

    /// Machine-readable output: JSON objects, one per line
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print the daemon's id (seed /id)
    Id,
    /// Register with the server, or refresh the registration (seed /register)
    Register,
    /// Ask the server for a peer, or wait for one (seed /bridge)
    Bridge {
        /// Ask for this peer rather than whoever waited longest
        peer: Option<ClientId>,
    },
    /// Start chatting with the bridged peer (seed /chat)
    Chat,
    /// Send a message; with no TEXT or `-`, every line of standard input
    /// is one. Exits 0 only when the peer stored every message
    Send {
        /// The message (words are joined with spaces)
        text: Vec<String>,
    },
    /// End the chat and leave the server; the daemon keeps running (seed /quit)
    Quit,
    /// Print the last messages and events, and with -f follow new ones
    Tail {
        /// How many to print first
        #[arg(short = 'n', long = "lines", default_value_t = 10)]
        lines: u32,
        /// Keep printing new ones as they come
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Print id, state, peer, server and turn
    Status,
    /// Wait until the daemon is in STATE
    Wait {
        /// The state to wait for
        #[arg(value_parser = state_parser())]
        state: State,
        /// Give up after this many seconds (exit 1)
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
    },
    /// Search the stored messages
    History {
        /// Only messages with this peer
        #[arg(long)]
        peer: Option<ClientId>,
        /// Only messages containing this text (A-Z matches a-z; other letters match only their own case)
        #[arg(long)]
        grep: Option<String>,
        /// At most this many (the newest)
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Interactive: /id /register /bridge /chat /quit, other lines are sent
    Shell,
    /// Start a server and two daemons on loopback and show a chat between them
    Demo {
        /// Leave everything running and print how to attach to each side
        #[arg(long)]
        keep: bool,
    },
    /// Print a completion script: `chatctl completions bash > ~/.local/share/bash-completion/completions/chatctl`
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages of chat-server, chatd and chatctl into DIR
    Man {
        /// Where to write chat-server.1, chatd.1, chatctl.1 and a
        /// chatctl-COMMAND.1 for each command
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
}

/// States by name, so that help and completions list them.
fn state_parser() -> impl clap::builder::TypedValueParser<Value = State> {
    use clap::builder::TypedValueParser as _;
    let names: Vec<&'static str> = State::ALL.iter().map(|s| s.as_str()).collect();
    clap::builder::PossibleValuesParser::new(names).try_map(|s| s.parse::<State>())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let printer = Printer::new(cli.json);
    match run(cli, &printer) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e, printer.is_json());
            ExitCode::from(e.exit_code())
        }
    }
}

/// clap's refusal of the command line: as clap prints it, or under
/// `--json` (which clap could not yet tell us) as every other error is.
/// Help and version are not errors, and keep clap's output.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let json = std::env::args_os()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json");
    if !json || matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        e.exit();
    }
    // clap's message runs to the first blank line (a list of missing
    // arguments may follow its first line); usage and hints come after.
    let text = e.render().to_string();
    let message: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.is_empty())
        .collect();
    let message = message.join(" ");
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    report(&Error::Usage(message.to_owned()), true);
    ExitCode::from(2)
}

/// Tells standard error what failed: a line of text, or with `--json` an
/// object `{"error", "exit"}`.
fn report(e: &Error, json: bool) {
    if json {
        let error = serde_json::json!({ "error": e.message(), "exit": e.exit_code() });
        eprintln!("{error}");
    } else {
        eprintln!("chatctl: {}", e.message());
    }
}

/// Ends chatctl from a thread other than main's, with `e` reported as
/// main would.
fn exit_with(e: &Error, json: bool) -> ! {
    report(e, json);
    std::process::exit(i32::from(e.exit_code()))
}

fn run(cli: Cli, p: &Printer) -> Result<(), Error> {
    // The commands that need no daemon.
    match &cli.command {
        Cmd::Demo { keep } => return demo::run(*keep),
        Cmd::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "chatctl",
                &mut std::io::stdout(),
            );
            return Ok(());
        }
        Cmd::Man { dir } => return man_pages(dir),
        _ => {}
    }
    let socket = resolve_socket(cli.socket, cli.id)?;
    let mut conn = Conn::open(&socket)?;
    let no_records = |_| {};
    match cli.command {
        Cmd::Id => {
            let reply = conn.call(Request::Id, no_records)?;
            p.reply(&reply);
        }
        Cmd::Register => p.reply(&conn.call(Request::Register, no_records)?),
        Cmd::Bridge { peer } => p.reply(&conn.call(Request::Bridge { peer }, no_records)?),
        Cmd::Chat => p.reply(&conn.call(Request::Chat, no_records)?),
        Cmd::Quit => {
            // The answer is the same whatever was left; the state just
            // before says what that was.
            let before = conn.status()?;
            p.quit(&conn.call(Request::Quit, no_records)?, &before);
        }
        Cmd::Status => p.reply(&conn.call(Request::Status, no_records)?),
        Cmd::Send { text } => send(conn, text, p)?,
        Cmd::Tail { lines, follow } => {
            let reply = conn.call(
                Request::Tail {
                    last: lines,
                    follow,
                },
                |r| p.record(&r),
            )?;
            debug_assert!(matches!(reply, Reply::Done));
        }
        Cmd::Wait { state, timeout } => {
            if let Some(secs) = timeout {
                let t = Duration::try_from_secs_f64(secs)
                    .map_err(|_| Error::Usage("--timeout takes a number of seconds".into()))?;
                conn.set_read_timeout(Some(t.max(Duration::from_millis(1))))?;
            }
            match conn.call(Request::Wait { state }, no_records) {
                Ok(reply) => p.reply(&reply),
                Err(Error::TimedOut) => {
                    return Err(Error::Failed(format!(
                        "timed out after {} s waiting for state {state}",
                        timeout.unwrap_or_default()
                    )));
                }
                Err(e) => return Err(e),
            }
        }
        Cmd::History { peer, grep, limit } => {
            conn.call(Request::History { peer, grep, limit }, |r| p.record(&r))?;
        }
        Cmd::Shell => shell::run(conn, &socket, p)?,
        Cmd::Demo { .. } | Cmd::Completions { .. } | Cmd::Man { .. } => {}
    }
    Ok(())
}

/// Writes the three man pages, rendered from the same clap definitions the
/// programs parse their arguments with, so they cannot drift.
fn man_pages(dir: &std::path::Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Failed(format!("cannot create {}: {e}", dir.display())))?;
    let mut pages = vec![
        (
            "chat-server".to_owned(),
            chat_server::config::Options::command(),
        ),
        ("chatd".to_owned(), chatd::config::Options::command()),
        ("chatctl".to_owned(), Cli::command()),
    ];
    // A page per chatctl command too, as chatctl(1) refers to them.
    let mut cli = Cli::command();
    cli.build();
    for sub in cli.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = format!("chatctl-{}", sub.get_name());
        pages.push((name.clone(), sub.clone().name(name)));
    }
    for (name, command) in pages {
        let path = dir.join(format!("{name}.1"));
        let mut out = Vec::new();
        clap_mangen::Man::new(command)
            .render(&mut out)
            .map_err(|e| Error::Failed(format!("cannot render {name}.1: {e}")))?;
        std::fs::write(&path, out)
            .map_err(|e| Error::Failed(format!("cannot write {}: {e}", path.display())))?;
        println!("{}", path.display());
    }
    Ok(())
}

/// Most messages in flight at once from `send -`.
const WINDOW: usize = 256;

/// Sends the message given, or one per line of standard input, pipelined;
/// fails unless the peer acknowledged every one.
fn send(mut conn: Conn, words: Vec<String>, p: &Printer) -> Result<(), Error> {
    if !words.is_empty() && words != ["-"] {
        let text = words.join(" ");
        if let Some(why) = too_long(&text) {
            return Err(Error::Failed(format!("the message is {why}")));
        }
        let reply = conn.call(Request::Send { text }, |_| {})?;
        p.reply(&reply);
        return Ok(());
    }
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        // Otherwise a person who typed `chatctl send` sees nothing happen.
        eprintln!("chatctl: sending each line typed as a message; end with Ctrl-D");
    }
    send_lines(conn, p.is_json())
}

/// Why `text` cannot be sent, if it is longer than a message may be.
fn too_long(text: &str) -> Option<String> {
    let max = chat_proto::peer::MAX_TEXT;
    (text.len() > max).then(|| format!("{} bytes; a message is at most {max}", text.len()))
}

/// What `send -` has in flight and what failed, shared by the thread that
/// reads standard input and sends and the one that reads the answers.
#[derive(Default)]
struct Lines {
    /// Request number -> line number.
    in_flight: std::collections::HashMap<u64, usize>,
    failed: Vec<(usize, String)>,
    total: usize,
    /// Lines written to the daemon (`total` counts those read).
    sent: usize,
    /// A line is being written, not yet in `in_flight`: chatctl must not
    /// stop and leave it uncounted.
    writing: bool,
    /// The daemon left the chat: once nothing is in flight, stop.
    over: bool,
    /// The first line whose failure ended the chat, and why: the lines in
    /// flight after it are waited for (each fails too) and counted.
    stopped: Option<(usize, String)>,
    /// Standard input has ended: the sending side finishes by itself.
    input_done: bool,
}

/// `send -`: every line of standard input, pipelined. Failures are reported
/// as they happen. When the chat is over, nothing more can be delivered,
/// so chatctl stops at once, whether a failed send says so or the daemon
/// leaves the chat while no line is in flight (with `tail -f log |
/// chatctl send -` it would otherwise wait for the next log line to find
/// out).
fn send_lines(mut conn: Conn, json: bool) -> Result<(), Error> {
    use std::sync::{Arc, Condvar, Mutex};
    let shared = Arc::new((Mutex::new(Lines::default()), Condvar::new()));
    // Chatting now: ask to be told when the daemon is in any other state,
    // which is when the chat is over. (Not chatting: the first line fails
    // and says why.)
    let chatting = conn.status()?.state == State::Chatting;
    let mut leaving = Vec::new();
    if chatting {
        for state in State::ALL.into_iter().filter(|&s| s != State::Chatting) {
            leaving.push(conn.send(Request::Wait { state })?);
        }
    }
    let mut sender = conn.sender()?;
    {
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || {
            let printer = Printer::new(json);
            loop {
                let frame = match conn.next_frame() {
                    Ok(f) => f,
                    Err(e) => exit_with(&e, json),
                };
                let DaemonFrame::Reply { id, result } = frame else {
                    continue;
                };
                let (lock, changed) = &*shared;
                let mut lines = lock.lock().unwrap_or_else(|e| e.into_inner());
                if leaving.contains(&id) {
                    lines.over = true;
                    stop_if_over(&lines, json);
                    continue;
                }
                let Some(line) = lines.in_flight.remove(&id) else {
                    continue;
                };
                match result {
                    Ok(reply) => printer.sent_line(line, &reply),
                    Err(f) => {
                        printer.undelivered(line, &f.message);
                        lines.failed.push((line, f.message.clone()));
                        if chat_is_over(f.kind) && lines.stopped.is_none() {
                            lines.stopped = Some((line, f.message.clone()));
                            lines.over = true;
                        }
                    }
                }
                stop_if_over(&lines, json);
                changed.notify_all();
            }
        });
    }
    let printer = Printer::new(json);
    let (lock, changed) = &*shared;
    let stdin = std::io::stdin();
    let mut unreadable = None;
    for (n, line) in stdin.lock().lines().enumerate() {
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                unreadable = Some(format!(
                    "cannot read standard input at line {}: {e}; it and the lines after it were not sent",
                    n + 1
                ));
                break;
            }
        };
        if line.is_empty() {
            continue;
        }
        let mut lines = lock.lock().unwrap_or_else(|e| e.into_inner());
        if lines.over {
            break;
        }
        // Refused here rather than by the frame limit, so the others go.
        if let Some(why) = too_long(&line) {
            lines.total += 1;
            printer.undelivered(n + 1, &why);
            lines.failed.push((n + 1, why));
            continue;
        }
        while lines.in_flight.len() >= WINDOW && !lines.over {
            lines = changed.wait(lines).unwrap_or_else(|e| e.into_inner());
        }
        if lines.over {
            break;
        }
        // Counted only now: while this thread waited for room, the answers
        // may all have come in and chatctl stopped, this line unsent.
        lines.total += 1;
        // Not written under the lock: a write that blocks must not stop
        // the answers being read.
        lines.writing = true;
        drop(lines);
        sender.send(Request::Send { text: line }, |id| {
            let mut lines = lock.lock().unwrap_or_else(|e| e.into_inner());
            lines.in_flight.insert(id, n + 1);
            lines.sent += 1;
            lines.writing = false;
        })?;
    }
    let mut lines = lock.lock().unwrap_or_else(|e| e.into_inner());
    lines.input_done = true;
    while !lines.in_flight.is_empty() {
        lines = changed.wait(lines).unwrap_or_else(|e| e.into_inner());
    }
    let failed = (!lines.failed.is_empty()).then(|| summary(&lines, lines.stopped.as_ref()));
    match (unreadable, failed) {
        (None, None) => Ok(()),
        (Some(why), None) | (None, Some(why)) => Err(Error::Failed(why)),
        (Some(u), Some(f)) => Err(Error::Failed(format!("{u}; {f}"))),
    }
}

/// Once the daemon has left the chat and every line sent has its answer,
/// ends chatctl: the rest of the input cannot be delivered.
fn stop_if_over(lines: &Lines, json: bool) {
    if !lines.over || lines.input_done || lines.writing || !lines.in_flight.is_empty() {
        return;
    }
    if let Some(stopped) = &lines.stopped {
        exit_with(&Error::Failed(summary(lines, Some(stopped))), json);
    }
    let sent = match (lines.failed.is_empty(), lines.sent) {
        (false, _) => summary(lines, None),
        (true, 0) => "no line was sent".to_owned(),
        (true, 1) => "the one line sent was delivered".to_owned(),
        (true, n) => format!("all {n} lines sent were delivered"),
    };
    let over = format!("the chat is over: {sent}; any further input is not sent");
    exit_with(&Error::Failed(over), json);
}

/// Failures after which no further message can be delivered.
fn chat_is_over(kind: chat_proto::ipc::FailureKind) -> bool {
    use chat_proto::ipc::FailureKind;
    matches!(
        kind,
        FailureKind::State | FailureKind::Peer | FailureKind::ShuttingDown
    )
}

fn summary(lines: &Lines, stopped: Option<&(usize, String)>) -> String {
    let mut failed: Vec<usize> = lines.failed.iter().map(|(l, _)| *l).collect();
    failed.sort_unstable();
    let shown: Vec<String> = failed.iter().take(20).map(usize::to_string).collect();
    let more = if failed.len() > 20 {
        format!(" and {} more", failed.len() - 20)
    } else {
        String::new()
    };
    match stopped {
        Some((line, why)) => format!(
            "stopped at line {line} ({}): {} of the {} lines read so far not delivered (lines {}{more}); the rest of the input is not sent",
            output::undelivered_because(why),
            failed.len(),
            lines.total,
            shown.join(", ")
        ),
        None => format!(
            "{} of {} messages not delivered (lines {}{more})",
            failed.len(),
            lines.total,
            shown.join(", ")
        ),
    }
}

/// Reads standard input, for the shell.
pub fn stdin_lines() -> impl Iterator<Item = String> {
    std::io::stdin().lines().map_while(Result::ok)
}
