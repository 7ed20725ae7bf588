//! The control socket's IO: one task per attached shell.
//!
//! Each connection states its protocol version first; then its requests go
//! to the core, and whatever the core has for it (replies, records for
//! `tail -f`) goes out through a queue drained by a writer task. Answers
//! are bounded by the requests that asked for them, and a request's place
//! among the [`IN_FLIGHT`] is given back only once its answer is written,
//! so a shell that asks and never reads stops being read. Live records are
//! bounded by [`QUEUE`]: a follower that lets more pile up is dropped with
//! a last frame saying so, never allowed to hold the daemon or the other
//! shells up (tailscale's choice), and what was queued for it is let go at
//! once. A shell that leaves output unread for [`WRITE_TIMEOUT`] is let go
//! too. A malformed or oversized frame ends that one connection with an
//! error frame; nothing else notices.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use chat_proto::frame::{Decoder, encode};
use chat_proto::ipc::{ClientFrame, DaemonFrame, Hello, MAX_FRAME, VERSION};
use interprocess::local_socket::tokio::{Listener, Stream};
use interprocess::local_socket::traits::tokio::Listener as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::timeout;

use crate::daemon::CoreEvent;

/// Live records waiting for one follower; past this, it is dropped.
pub const QUEUE: usize = 4096;
/// Requests one shell may have in flight; its reader waits beyond that, so
/// replies always fit the queue.
pub const IN_FLIGHT: usize = 1024;
/// Time a new connection has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a shell may leave written output unread before it is let go.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Identifies one attached shell.
pub type ClientKey = u64;

/// The core's handle on one shell.
///
/// Its queue carries two kinds of frames. Answers to its own requests
/// (replies, and the records a `tail` or `history` asked for) are bounded
/// by the request itself: at most [`IN_FLIGHT`] requests, at most
/// [`MAX_RECORDS`] records each. Live records for a follower are bounded
/// by [`QUEUE`]: a follower that lets more pile up is dropped.
pub struct ClientHandle {
    pub queue: mpsc::UnboundedSender<Queued>,
    /// Live records queued and not yet written.
    pub live: Arc<AtomicUsize>,
    /// Bytes of records answering requests, queued and not yet written.
    pub answer_bytes: Arc<AtomicUsize>,
    /// Set by the core when too many live records piled up: the writer
    /// then ends the connection with a last `Dropped` frame.
    pub lagged: Arc<AtomicBool>,
}

/// The most records one `tail` or `history` request returns.
pub const MAX_RECORDS: u32 = 100_000;

/// The most bytes of records answering requests that may wait for one
/// shell: a shell that asks for history and does not read it gets an error
/// rather than the daemon's memory.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// A frame on its way to a shell, with what it counts against.
#[derive(Debug)]
pub struct Queued {
    pub frame: DaemonFrame,
    /// A live record for a follower (counted against [`QUEUE`]).
    pub live: bool,
    /// Bytes counted against [`MAX_ANSWER_BYTES`].
    pub bytes: usize,
    /// The request's place among the shell's [`IN_FLIGHT`], given back
    /// only once its reply is written: a shell that sends requests and
    /// never reads the replies stops being read, instead of piling
    /// replies up in the daemon's memory.
    pub permit: Option<OwnedSemaphorePermit>,
}

impl Queued {
    pub fn answer(frame: DaemonFrame) -> Queued {
        let bytes = match &frame {
            DaemonFrame::Record { record, .. } => record_bytes(record),
            _ => 0,
        };
        Queued {
            frame,
            live: false,
            bytes,
            permit: None,
        }
    }

    /// A reply that holds its request's permit until written.
    pub fn reply(frame: DaemonFrame, permit: OwnedSemaphorePermit) -> Queued {
        Queued {
            permit: Some(permit),
            ..Queued::answer(frame)
        }
    }

    pub fn live(frame: DaemonFrame) -> Queued {
        Queued {
            frame,
            live: true,
            bytes: 0,
            permit: None,
        }
    }
}

/// About what a record costs held in memory.
pub fn record_bytes(record: &chat_proto::ipc::Record) -> usize {
    use chat_proto::ipc::RecordKind;
    64 + match &record.kind {
        RecordKind::Message { text, .. } | RecordKind::Notice { text } => text.len(),
        RecordKind::State { .. } => 0,
    }
}

