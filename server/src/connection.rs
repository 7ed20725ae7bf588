//! One TCP connection: read requests, answer them in order, close.
//!
//! Both the seeds' transient connections (one request, then close) and HTTP
//! keep-alive are served, pipelined requests included. Every wait has a
//! deadline: a request must arrive whole within the header timeout from its
//! first byte (from accept, for the first one), so slow-loris connections
//! are cut off, and an idle keep-alive connection is closed after the idle
//! timeout. When the server closes a connection that is not clean, it sends
//! its last response, half-closes and drains for a moment before closing
//! (as nginx's lingering close does): closing with unread input would make
//! the kernel reset the connection and could destroy that last response.

use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::Duration;

use chat_proto::rendezvous::{
    ErrorStatus, Failure, MAX_HEAD, Parsed, RequestHead, Response, ResponseFraming, parse_request,
};
use tokio::sync::watch;
use tokio::time::{Instant, timeout_at};

use crate::state::{State, Via};
use crate::stream::Stream;

/// Timeouts for one connection.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// A request must arrive complete within this.
    pub header: Duration,
    /// A keep-alive connection with no request in progress is closed
    /// after this.
    pub idle: Duration,
}

/// How long a lingering close drains input, and how much at most.
pub const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 64 * 1024;

/// Serves one connection until it closes.
pub async fn serve(
    mut stream: Stream,
    peer: SocketAddr,
    state: &State,
    timeouts: Timeouts,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut out: Vec<u8> = Vec::with_capacity(512);
    let mut now = Instant::now();
    // When the current request must be complete (from accept, for the
    // first one), or when an idle keep-alive connection is closed.
    let mut deadline = now + timeouts.header;
    // Between requests on a keep-alive connection, where the idle timeout
    // applies instead of the header timeout.
    let mut idle = false;
    // One timer for the connection's life. It is moved only when it would
    // fire too late; firing early just re-arms it, which costs far less
    // than re-arming it for every request.
    let timer = tokio::time::sleep_until(deadline);
    tokio::pin!(timer);
    let mut timer_armed = Armed::default();
    // A second receiver to read the version with, as `stop` holds the
    // first.
    let watcher = shutdown.clone();
    let stop = shutdown.changed();
    tokio::pin!(stop);
    let mut stop_armed = Armed::default();
    let mut stopping = false;
    let mut heads = Heads::default();
    loop {
        // Answer every complete request already buffered, then write the
        // answers in one go.
        loop {
            let head = match heads.next(&buf) {
                Ok(Some(head)) => head,
                Ok(None) => break,
                Err(failure) => {
                    return finish_with_error(stream, out, failure, now + timeouts.header).await;
                }
            };
            let total = head.head_len + head.content_length;
            crate::busy_poll::served();
            let at = state.at(now.into_std());
            // A proxy's bad header is charged to the proxy, as any other
            // bad request is to its sender.
            let (source, bad_header) =
                match state.client_of(peer.ip(), &head, &buf[..head.head_len]) {
                    Ok(source) => (source, None),
                    Err(failure) => (peer.ip(), Some(failure)),
                };
            let response = match (state.admit(source, Via::Tcp, at), bad_header) {
                (Err(refusal), _) => Response::Error(state.refused(refusal)),
                (Ok(()), Some(failure)) => Response::Error(failure),
                (Ok(()), None) => state.answer(&head, source, at),
            };
            let close = head.close || stopping;
            response.encode(
                &mut out,
                &ResponseFraming {
                    close,
                    keep_alive: head.keep_alive_10() && !stopping,
                    ..ResponseFraming::default()
                },
            );
            buf.drain(..total);
            if close {
                if stream.write_all(&out, now + timeouts.header).await.is_ok() && !buf.is_empty() {
                    linger(stream).await;
                }
                return;
            }
            // The next request's clock starts now, or, if none has begun,
            // the idle clock does.
            idle = buf.is_empty();
            deadline = now + if idle { timeouts.idle } else { timeouts.header };
        }
        if !out.is_empty() {
            // A client must take its answers as it must send its requests:
            // within the header timeout.
            if stream.write_all(&out, now + timeouts.header).await.is_err() {
                return;
            }
            out.clear();
        }
        if timer.deadline() > deadline {
            timer.as_mut().reset(deadline);
            timer_armed.disarm();
        }
        let woke = {
            let read = stream.read(&mut buf);
            tokio::pin!(read);
            std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = read.as_mut().poll(cx) {
                    return Poll::Ready(Woke::Read(r));
                }
                let elapsed = timer.is_elapsed();
                if timer_armed.fired(cx, elapsed, |cx| timer.as_mut().poll(cx).is_ready()) {
                    return Poll::Ready(Woke::Timer);
                }
                if !stopping {
                    let changed = watcher.has_changed().unwrap_or(true);
                    if stop_armed.fired(cx, changed, |cx| stop.as_mut().poll(cx).is_ready()) {
                        return Poll::Ready(Woke::Stop);
                    }
                }
                Poll::Pending
            })
            .await
        };
        match woke {
            Woke::Read(read) => {
                now = Instant::now();
                match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if idle {
                            idle = false;
                            deadline = now + timeouts.header;
                        }
                    }
                }
            }
            Woke::Timer => {
                now = Instant::now();
                if now < deadline {
                    timer.as_mut().reset(deadline);
                    timer_armed.disarm();
                } else if idle {
                    return;
                } else {
                    let f = Failure::new(
                        ErrorStatus::RequestTimeout,
                        format!(
                            "request not complete within {} s",
                            timeouts.header.as_secs()
                        ),
                    );
                    return finish_with_error(stream, out, f, now + timeouts.header).await;
                }
            }
            // Shutting down: an idle connection just closes; one mid-request
            // gets its answer, with Connection: close, first.
            Woke::Stop => {
                stopping = true;
                if buf.is_empty() {
                    return;
                }
            }
        }
    }
}

