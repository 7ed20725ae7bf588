//! The peer link's IO: the listener on `--port`, outgoing connections, the
//! HTTP-style handshake, and a reader and a writer task per open link.
//!
//! The session decides; this module only moves bytes. Incoming handshakes
//! are parsed here and handed to the core, which answers with a decision;
//! frames read from a link go to the core in order, and the core's frames
//! go out through the link's writer, which coalesces whatever is queued into
//! one write.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use chat_proto::ClientId;
use chat_proto::crypto::{Calling, Link, Opener, Parties, PeerKey, Sealer};
use chat_proto::frame::Decoder;
use chat_proto::peer::{Answer, Hello, MAX_FRAME, Opening, PeerFrame, parse_answer, parse_hello};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, timeout_at};

use crate::daemon::CoreEvent;
use crate::session::{Input, LinkId};

/// Incoming handshakes in progress at once; past it, connections are closed.
const MAX_HANDSHAKES: usize = 64;
/// Of those, from one source (an IPv4 address, an IPv6 /64): one host
/// holding connections open half-way cannot take every place.
const MAX_HANDSHAKES_PER_SOURCE: usize = 8;

/// How long a handshake may take, either way.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one write to a peer may take. A peer that stops reading would
/// otherwise hold its writer task and socket for ever, even after the chat
/// has ended (the session has long timed out its acks by then).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the core sends a link's writer.
#[derive(Debug)]
pub enum LinkOut {
    Data(Vec<u8>),
    /// Send what is queued, then close.
    Close,
}

/// The core's side of an open link. Dropping it stops the link's reader
/// and writer wherever they are, which closes the socket: a peer that
/// never closes its end cannot keep them alive.
#[derive(Debug)]
pub struct LinkHandle {
    pub out: mpsc::UnboundedSender<LinkOut>,
    _alive: watch::Sender<()>,
}

/// The link tasks' side: the frames to write, and the signal that the core
/// has let the link go.
#[derive(Debug)]
pub struct LinkQueue {
    frames: mpsc::UnboundedReceiver<LinkOut>,
    alive: watch::Receiver<()>,
}

/// The core's answer to an incoming handshake. On accepting, the core has
/// already made the link's queue (frames may be queued at once); `out` is
/// the writer's end of it. It has checked the caller's handshake message
/// too: `handshake` is the answer to send, `keys` the link's.
#[derive(Debug)]
pub enum Decision {
    Accept {
        link: LinkId,
        me: ClientId,
        out: LinkQueue,
        handshake: Vec<u8>,
        keys: Link,
    },
    Refuse {
        status: u16,
        reason: String,
    },
}

/// A new link's queue: the core keeps the handle, the writer the receiver.
/// Made by the core when it accepts or opens a link, so that no frame it
/// queues in the meantime can be lost.
pub fn queue() -> (LinkHandle, LinkQueue) {
    let (out, frames) = mpsc::unbounded_channel();
    let (alive_tx, alive) = watch::channel(());
    (
        LinkHandle {
            out,
            _alive: alive_tx,
        },
        LinkQueue { frames, alive },
    )
}

/// Binds the peer port, so that a port in use is an error at start-up.
///
/// On `ip` alone when given (`--bind`). Otherwise IPv6 and IPv4 both
/// (`[::]` without V6ONLY): the server records the address it saw us come
/// from, which may be either, and a peer must be able to reach us at it.
/// On a host without IPv6, IPv4 alone.
pub fn bind(ip: Option<std::net::IpAddr>, port: u16) -> std::io::Result<std::net::TcpListener> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
    let l = match ip {
        Some(ip) => listen(SocketAddr::new(ip, port), false)?,
        None => match listen(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), true) {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => return Err(e),
            Err(_) => listen(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)), false)?,
        },
    };
    l.set_nonblocking(true)?;
    Ok(l)
}

/// A listening socket on `addr`; `dual` takes IPv4 too on an IPv6 one.
fn listen(addr: std::net::SocketAddr, dual: bool) -> std::io::Result<std::net::TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if dual {
        s.set_only_v6(false)?;
    }
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(128)?;
    Ok(s.into())
}

