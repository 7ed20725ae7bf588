//! The peer link and the CLI, measured: messages through a chatting daemon
//! (send → stored and acknowledged by the peer's daemon), a bare TCP
//! ping-pong on the same machine to compare with, and whole-process times
//! of commands.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use chat_proto::frame::{Decoder, encode};
use chat_proto::ipc::{ClientFrame, DaemonFrame, Hello, MAX_FRAME, Reply, Request, VERSION};
use interprocess::local_socket::traits::Stream as _;
use interprocess::local_socket::{GenericFilePath, Stream, ToFsName};

use crate::stats::median;

/// What a run of messages through a daemon measured.
pub struct LinkRun {
    pub messages: usize,
    pub elapsed: Duration,
    /// Send → acknowledged, as the daemon measured it (µs, sorted).
    pub daemon_rtt_us: Vec<u64>,
    /// Request → reply, as this client saw it, control socket included.
    pub client_rtt_us: Vec<u64>,
}

impl LinkRun {
    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Sends `count` messages of `size` bytes through the daemon at `socket`,
/// with `window` in flight.
pub fn through_daemon(
    socket: &Path,
    count: usize,
    size: usize,
    window: usize,
) -> anyhow::Result<LinkRun> {
    let name = socket.to_fs_name::<GenericFilePath>()?;
    let mut stream = Stream::connect(name)
        .with_context(|| format!("cannot reach chatd at {}", socket.display()))?;
    let mut decoder = Decoder::new(MAX_FRAME);
    let mut out = Vec::new();
    encode(&Hello::ours("chat-bench"), MAX_FRAME, &mut out)?;
    stream.write_all(&out)?;
    let hello: Hello = read(&mut stream, &mut decoder)?;
    if hello.protocol != VERSION {
        bail!(
            "{} speaks control protocol v{}, chat-bench v{VERSION}",
            hello.software,
            hello.protocol
        );
    }
    // One frame, renumbered for each message.
    let mut frame = ClientFrame {
        id: 0,
        request: Request::Send {
            text: "x".repeat(size),
        },
    };
    let mut sent_at = std::collections::HashMap::new();
    let mut run = LinkRun {
        messages: 0,
        elapsed: Duration::ZERO,
        daemon_rtt_us: Vec::with_capacity(count),
        client_rtt_us: Vec::with_capacity(count),
    };
    let started = Instant::now();
    let mut next = 1u64;
    while run.messages < count {
        out.clear();
        while sent_at.len() < window && (next as usize) <= count {
            frame.id = next;
            encode(&frame, MAX_FRAME, &mut out)?;
            sent_at.insert(next, Instant::now());
            next += 1;
        }
        if !out.is_empty() {
            stream.write_all(&out)?;
        }
        match read::<DaemonFrame>(&mut stream, &mut decoder)? {
            DaemonFrame::Reply { id, result } => {
                let at = sent_at.remove(&id).context("a reply to nothing we sent")?;
                match result {
                    Ok(Reply::Sent { round_trip_us, .. }) => {
                        run.client_rtt_us.push(at.elapsed().as_micros() as u64);
                        run.daemon_rtt_us.push(round_trip_us);
                        run.messages += 1;
                    }
                    Ok(other) => bail!("unexpected reply {other:?}"),
                    Err(f) => bail!("not delivered: {}", f.message),
                }
            }
            DaemonFrame::Dropped { reason } => bail!("dropped: {reason}"),
            DaemonFrame::Record { .. } => {}
        }
    }
    run.elapsed = started.elapsed();
    run.daemon_rtt_us.sort_unstable();
    run.client_rtt_us.sort_unstable();
    Ok(run)
}

fn read<T: serde::de::DeserializeOwned>(
    stream: &mut Stream,
    decoder: &mut Decoder,
) -> anyhow::Result<T> {
    let mut chunk = [0u8; 64 * 1024];
    loop {
        if let Some(v) = decoder.decode::<T>()? {
            return Ok(v);
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("chatd closed the connection");
        }
        decoder.extend(&chunk[..n]);
    }
}

/// A bare TCP ping-pong of `size`-byte messages on 127.0.0.1 between this
/// process and an echo process (this program again, `chat-bench echo`):
/// two daemons are two processes, so two processes are the yardstick.
/// Returns the sorted round trips in microseconds.
pub fn tcp_ping_pong(count: usize, size: usize) -> anyhow::Result<Vec<u64>> {
    let exe = std::env::current_exe().context("cannot find chat-bench itself")?;
    let mut echo = Command::new(exe)
        .args(["echo", "--size", &size.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start the echo process")?;
    let mut line = String::new();
    {
        use std::io::BufRead;
        let out = echo
            .stdout
            .take()
            .context("no stdout from the echo process")?;
        std::io::BufReader::new(out).read_line(&mut line)?;
    }
    let port: u16 = line
        .trim()
        .parse()
        .context("the echo process did not say its port")?;
    let result = TcpStream::connect(("127.0.0.1", port))
        .map_err(anyhow::Error::from)
        .and_then(|s| ping(s, count, size));
    let _ = echo.kill();
    let _ = echo.wait();
    result
}

/// `count` round trips of `size` bytes on `s`; sorted microseconds.
fn ping(mut s: TcpStream, count: usize, size: usize) -> anyhow::Result<Vec<u64>> {
    s.set_nodelay(true)?;
    let msg = vec![7u8; size];
    let mut back = vec![0u8; size];
    let mut rtts = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
        rtts.push(t.elapsed().as_micros() as u64);
    }
    rtts.sort_unstable();
    Ok(rtts)
}

/// The same ping-pong between two threads of this process, shown beside
/// it for context.
pub fn tcp_ping_pong_threads(count: usize, size: usize) -> anyhow::Result<Vec<u64>> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || echo_one(&listener, size));
    let rtts = ping(TcpStream::connect(addr)?, count, size);
    let _ = echo.join();
    rtts
}

/// The other end of [`tcp_ping_pong`]: prints its port, then echoes
/// `size`-byte messages on one connection until it closes.
pub fn echo(size: usize) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    println!("{}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    Ok(echo_one(&listener, size)?)
}

/// Echoes `size`-byte messages on the next connection until it closes.
fn echo_one(listener: &TcpListener, size: usize) -> std::io::Result<()> {
    let (mut s, _) = listener.accept()?;
    s.set_nodelay(true)?;
    let mut buf = vec![0u8; size];
    while s.read_exact(&mut buf).is_ok() {
        s.write_all(&buf)?;
    }
    Ok(())
}

/// The median whole-process time of `argv`, over `runs` runs, in ms.
pub fn process_time_ms(argv: &[String], runs: usize) -> anyhow::Result<f64> {
    let (program, args) = argv.split_first().context("no command given")?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot run {program}"))?;
        let status = child.wait()?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        if !status.success() {
            bail!("{argv:?} failed: {status}");
        }
    }
    Ok(median(&times))
}
