//! `chat-bench`: to chat-server what redis-benchmark is to Redis.
//!
//! `run` drives one load and prints requests/s and latency; `compare` runs
//! chat-server and a reference HTTP server (nginx) side by side, rounds
//! interleaved so that both see the same machine, and prints the table of
//! medians; `fill` registers many ids and reports the server's memory per
//! registration.

mod link;
mod load;
mod stats;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};

use crate::load::{Load, Mode, Op};
use crate::stats::{Summary, median, quantile};

#[derive(Parser, Debug)]
#[command(name = "chat-bench", version, about, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Drive one load and print requests/s and p50/p99 latency
    Run(RunArgs),
    /// Measure chat-server against a reference HTTP server, interleaved
    Compare(CompareArgs),
    /// Register many fresh ids; with --pid, report memory per registration
    Fill(FillArgs),
    /// Measure a chatting daemon's link, the CLI and idle memory against
    /// a bare TCP ping-pong, and print the table
    Peer(PeerArgs),
    /// The echo end of the bare TCP ping-pong (started by `peer`)
    #[command(hide = true)]
    Echo {
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
}

#[derive(Args, Debug)]
struct PeerArgs {
    /// Control socket of a daemon that is chatting
    #[arg(long)]
    socket: PathBuf,
    /// chatctl to time (given --socket of the daemon)
    #[arg(long)]
    chatctl: PathBuf,
    /// Process id of an idle daemon, to read its resident memory
    #[arg(long)]
    idle_pid: Option<u32>,
    /// Messages per round-trip measurement
    #[arg(long, default_value_t = 5000)]
    count: usize,
    /// Messages for the throughput measurement
    #[arg(long, default_value_t = 200_000)]
    flood: usize,
    /// Messages in flight for the throughput measurement (chatd serves up
    /// to 1024 per shell)
    #[arg(long, default_value_t = 1000)]
    window: usize,
    /// Runs per command for the process timings
    #[arg(long, default_value_t = 200)]
    runs: usize,
    /// Rounds; the table shows medians
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

#[derive(Args, Debug)]
struct Common {
    /// Seconds measured per run
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    /// Seconds of load before measuring starts
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
    /// Spread clients over source addresses 127.0.0.1..=127.0.0.N (1 = off)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=254))]
    sources: u8,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Server address
    #[arg(long, default_value = "127.0.0.1:5555")]
    target: SocketAddr,
    #[arg(long, value_enum, default_value_t = Mode::Keepalive)]
    mode: Mode,
    #[arg(long, value_enum, default_value_t = Op::Probe)]
    op: Op,
    /// Concurrent clients
    #[arg(short = 'c', long, default_value_t = 16)]
    concurrency: usize,
    /// Path for --op get
    #[arg(long, default_value = "/")]
    path: String,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
struct CompareArgs {
    /// chat-server's address
    #[arg(long)]
    server: SocketAddr,
    /// The reference HTTP server's address (answers GET --path)
    #[arg(long)]
    reference: SocketAddr,
    /// Name of the reference server in the table
    #[arg(long, default_value = "nginx")]
    reference_name: String,
    #[arg(long, default_value = "/")]
    path: String,
    /// Rounds per row; the table shows medians
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Concurrency levels, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
struct FillArgs {
    #[arg(long, default_value = "127.0.0.1:5555")]
    target: SocketAddr,
    /// Registrations to make
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// Keep-alive connections to make them over
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// The server's process id, to read its resident memory before and after
    #[arg(long)]
    pid: Option<u32>,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=254))]
    sources: u8,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chat-bench: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chat-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(a) => {
            let load = Load {
                target: a.target,
                mode: a.mode,
                op: a.op,
                concurrency: a.concurrency,
                duration: secs(a.common.duration)?,
                warmup: secs(a.common.warmup)?,
                sources: a.common.sources,
                path: a.path,
            };
            let s = load::run(&load).await?;
            println!(
                "{:?} {:?} c={}: {:.0} requests/s, p50 {:.3} ms, p99 {:.3} ms, {} errors",
                load.op,
                load.mode,
                load.concurrency,
                s.rate(),
                s.quantile_ms(0.5),
                s.quantile_ms(0.99),
                s.errors
            );
            Ok(())
        }
        Command::Compare(a) => compare(a).await,
        Command::Fill(a) => fill(a).await,
        // Blocking IO, measured without the runtime's threads in the way.
        Command::Peer(a) => tokio::task::spawn_blocking(move || peer(a)).await?,
        Command::Echo { size } => link::echo(size),
    }
}