/// Accepts peers until the core goes away.
pub async fn accept_loop(listener: std::net::TcpListener, core: mpsc::Sender<CoreEvent>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("cannot watch the peer port: {e}");
            return;
        }
    };
    // Handshakes in progress hold a descriptor each for up to seconds: a
    // flood of connections that never finish one must not use up the
    // daemon's descriptors (and with them its control socket).
    let handshakes = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let sources = std::sync::Arc::new(Sources::default());
    let mut warned: Option<Instant> = None;
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                let place = sources.enter(addr.ip());
                let permit = std::sync::Arc::clone(&handshakes).try_acquire_owned();
                let (Some(place), Ok(permit)) = (place, permit) else {
                    // Told once a minute: it is what a peer that cannot
                    // reach this daemon would ask about.
                    if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                        warned = Some(Instant::now());
                        tracing::warn!(
                            %addr,
                            "refusing peer connections: too many handshakes in progress (at most {MAX_HANDSHAKES}, {MAX_HANDSHAKES_PER_SOURCE} from one address)"
                        );
                    }
                    continue;
                };
                let core = core.clone();
                tokio::spawn(async move {
                    incoming(stream, addr, core).await;
                    drop((permit, place));
                });
            }
            Err(e) => {
                tracing::warn!("accepting a peer failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        if core.is_closed() {
            return;
        }
    }
}

/// Handshakes in progress per source.
#[derive(Default)]
struct Sources(std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>);

/// One handshake's place in [`Sources`], given back when dropped.
struct Place(std::sync::Arc<Sources>, IpAddr);

impl Sources {
    /// A place for a handshake from `ip`, unless its source has all of its.
    fn enter(self: &std::sync::Arc<Self>, ip: IpAddr) -> Option<Place> {
        let source = source_of(ip);
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(source).or_default();
        if *n >= MAX_HANDSHAKES_PER_SOURCE {
            return None;
        }
        *n += 1;
        Some(Place(std::sync::Arc::clone(self), source))
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut counts = self.0.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.1);
            }
        }
    }
}

/// An IPv4 address (IPv4-mapped too) as it is; an IPv6 one by its /64,
/// the block one host usually holds.
fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        v4 => v4,
    }
}

async fn incoming(mut stream: TcpStream, addr: SocketAddr, core: mpsc::Sender<CoreEvent>) {
    let _ = stream.set_nodelay(true);
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let mut buf = Vec::with_capacity(1024);
    let (hello, used) = loop {
        match timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
        match parse_hello(&buf) {
            Ok(Some(Opening { hello, used })) => break (hello, used),
            Ok(None) => continue,
            Err(e) => return refuse(stream, e.status(), e.to_string()).await,
        }
    };
    let (hello, handshake) = match hello {
        Ok(h) => h,
        Err((status, reason)) => return refuse(stream, status, reason).await,
    };
    tracing::debug!(%addr, peer = %hello.id, "peer asks to chat");
    let (decide, decision) = oneshot::channel();
    if core
        .send(CoreEvent::Incoming {
            hello,
            handshake,
            addr,
            decide,
        })
        .await
        .is_err()
    {
        return refuse(stream, 503, "the daemon is stopping".into()).await;
    }
    // The core decides as soon as it sees the request; this bound only
    // guards against a daemon stuck on something else.
    let decided = Instant::now() + HANDSHAKE_TIMEOUT;
    match timeout_at(decided, decision).await {
        Ok(Ok(Decision::Accept {
            link,
            me,
            out: queue,
            handshake,
            keys,
        })) => {
            let mut out = Vec::new();
            Answer::Accepted { id: me, handshake }.encode(&mut out);
            if stream.write_all(&out).await.is_err() {
                let _ = core
                    .send(CoreEvent::Session(Input::LinkClosed {
                        link,
                        reason: "connection lost during the handshake".into(),
                    }))
                    .await;
                return;
            }
            start(stream, link, keys, buf.split_off(used), core.clone(), queue);
        }
        Ok(Ok(Decision::Refuse { status, reason })) => refuse(stream, status, reason).await,
        // The core, deciding later, finds this end gone and ends the link.
        _ => {
            refuse(
                stream,
                503,
                "the daemon did not answer in time; try again".into(),
            )
            .await
        }
    }
}