/// Whether a timer or a shutdown notice has this task's waker.
///
/// Both keep the waker of the poll that registered it until they fire, so
/// polling them again at every wait only registers the same waker again:
/// 35 ns per request for tokio's `Sleep`, 45 for the watch's notice, which
/// takes its notifier's lock (`perf`, docs/BENCHMARKS.md). Once armed,
/// whether one has fired is a load. A poll that tokio refused because the
/// task had spent its budget (coop) registers nothing, so it does not arm:
/// the next wait polls again (tokio wakes a task whose poll it refused,
/// after its next poll of the reactor).
#[derive(Default)]
struct Armed(bool);

impl Armed {
    /// Whether the future has fired: `fired_now` once armed, else what
    /// `poll` says, which arms it if tokio let the poll through.
    fn fired(
        &mut self,
        cx: &mut Context<'_>,
        fired_now: bool,
        poll: impl FnOnce(&mut Context<'_>) -> bool,
    ) -> bool {
        if self.0 {
            return fired_now;
        }
        let budget = tokio::task::coop::has_budget_remaining();
        let ready = poll(cx);
        self.0 = budget;
        ready
    }

    /// After a reset: the next wait polls again.
    fn disarm(&mut self) {
        self.0 = false;
    }
}

/// What ended a connection's wait.
enum Woke {
    Read(std::io::Result<usize>),
    Timer,
    Stop,
}

/// Finds the requests at the front of a connection's buffer. A head that
/// arrives whole, nearly every one, is parsed at once; one found
/// incomplete is searched piece by piece for the blank line that ends it
/// before it is parsed again, so that a head trickling in byte by byte is
/// not parsed at every byte. (Searching every head first cost about 40 ns
/// a request, a byte at a time: `perf annotate`.)
#[derive(Default)]
struct Heads {
    /// How far the buffer has been searched for the end of a head, once a
    /// parse found it incomplete; `None` while no parse has.
    scanned: Option<usize>,
}

impl Heads {
    /// The request at the front of `buf`, once its head and its body have
    /// both arrived; `None` until then. A request is taken by draining
    /// its head and body from `buf` before the next call.
    fn next(&mut self, buf: &[u8]) -> Result<Option<RequestHead>, Failure> {
        if buf.is_empty() {
            return Ok(None);
        }
        if let Some(scanned) = &mut self.scanned
            && !head_may_be_complete(buf, scanned)
        {
            return Ok(None);
        }
        match parse_request(buf)? {
            Parsed::Partial => {
                self.scanned.get_or_insert(buf.len());
                Ok(None)
            }
            Parsed::Complete(head) => {
                // With its body still on its way, the head is parsed again
                // once more has arrived, under the same deadline.
                self.scanned = None;
                Ok((buf.len() >= head.head_len + head.content_length).then_some(head))
            }
        }
    }
}

/// A cheap check before parsing again a head found incomplete: has the
/// blank line that ends it arrived?
fn head_may_be_complete(buf: &[u8], scanned: &mut usize) -> bool {
    if buf.len() > MAX_HEAD {
        // Let the parser report the oversized head.
        return true;
    }
    let from = scanned.saturating_sub(3);
    let found = buf[from..]
        .windows(2)
        .enumerate()
        .any(|(i, w)| w == b"\n\n" || (w == b"\n\r" && buf.get(from + i + 2) == Some(&b'\n')));
    *scanned = buf.len();
    found
}

/// Sends a last error response (taken by `deadline`) and closes with a
/// lingering close.
async fn finish_with_error(
    mut stream: Stream,
    mut out: Vec<u8>,
    failure: Failure,
    deadline: Instant,
) {
    tracing::debug!(status = failure.status.code(), reason = %failure.reason, "closing connection");
    Response::Error(failure).encode(
        &mut out,
        &ResponseFraming {
            close: true,
            ..ResponseFraming::default()
        },
    );
    if stream.write_all(&out, deadline).await.is_ok() {
        linger(stream).await;
    }
}

/// Half-closes, then reads and discards what the client still sends, for a
/// bounded time and amount, so our last response is not reset away.
pub async fn linger(mut stream: Stream) {
    if stream.shutdown_write().is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER_TIME;
    let mut sink = Vec::with_capacity(4096);
    let mut drained = 0;
    while drained < LINGER_BYTES {
        sink.clear();
        match timeout_at(deadline, stream.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => drained += n,
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;

    /// Spends the task's whole coop budget before its inner future's first
    /// poll, so that tokio refuses that poll's timer and reads.
    struct SpentOnFirstPoll<F> {
        inner: Pin<Box<F>>,
        first: bool,
    }

    impl<F: Future> Future for SpentOnFirstPoll<F> {
        type Output = F::Output;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
            if std::mem::take(&mut self.first) {
                for _ in 0..10_000 {
                    match tokio::task::coop::poll_proceed(cx) {
                        Poll::Ready(step) => step.made_progress(),
                        Poll::Pending => break,
                    }
                }
                assert!(!tokio::task::coop::has_budget_remaining());
            }
            self.inner.as_mut().poll(cx)
        }
    }

    /// A connection served with its first poll refused for want of budget,
    /// and the client's end of it, which has sent nothing.
    async fn served_with_spent_budget(
        timeout: Duration,
    ) -> (tokio::net::TcpStream, watch::Sender<bool>) {
        let timeouts = Timeouts {
            header: timeout,
            idle: timeout,
        };
        let listener = crate::tcp::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut listener = crate::stream::Listener::new(listener).unwrap();
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let transports = chat_proto::rendezvous::Transports {
            tcp: true,
            udp: false,
        };
        let state = State::for_tests(transports, 0, Default::default(), 300);
        let (stop, shutdown) = watch::channel(false);
        tokio::spawn(SpentOnFirstPoll {
            inner: Box::pin(async move {
                serve(stream, peer, &state, timeouts, shutdown).await;
            }),
            first: true,
        });
        (client, stop)
    }

    /// What the client reads next, within a bound.
    async fn next_bytes(client: &mut tokio::net::TcpStream, what: &str) -> String {
        use tokio::io::AsyncReadExt;
        let mut got = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(10), client.read(&mut got))
            .await
            .unwrap_or_else(|_| panic!("{what} never came"))
            .unwrap();
        String::from_utf8_lossy(&got[..n]).into_owned()
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A poll tokio refuses for want of budget registers nothing. The
    /// connection's first wait meeting a spent budget once left its timer
    /// unregistered for good, so a client that sent nothing was never cut
    /// off (found in review; 1 connection in 880 under a pipelined flood).
    #[test]
    fn a_wait_that_meets_a_spent_budget_still_times_out() {
        runtime().block_on(async {
            let (mut client, _stop) = served_with_spent_budget(Duration::from_millis(300)).await;
            let got = next_bytes(&mut client, "the header timeout's 408").await;
            assert!(got.starts_with("HTTP/1.1 408"), "{got:?}");
        });
    }

    /// The same for the shutdown notice: an idle connection must still be
    /// closed at shutdown.
    #[test]
    fn a_wait_that_meets_a_spent_budget_still_hears_shutdown() {
        runtime().block_on(async {
            let (mut client, stop) = served_with_spent_budget(Duration::from_secs(600)).await;
            // Let the connection reach its wait (twice: the refused poll,
            // then the one with budget) before shutdown is announced.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            stop.send(true).unwrap();
            assert_eq!(next_bytes(&mut client, "the close at shutdown").await, "");
        });
    }

    /// Heads cut anywhere, the blank line that ends them included, and a
    /// whole request followed by the start of the next: each is taken once
    /// whole, the first parse of a piece finding it incomplete and the
    /// search for its end taking over from there. Fed piece by piece, as
    /// reads would bring them.
    #[test]
    fn heads_arriving_in_pieces_are_answered_once_whole() {
        let pieces: [&[u8]; 9] = [
            b"PROBE / HTTP/1.1\r\nHost: x\r\n\r",
            b"\n",
            b"PROBE / HTTP/1.1\r\nHo",
            b"st: x\r\n\r",
            b"\n",
            b"PROBE / HTTP/1.1\n",
            b"\nPROBE / HTT",
            b"P/1.1\r\n\r\nPROBE / HTTP/1.1\r",
            b"\n\r\n",
        ];
        let mut heads = Heads::default();
        let mut buf = Vec::new();
        let mut answers = String::new();
        for piece in pieces {
            buf.extend_from_slice(piece);
            while let Some(head) = heads.next(&buf).expect("well-formed") {
                assert!(
                    matches!(head.request, Ok(chat_proto::rendezvous::Request::Probe)),
                    "{head:?}"
                );
                buf.drain(..head.head_len + head.content_length);
                answers += "PROBEACK ";
            }
        }
        assert_eq!(answers.matches("PROBEACK").count(), 5, "{answers}");
        assert!(buf.is_empty(), "left over: {buf:?}");
    }

    #[test]
    fn head_end_is_found_across_reads() {
        let mut scanned = 0;
        let mut buf = b"PROBE / HTTP/1.1\r\nHost: x\r\n\r".to_vec();
        assert!(!head_may_be_complete(&buf, &mut scanned));
        buf.push(b'\n');
        assert!(head_may_be_complete(&buf, &mut scanned));
        let mut scanned = 0;
        assert!(head_may_be_complete(b"PROBE / HTTP/1.1\n\n", &mut scanned));
        let mut scanned = 0;
        assert!(!head_may_be_complete(b"PROBE / HTTP/1.1\r\n", &mut scanned));
    }
}