fn secs(s: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(s).context("durations are non-negative seconds")
}

/// The three columns of one row: reference GET, PROBE, REGISTER.
const COLUMNS: [Op; 3] = [Op::Get, Op::Probe, Op::Register];

async fn compare(a: CompareArgs) -> anyhow::Result<()> {
    if a.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    println!(
        "| connections | clients | {r} GET req/s | PROBE req/s | vs {r} (quartiles) | REGISTER req/s | vs {r} (quartiles) | p50 / p99 ms ({r} · PROBE · REGISTER) |",
        r = a.reference_name
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    for mode in [Mode::Transient, Mode::Keepalive] {
        for &c in &a.concurrency {
            // rates[column][round], and latency quantiles likewise.
            let mut rates = [vec![], vec![], vec![]];
            let mut p50 = [vec![], vec![], vec![]];
            let mut p99 = [vec![], vec![], vec![]];
            for round in 0..a.rounds {
                // Rotate who goes first, so neither side always meets a
                // machine warmed (or heated) by the other.
                for k in 0..COLUMNS.len() {
                    let col = (k + round) % COLUMNS.len();
                    let op = COLUMNS[col];
                    let load = Load {
                        target: if op == Op::Get { a.reference } else { a.server },
                        mode,
                        op,
                        concurrency: c,
                        duration: secs(a.common.duration)?,
                        warmup: secs(a.common.warmup)?,
                        sources: a.common.sources,
                        path: a.path.clone(),
                    };
                    let s: Summary = load::run(&load).await?;
                    if s.errors > 0 {
                        eprintln!("warning: {op:?} {mode:?} c={c}: {} errors", s.errors);
                    }
                    rates[col].push(s.rate());
                    p50[col].push(s.quantile_ms(0.5));
                    p99[col].push(s.quantile_ms(0.99));
                }
            }
            let r: Vec<f64> = rates.iter().map(|v| median(v)).collect();
            // Each ratio is taken within a round, whose three runs follow
            // one another, and the median of those is shown: a drift of
            // the machine between rounds then moves both sides of a ratio
            // alike instead of landing on one median and not the other.
            // The quartiles show how far the rounds disagree, which on a
            // shared machine is often more than the ratio's distance from 1.
            let ratio = |col: usize| {
                let per_round: Vec<f64> = rates[col]
                    .iter()
                    .zip(&rates[0])
                    .map(|(x, reference)| x / reference)
                    .collect();
                format!(
                    "{:.2}× ({:.2}–{:.2})",
                    median(&per_round),
                    quantile(&per_round, 0.25),
                    quantile(&per_round, 0.75)
                )
            };
            let l50: Vec<f64> = p50.iter().map(|v| median(v)).collect();
            let l99: Vec<f64> = p99.iter().map(|v| median(v)).collect();
            println!(
                "| {} | {c} | {:.0} | {:.0} | {} | {:.0} | {} | {:.2}/{:.2} · {:.2}/{:.2} · {:.2}/{:.2} |",
                match mode {
                    Mode::Transient => "transient",
                    _ => "keep-alive",
                },
                r[0],
                r[1],
                ratio(1),
                r[2],
                ratio(2),
                l50[0],
                l99[0],
                l50[1],
                l99[1],
                l50[2],
                l99[2],
            );
        }
    }
    Ok(())
}

async fn fill(a: FillArgs) -> anyhow::Result<()> {
    let before = a.pid.map(rss_bytes).transpose()?;
    let started = std::time::Instant::now();
    let n = load::fill(a.target, a.count, a.connections, a.sources).await?;
    let took = started.elapsed();
    println!(
        "registered {n} fresh ids in {:.1} s ({:.0}/s)",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64()
    );
    if let (Some(pid), Some(before)) = (a.pid, before) {
        let after = rss_bytes(pid)?;
        let per = after.saturating_sub(before) as f64 / n.max(1) as f64;
        println!(
            "server resident memory: {:.1} MiB before, {:.1} MiB after: {per:.0} bytes per registration",
            before as f64 / 1048576.0,
            after as f64 / 1048576.0
        );
    }
    Ok(())
}

/// Resident memory of process `pid`, from /proc (Linux).
fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| {
        format!("cannot read /proc/{pid}/status (is the pid right, and is this Linux?)")
    })?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS line in /proc/PID/status")?;
    Ok(kib * 1024)
}