async fn refuse(mut stream: TcpStream, status: u16, reason: String) {
    let mut out = Vec::new();
    Answer::Refused { status, reason }.encode(&mut out);
    if stream.write_all(&out).await.is_ok() {
        let _ = stream.shutdown().await;
        // Drain briefly so our answer is not reset away by unread input.
        let mut sink = [0u8; 1024];
        let deadline = Instant::now() + Duration::from_secs(1);
        while let Ok(Ok(n)) = timeout_at(deadline, stream.read(&mut sink)).await {
            if n == 0 {
                break;
            }
        }
    }
}

/// Whom a call is for, and how it proves the server introduced it.
#[derive(Debug)]
pub struct Callee {
    pub addr: SocketAddr,
    pub id: ClientId,
    pub key: PeerKey,
}

/// Opens link `link` to `to`, from `source` if `--bind` named one (as
/// requests to the server leave from it), and reports the outcome to the
/// core; `queue` is the writer's end of the link's queue.
pub async fn connect(
    link: LinkId,
    to: Callee,
    source: Option<IpAddr>,
    hello: Hello,
    core: mpsc::Sender<CoreEvent>,
    queue: LinkQueue,
) {
    let addr = to.addr;
    let outcome = async {
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        let failed = |reason: String| Input::LinkFailed {
            link,
            refused: None,
            reason,
            nobody_listens: false,
        };
        let late = || {
            failed(format!(
                "no answer within {} s",
                HANDSHAKE_TIMEOUT.as_secs()
            ))
        };
        let io = |e: std::io::Error| failed(e.to_string());
        let local = crate::rendezvous::local_for(source, addr).map_err(failed)?;
        let mut stream = match timeout_at(deadline, crate::rendezvous::connect(local, addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let why = match source {
                    Some(_) => format!("{e} (calling from {}, --bind)", local.ip()),
                    None => e.to_string(),
                };
                return Err(Input::LinkFailed {
                    link,
                    refused: None,
                    reason: why,
                    nobody_listens: e.kind() == std::io::ErrorKind::ConnectionRefused,
                });
            }
            Err(_) => return Err(late()),
        };
        let _ = stream.set_nodelay(true);
        let parties = Parties {
            caller: hello.id,
            callee: to.id,
            turns: hello.turns,
        };
        let (calling, first) =
            Calling::start(&to.key, &parties).map_err(|e| failed(e.to_string()))?;
        let mut out = Vec::new();
        hello.encode(&addr.to_string(), &first, &mut out);
        match timeout_at(deadline, stream.write_all(&out)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(io(e)),
            Err(_) => return Err(late()),
        }
        let mut buf = Vec::with_capacity(1024);
        loop {
            match timeout_at(deadline, stream.read_buf(&mut buf)).await {
                Ok(Ok(0)) => {
                    return Err(failed(
                        "the peer closed the connection during the handshake".into(),
                    ));
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(io(e)),
                Err(_) => return Err(late()),
            }
            match parse_answer(&buf) {
                Ok(Some((Answer::Accepted { id, handshake }, used))) => {
                    let keys = calling.finish(&handshake).map_err(|_| {
                        failed(format!(
                            "{addr} answered as {id} but could not prove it holds {}'s registration (its answer does not match the key the server gave): not the peer the server introduced, or it registered anew since",
                            to.id
                        ))
                    })?;
                    return Ok((stream, id, keys, buf.split_off(used)));
                }
                Ok(Some((Answer::Refused { status, reason }, _))) => {
                    return Err(Input::LinkFailed {
                        link,
                        refused: Some(status),
                        reason: format!("refused ({status}): {reason}"),
                        nobody_listens: false,
                    });
                }
                Ok(None) => {}
                Err(e) => return Err(failed(format!("not a chatd: {e}"))),
            }
        }
    };
    match outcome.await {
        Ok((stream, peer, keys, leftover)) => {
            start(stream, link, keys, leftover, core.clone(), queue);
            let _ = core
                .send(CoreEvent::Session(Input::LinkUp { link, peer }))
                .await;
        }
        Err(failure) => {
            let _ = core.send(CoreEvent::Session(failure)).await;
        }
    }
}

/// Starts the reader and writer of an open link; `leftover` is what was
/// read past the handshake.
fn start(
    stream: TcpStream,
    link: LinkId,
    keys: Link,
    leftover: Vec<u8>,
    core: mpsc::Sender<CoreEvent>,
    queue: LinkQueue,
) {
    let (read, write) = stream.into_split();
    let (sealer, mut opener) = keys.split();
    opener.extend(&leftover);
    tokio::spawn(reader(read, link, opener, core, queue.alive.clone()));
    tokio::spawn(writer(write, sealer, queue));
}

async fn reader(
    mut read: OwnedReadHalf,
    link: LinkId,
    mut opener: Opener,
    core: mpsc::Sender<CoreEvent>,
    mut alive: watch::Receiver<()>,
) {
    let mut decoder = Decoder::new(MAX_FRAME);
    let reason = 'read: loop {
        if let Err(e) = opener.open(decoder.buffer()) {
            break format!("the link failed: {e}");
        }
        loop {
            match decoder.decode::<PeerFrame>() {
                Ok(Some(frame)) => {
                    if core
                        .send(CoreEvent::Session(Input::Frame { link, frame }))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => break 'read format!("the peer sent a bad frame ({e})"),
            }
        }
        let read = tokio::select! {
            read = read.read_buf(opener.buffer()) => read,
            // The core has let the link go: nobody is left to tell.
            _ = alive.changed() => return,
        };
        match read {
            Ok(0) => {
                break if let Err(e) = opener.finish() {
                    e.to_string()
                } else if let Err(e) = decoder.finish() {
                    e.to_string()
                } else {
                    "connection closed".to_owned()
                };
            }
            Ok(_) => {}
            Err(e) => break e.to_string(),
        }
    };
    let _ = core
        .send(CoreEvent::Session(Input::LinkClosed { link, reason }))
        .await;
}

async fn writer(mut write: OwnedWriteHalf, mut sealer: Sealer, queue: LinkQueue) {
    let LinkQueue {
        frames: mut rx,
        mut alive,
    } = queue;
    let mut batch = Vec::new();
    let mut sealed = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut close = false;
        let mut next = Some(first);
        // Coalesce everything already queued into one write.
        while let Some(item) = next.take() {
            match item {
                LinkOut::Data(bytes) => {
                    if batch.is_empty() {
                        batch = bytes;
                    } else {
                        batch.extend_from_slice(&bytes);
                    }
                }
                LinkOut::Close => {
                    close = true;
                    break;
                }
            }
            next = rx.try_recv().ok();
        }
        sealed.clear();
        if let Err(e) = sealer.seal(&batch, &mut sealed) {
            // The reader finds the link closed and tells the core.
            tracing::error!("cannot encrypt for the peer: {e}");
            return;
        }
        let written = async {
            if !sealed.is_empty() {
                write.write_all(&sealed).await?;
            }
            if close {
                write.shutdown().await?;
            }
            std::io::Result::Ok(())
        };
        let done = tokio::select! {
            w = tokio::time::timeout(WRITE_TIMEOUT, written) => matches!(w, Ok(Ok(()))),
            _ = alive.changed() => false,
        };
        if !done || close {
            return;
        }
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_proto::frame::encode;
    use tokio::net::TcpListener;

    #[test]
    fn one_source_gets_only_its_share_of_handshakes() {
        let sources = std::sync::Arc::new(Sources::default());
        let one: IpAddr = "192.0.2.1".parse().unwrap();
        let mut held: Vec<Place> = (0..MAX_HANDSHAKES_PER_SOURCE)
            .map(|_| sources.enter(one).expect("a place"))
            .collect();
        assert!(sources.enter(one).is_none(), "over its share");
        // Its own IPv4-mapped form is the same source.
        assert!(sources.enter("::ffff:192.0.2.1".parse().unwrap()).is_none());
        assert!(sources.enter("192.0.2.2".parse().unwrap()).is_some());
        held.pop();
        assert!(sources.enter(one).is_some(), "a place given back");
        // An IPv6 /64 is one source.
        let v6: Vec<Place> = (0..MAX_HANDSHAKES_PER_SOURCE)
            .map(|i| {
                sources
                    .enter(format!("2001:db8::{i}").parse().unwrap())
                    .unwrap()
            })
            .collect();
        assert!(sources.enter("2001:db8::ffff".parse().unwrap()).is_none());
        assert!(sources.enter("2001:db8:0:1::1".parse().unwrap()).is_some());
        drop((held, v6));
        assert!(sources.0.lock().unwrap().is_empty(), "nothing kept");
    }

    /// With `--bind`, a call leaves from the bound address, as requests to
    /// the server do; one of the other IP version fails with a reason.
    #[tokio::test]
    async fn a_call_leaves_from_the_bound_address() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hello = || Hello {
            id: "me".parse().unwrap(),
            turns: false,
        };
        let (core, mut events) = mpsc::channel(16);
        let bound: IpAddr = "127.0.0.2".parse().unwrap();
        let to = || Callee {
            addr,
            id: "you".parse().unwrap(),
            key: PeerKey::from_bytes([1; 16]),
        };
        let (_handle, q) = queue();
        tokio::spawn(connect(1, to(), Some(bound), hello(), core.clone(), q));
        let (_callee, from) = listener.accept().await.unwrap();
        assert_eq!(from.ip(), bound);

        let (_handle, q) = queue();
        connect(2, to(), Some("::1".parse().unwrap()), hello(), core, q).await;
        match events.recv().await {
            Some(CoreEvent::Session(Input::LinkFailed {
                link: 2, reason, ..
            })) => {
                assert!(reason.contains("not the same IP version"), "{reason}");
            }
            _ => panic!("expected link 2 to fail"),
        }
    }

    /// Once the core lets a link go, its socket is closed for good, even
    /// when the peer never closes its end: the peer's writes are reset.
    #[tokio::test]
    async fn letting_a_link_go_closes_its_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut remote = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (ours, _) = listener.accept().await.unwrap();
        let (core, mut events) = mpsc::channel(16);
        let (handle, queue) = queue();
        let key = PeerKey::from_bytes([1; 16]);
        let parties = Parties {
            caller: "a".parse().unwrap(),
            callee: "b".parse().unwrap(),
            turns: false,
        };
        let (calling, first) = Calling::start(&key, &parties).unwrap();
        let (keys, reply) = chat_proto::crypto::answer(&key, &parties, &first).unwrap();
        let (mut remote_sealer, _) = calling.finish(&reply).unwrap().split();
        start(ours, 7, keys, Vec::new(), core, queue);
        let mut frame = Vec::new();
        encode(&PeerFrame::Ping, MAX_FRAME, &mut frame).unwrap();
        let mut ping = Vec::new();
        remote_sealer.seal(&frame, &mut ping).unwrap();
        remote.write_all(&ping).await.unwrap();
        let first = events.recv().await;
        assert!(matches!(
            first,
            Some(CoreEvent::Session(Input::Frame {
                link: 7,
                frame: PeerFrame::Ping
            }))
        ));
        drop(handle);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "the link's socket stayed open");
            let step = Duration::from_millis(50);
            if let Ok(Err(_)) = tokio::time::timeout(step, remote.write_all(&ping)).await {
                break;
            }
            let mut sink = [0u8; 64];
            if let Ok(Err(_)) = tokio::time::timeout(step, remote.read(&mut sink)).await {
                break;
            }
            // Keep the core's end open and empty, as a live daemon would.
            while events.try_recv().is_ok() {}
        }
    }
}