/// Accepts shells until the core goes away.
pub async fn accept_loop(listener: Listener, core: mpsc::Sender<CoreEvent>) {
    let mut next: ClientKey = 1;
    loop {
        match listener.accept().await {
            Ok(stream) => {
                let key = next;
                next += 1;
                let core = core.clone();
                tokio::spawn(async move { serve(stream, key, core).await });
            }
            Err(e) => {
                tracing::warn!("accepting a control connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        if core.is_closed() {
            return;
        }
    }
}

async fn serve(stream: Stream, key: ClientKey, core: mpsc::Sender<CoreEvent>) {
    // `&Stream` reads and writes: the reader and the writer share it.
    let stream = Arc::new(stream);
    let mut recv = &*stream;
    let mut send = &*stream;
    let mut decoder = Decoder::new(MAX_FRAME);
    // The hello exchange: both sides state their version.
    let theirs = match timeout(HELLO_TIMEOUT, read_frame::<Hello>(&mut recv, &mut decoder)).await {
        Ok(Ok(Some(h))) => h,
        Ok(Ok(None)) => return,
        Ok(Err(reason)) => {
            tracing::debug!(key, "bad hello: {reason}");
            let _ = write_frame(&mut send, &DaemonFrame::Dropped { reason }).await;
            return;
        }
        Err(_) => return,
    };
    if write_frame(&mut send, &Hello::ours("chatd")).await.is_err() || theirs.protocol != VERSION {
        // The client reports the mismatch with both versions.
        tracing::debug!(
            key,
            theirs = theirs.protocol,
            ours = VERSION,
            "protocol mismatch with {}",
            theirs.software
        );
        return;
    }
    let (queue, rx) = mpsc::unbounded_channel();
    let lagged = Arc::new(AtomicBool::new(false));
    let live = Arc::new(AtomicUsize::new(0));
    let answer_bytes = Arc::new(AtomicUsize::new(0));
    // Only the core holds the queue's sender: when it lets go (the shell
    // detached, or fell behind), the writer drains what is queued and ends.
    let handle = ClientHandle {
        queue,
        live: Arc::clone(&live),
        answer_bytes: Arc::clone(&answer_bytes),
        lagged: Arc::clone(&lagged),
    };
    if core.send(CoreEvent::Attach { key, handle }).await.is_err() {
        return;
    }
    let mut writer = tokio::spawn(writer(Arc::clone(&stream), rx, live, answer_bytes, lagged));
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    let reading = async {
        loop {
            match read_frame::<ClientFrame>(&mut recv, &mut decoder).await {
                Ok(Some(frame)) => {
                    let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                        return None;
                    };
                    let event = CoreEvent::Request {
                        key,
                        id: frame.id,
                        request: frame.request,
                        permit,
                    };
                    if core.send(event).await.is_err() {
                        return None;
                    }
                }
                Ok(None) => return None,
                Err(reason) => {
                    tracing::debug!(key, "dropping control connection: {reason}");
                    return Some(reason);
                }
            }
        }
    };
    let reason = tokio::select! {
        reason = reading => {
            if reason.is_none() {
                // The end of the shell's input (`socat` half-closes so) is
                // the end of its requests, not of its interest in their
                // answers: those still go out, each giving its permit back
                // once written, before the shell is let go. For a while:
                // a shell that closed for good cannot be told from one
                // that only stopped writing, and one that gave up on a
                // `wait` must not be kept until the state comes.
                let all = Arc::clone(&permits).acquire_many_owned(IN_FLIGHT as u32);
                tokio::select! {
                    _ = timeout(WRITE_TIMEOUT, all) => {}
                    _ = &mut writer => {}
                }
            }
            reason
        }
        // The writer ended: the core dropped this shell (it fell behind,
        // and was told), or the shell stopped reading. Either way the core
        // must forget it, or it would keep it (and its searches) for good.
        _ = &mut writer => None,
    };
    let _ = core.send(CoreEvent::Detach { key, reason }).await;
    // A finished task's handle must not be awaited again.
    if !writer.is_finished() {
        let _ = writer.await;
    }
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
async fn read_frame<T: serde::de::DeserializeOwned>(
    recv: &mut &Stream,
    decoder: &mut Decoder,
) -> Result<Option<T>, String> {
    loop {
        match decoder.decode::<T>() {
            Ok(Some(v)) => return Ok(Some(v)),
            Ok(None) => {}
            Err(e) => return Err(format!("bad frame on the control socket: {e}")),
        }
        match recv.read_buf(decoder.buffer()).await {
            Ok(0) => return decoder.finish().map(|()| None).map_err(|e| e.to_string()),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

async fn write_frame<T: serde::Serialize>(send: &mut &Stream, value: &T) -> std::io::Result<()> {
    let mut out = Vec::new();
    encode(value, MAX_FRAME, &mut out).map_err(std::io::Error::other)?;
    send.write_all(&out).await
}

async fn writer(
    stream: Arc<Stream>,
    mut rx: mpsc::UnboundedReceiver<Queued>,
    live: Arc<AtomicUsize>,
    answer_bytes: Arc<AtomicUsize>,
    lagged: Arc<AtomicBool>,
) {
    let mut send = &*stream;
    let mut out = Vec::with_capacity(4096);
    let mut permits = Vec::new();
    while let Some(first) = rx.recv().await {
        // Dropped for falling behind: what is still queued is not written
        // (the shell is not reading it), only a last word, and the memory
        // goes back now.
        if lagged.load(Ordering::Acquire) {
            break;
        }
        out.clear();
        let mut next = Some(first);
        let mut live_written = 0;
        let mut bytes_written = 0;
        // Everything queued goes out in one write.
        while let Some(Queued {
            frame,
            live: is_live,
            bytes,
            permit,
        }) = next.take()
        {
            if let Err(e) = encode(&frame, MAX_FRAME, &mut out) {
                tracing::warn!("a frame for chatctl could not be encoded: {e}");
            }
            live_written += usize::from(is_live);
            bytes_written += bytes;
            permits.extend(permit);
            if out.len() > 256 * 1024 {
                break;
            }
            next = rx.try_recv().ok();
        }
        // A shell that stops reading for this long is gone as far as the
        // daemon is concerned: its queue is let go.
        match timeout(WRITE_TIMEOUT, send.write_all(&out)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!("a shell went away: {e}");
                return;
            }
            Err(_) => {
                tracing::debug!("a shell read nothing for {WRITE_TIMEOUT:?}: dropped");
                return;
            }
        }
        permits.clear();
        live.fetch_sub(live_written, Ordering::AcqRel);
        answer_bytes.fetch_sub(bytes_written, Ordering::AcqRel);
    }
    drop(rx);
    if lagged.load(Ordering::Acquire) {
        let reason = format!(
            "dropped: this shell fell more than {QUEUE} events behind; run `chatctl tail` again to catch up from history"
        );
        let last = DaemonFrame::Dropped { reason };
        let _ = timeout(WRITE_TIMEOUT, write_frame(&mut send, &last)).await;
    }
    let _ = timeout(WRITE_TIMEOUT, send.flush()).await;
}