fn peer(a: PeerArgs) -> anyhow::Result<()> {
    const SIZE: usize = 64;
    let mut ping = Vec::new();
    let mut ping_threads = Vec::new();
    let mut daemon = Vec::new();
    let mut client = Vec::new();
    let mut rate = Vec::new();
    let mut send_ms = Vec::new();
    let mut version_ms = Vec::new();
    let socket = a.socket.display().to_string();
    let ctl = a.chatctl.display().to_string();
    let send_argv: Vec<String> = [&ctl, "--socket", &socket, "send", &"x".repeat(SIZE)]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let version_argv = vec![ctl.clone(), "--version".to_owned()];
    for _ in 0..a.rounds.max(1) {
        let p = link::tcp_ping_pong(a.count, SIZE)?;
        ping.push(stats::quantile_ms(&p, 0.5));
        let t = link::tcp_ping_pong_threads(a.count, SIZE)?;
        ping_threads.push(stats::quantile_ms(&t, 0.5));
        let one = link::through_daemon(&a.socket, a.count, SIZE, 1)?;
        daemon.push(stats::quantile_ms(&one.daemon_rtt_us, 0.5));
        client.push(stats::quantile_ms(&one.client_rtt_us, 0.5));
        let flood = link::through_daemon(&a.socket, a.flood, SIZE, a.window)?;
        rate.push(flood.rate());
        version_ms.push(link::process_time_ms(&version_argv, a.runs)?);
        send_ms.push(link::process_time_ms(&send_argv, a.runs)?);
    }
    let (ping, daemon, client) = (median(&ping), median(&daemon), median(&client));
    let (send, version) = (median(&send_ms), median(&version_ms));
    println!("| measure | result | compared with | ratio | target |");
    println!("|---|---:|---|---:|---|");
    println!(
        "| round trip of a 64-byte message, send → stored and acknowledged by the peer daemon (p50) | {:.1} µs | bare TCP ping-pong between two processes, 64 bytes: {:.1} µs | {:.2}× | ≤ 2× |",
        daemon * 1000.0,
        ping * 1000.0,
        daemon / ping
    );
    println!(
        "| the same, seen by a client of the control socket (p50) | {:.1} µs | bare TCP ping-pong: {:.1} µs | {:.2}× | (includes the local socket hop) |",
        client * 1000.0,
        ping * 1000.0,
        client / ping
    );
    println!(
        "| messages/s over one link, {} in flight, each stored and acknowledged | {:.0} | | | ≥ 100,000 |",
        a.window,
        median(&rate)
    );
    println!(
        "| `chatctl send` (64 bytes, acknowledged), whole process (median) | {send:.2} ms | `chatctl --version`: {version:.2} ms | {:.2}× | ≤ 1.5× |",
        send / version
    );
    println!(
        "| for context: the same ping-pong between two threads of one process (p50) | {:.1} µs | | | |",
        median(&ping_threads) * 1000.0
    );
    if let Some(pid) = a.idle_pid {
        let rss = rss_bytes(pid)? as f64 / 1048576.0;
        println!("| idle daemon, resident memory | {rss:.1} MiB | | | < 10 MiB |");
    }
    Ok(())
}
