//! TCP sockets driven with only the system calls they need.
//!
//! tokio's `TcpStream` registers every accepted socket with epoll before
//! its first read, and after each read that returned data it reads again
//! until `EAGAIN`. For this server's traffic (a request of a hundred bytes,
//! a response as small, often a close) those calls are a third of the
//! work. So, as nginx does:
//! - a new socket is read at once, without registering it: on a busy
//!   worker (`TCP_DEFER_ACCEPT`, below) the request is already there, and
//!   a transient connection is answered and closed without epoll ever
//!   knowing it;
//! - a read that fills less than the buffer drained the socket, so the
//!   readiness is cleared without another `recv` (tokio's readiness ticks
//!   make this safe: data arriving meanwhile sets it again).
//!
//! A busy worker also has the kernel hold new connections until their
//! request arrives (`TCP_DEFER_ACCEPT`); an idle one does not, as
//! [`crate::defer`] explains.
//!
//! On platforms without `AsyncFd` (not Unix) this falls back to tokio's
//! own `TcpStream`.

use std::io;
use std::net::SocketAddr;

use tokio::time::Instant;

/// The most read from a socket at once.
const READ_CHUNK: usize = 4096;

/// `op`, failing with `TimedOut` if it is not done by `deadline`.
async fn within<T>(
    deadline: Instant,
    op: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    tokio::time::timeout_at(deadline, op)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

#[cfg(unix)]
pub use unix::{Listener, Stream};

#[cfg(not(unix))]
pub use portable::{Listener, Stream};

#[cfg(unix)]
mod unix {
    use super::*;
    use std::io::Write;
    use tokio::io::unix::AsyncFd;

    /// A listening socket.
    pub struct Listener {
        fd: AsyncFd<socket2::Socket>,
        /// `None` where deferring cannot be switched, or is not wanted.
        defer: Option<Adaptive>,
    }

    impl Listener {
        /// Watches `listener` from the current runtime, which should be a
        /// worker's single-threaded one: its idle spells are what tell the
        /// listener whether to defer.
        pub fn new(listener: std::net::TcpListener) -> io::Result<Listener> {
            listener.set_nonblocking(true)?;
            let socket = socket2::Socket::from(listener);
            let defer = Adaptive::new(&socket);
            Ok(Listener {
                fd: watch(socket)?,
                defer,
            })
        }

        /// The next connection; its socket is non-blocking and not yet
        /// registered with the reactor.
        pub async fn accept(&mut self) -> io::Result<(Stream, SocketAddr)> {
            loop {
                let mut guard = self.fd.readable().await?;
                match guard.try_io(|l| accept(l.get_ref())) {
                    Ok(result) => {
                        // Only connections count: a failed accept (out of
                        // descriptors) says nothing about the load.
                        if result.is_ok() {
                            self.adapt();
                        }
                        return result;
                    }
                    Err(_would_block) => continue,
                }
            }
        }

        /// Whether this listener's worker mostly idles between connections
        /// (and so does not defer them); false where that is not known.
        pub fn idle(&self) -> bool {
            self.defer.as_ref().is_some_and(|a| a.idle())
        }

        /// Tells the policy whether the worker ran out of work since the
        /// last connection, and switches deferring if it says so.
        fn adapt(&mut self) {
            if let Some(a) = &mut self.defer
                && let Err(e) = a.accepted(self.fd.get_ref())
            {
                tracing::debug!("TCP_DEFER_ACCEPT not switched: {e}; left as it is");
                self.defer = None;
            }
        }
    }

    /// What a listener needs to switch deferring as its worker's load
    /// changes: Linux's `TCP_DEFER_ACCEPT`, and tokio's park count (which
    /// needs 64-bit atomics).
    #[cfg(all(
        any(target_os = "linux", target_os = "android"),
        target_has_atomic = "64"
    ))]
    struct Adaptive {
        policy: crate::defer::Policy,
        metrics: tokio::runtime::RuntimeMetrics,
        /// The runtime's park count at the last accept.
        parks: u64,
    }

    #[cfg(all(
        any(target_os = "linux", target_os = "android"),
        target_has_atomic = "64"
    ))]
    impl Adaptive {
        /// Starts `socket` not deferring (an idle worker), and adapting
        /// if the current runtime is single-threaded.
        fn new(socket: &socket2::Socket) -> Option<Adaptive> {
            use tokio::runtime::{Handle, RuntimeFlavor};
            let handle = Handle::try_current().ok()?;
            if handle.runtime_flavor() != RuntimeFlavor::CurrentThread {
                // Which worker's parks are this listener's is unknown.
                defer_always(socket);
                return None;
            }
            let metrics = handle.metrics();
            if let Err(e) = set_defer_accept(socket, 0) {
                tracing::debug!("TCP_DEFER_ACCEPT not settable: {e}");
                return None;
            }
            Some(Adaptive {
                policy: crate::defer::Policy::default(),
                parks: metrics.worker_park_count(0),
                metrics,
            })
        }

        fn idle(&self) -> bool {
            !self.policy.deferring()
        }

        /// One connection was accepted from `socket`.
        fn accepted(&mut self, socket: &socket2::Socket) -> io::Result<()> {
            // The count goes up whenever the runtime runs out of tasks and
            // waits on epoll, however briefly.
            let parks = self.metrics.worker_park_count(0);
            let idled = parks != self.parks;
            self.parks = parks;
            match self.policy.accepted(idled) {
                Some(on) => set_defer_accept(socket, if on { DEFER_SECS } else { 0 }),
                None => Ok(()),
            }
        }
    }

    /// How long the kernel holds a connection that has sent nothing
    /// before handing it to accept anyway; it then meets the header
    /// timeout.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    const DEFER_SECS: u32 = 5;

    /// Where the load cannot be read: deferring is right whenever the
    /// server is busy, and costs an idle one only latency.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn defer_always(socket: &socket2::Socket) {
        if let Err(e) = set_defer_accept(socket, DEFER_SECS) {
            tracing::debug!("TCP_DEFER_ACCEPT not set: {e}");
        }
    }

    /// Without tokio's park count (no 64-bit atomics) the listener defers
    /// always on Linux; elsewhere there is no `TCP_DEFER_ACCEPT`.
    #[cfg(not(all(
        any(target_os = "linux", target_os = "android"),
        target_has_atomic = "64"
    )))]
    struct Adaptive;

    #[cfg(not(all(
        any(target_os = "linux", target_os = "android"),
        target_has_atomic = "64"
    )))]
    impl Adaptive {
        fn new(_socket: &socket2::Socket) -> Option<Adaptive> {
            #[cfg(any(target_os = "linux", target_os = "android"))]
            defer_always(_socket);
            None
        }

        fn accepted(&mut self, _socket: &socket2::Socket) -> io::Result<()> {
            Ok(())
        }

        fn idle(&self) -> bool {
            false
        }
    }

    fn accept(listener: &socket2::Socket) -> io::Result<(Stream, SocketAddr)> {
        #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
        let (socket, addr) = listener.accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)?;
        #[cfg(not(any(target_os = "linux", target_os = "android", target_os = "freebsd")))]
        let (socket, addr) = {
            let (s, a) = listener.accept()?;
            s.set_nonblocking(true)?;
            (s, a)
        };
        let addr = addr
            .as_socket()
            .ok_or_else(|| io::Error::other("accepted a connection that is not IP"))?;
        Ok((Stream(Socket::Plain(socket)), addr))
    }

    /// A connection: plain until a call would block, registered after.
    pub struct Stream(Socket);

    enum Socket {
        Plain(socket2::Socket),
        Registered(AsyncFd<socket2::Socket>),
        /// Registering failed; the socket is gone.
        Closed,
    }

    impl Stream {
        fn register(&mut self) -> io::Result<&AsyncFd<socket2::Socket>> {
            if let Socket::Plain(_) = self.0
                && let Socket::Plain(s) = std::mem::replace(&mut self.0, Socket::Closed)
            {
                self.0 = Socket::Registered(watch(s)?);
            }
            match &self.0 {
                Socket::Registered(fd) => Ok(fd),
                _ => Err(io::ErrorKind::NotConnected.into()),
            }
        }

        /// Appends what the socket has to `buf`; `Ok(0)` at end of stream.
        pub async fn read(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
            if let Socket::Plain(s) = &self.0 {
                match read_into(s, buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    done => return done,
                }
            }
            let fd = self.register()?;
            // `poll_read_ready` keeps one waker in the socket's slot for
            // readers. `readable().await` would put a node in the socket's
            // list of waiters, taking its lock to add the node, to check it
            // on wake-up and to remove it: about 75 ns more per request
            // (`perf`, docs/BENCHMARKS.md). A connection has one reader,
            // which is all the slot serves.
            std::future::poll_fn(|cx| {
                loop {
                    let mut guard = std::task::ready!(fd.poll_read_ready(cx))?;
                    match guard.try_io(|s| read_into(s.get_ref(), buf)) {
                        Ok(Ok(n)) => {
                            if n > 0 && n < READ_CHUNK {
                                // A short read emptied the socket.
                                guard.clear_ready();
                            }
                            return std::task::Poll::Ready(Ok(n));
                        }
                        Ok(Err(e)) => return std::task::Poll::Ready(Err(e)),
                        Err(_would_block) => continue,
                    }
                }
            })
            .await
        }

        /// Writes all of `data`, or fails with `TimedOut` if the client has
        /// not taken it by `deadline`: a client that sends and never reads
        /// would otherwise hold the connection for as long as it likes.
        /// The deadline costs nothing (no timer) when the socket takes the
        /// data at once, which is nearly always.
        pub async fn write_all(&mut self, mut data: &[u8], deadline: Instant) -> io::Result<()> {
            // Registered or not, the socket is tried directly first:
            // readiness is only a hint for writes, and a direct attempt
            // spares a poll through the reactor.
            let socket = self.socket().ok_or(io::ErrorKind::NotConnected)?;
            match (&*socket).write(data) {
                Ok(n) if n == data.len() => return Ok(()),
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            let fd = self.register()?;
            within(deadline, async {
                while !data.is_empty() {
                    let mut guard = fd.writable().await?;
                    match guard.try_io(|s| s.get_ref().write(data)) {
                        Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                        Ok(Ok(n)) => data = &data[n..],
                        Ok(Err(e)) => return Err(e),
                        Err(_would_block) => continue,
                    }
                }
                Ok(())
            })
            .await
        }

        /// Sends FIN: no more data from us.
        pub fn shutdown_write(&self) -> io::Result<()> {
            match self.socket() {
                Some(s) => s.shutdown(std::net::Shutdown::Write),
                None => Ok(()),
            }
        }

        /// The socket, registered or not; `None` once registering failed.
        fn socket(&self) -> Option<&socket2::Socket> {
            match &self.0 {
                Socket::Plain(s) => Some(s),
                Socket::Registered(fd) => Some(fd.get_ref()),
                Socket::Closed => None,
            }
        }
    }

    /// Registers a socket with the reactor.
    fn watch(socket: socket2::Socket) -> io::Result<AsyncFd<socket2::Socket>> {
        // SAFETY: `socket2::Socket` owns its descriptor (an `OwnedFd`): it
        // is open from creation until the Socket is dropped, nothing else
        // can close it, and `as_raw_fd` always returns that one descriptor.
        // The AsyncFd takes the Socket by value, so the descriptor stays
        // open and the same for the AsyncFd's whole lifetime, as
        // `register` requires.
        Ok(unsafe { AsyncFd::register(socket) }?)
    }

    /// Reads into `buf`'s spare capacity, which is not zeroed first: at
    /// a few hundred bytes a request, zeroing a chunk per read was a
    /// measurable share of the server's own time.
    fn read_into(s: &socket2::Socket, buf: &mut Vec<u8>) -> io::Result<usize> {
        buf.reserve(READ_CHUNK);
        let spare = &mut buf.spare_capacity_mut()[..READ_CHUNK];
        let n = s.recv(spare)?;
        let len = buf.len();
        // SAFETY: `recv` returned `n`, so the kernel wrote the first `n`
        // bytes of `spare` (socket2 documents that exactly these are
        // initialised), and `spare` begins at index `len` of `buf`'s
        // allocation; `n <= READ_CHUNK <= spare capacity`.
        unsafe { buf.set_len(len + n) };
        Ok(n)
    }

    /// Asks the kernel to complete `accept` only once the client has sent
    /// data, or after `secs` (0: at once, as usual).
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn set_defer_accept(listener: &socket2::Socket, secs: u32) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let value: libc::c_int = secs.min(i32::MAX as u32) as libc::c_int;
        // SAFETY: the descriptor is a live socket owned by `listener` for
        // the whole call; the option value points at a c_int on our stack,
        // and the length passed is exactly its size, which is what
        // TCP_DEFER_ACCEPT reads. setsockopt does not keep the pointer.
        let rc = unsafe {
            libc::setsockopt(
                listener.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    #[cfg(all(
        test,
        any(target_os = "linux", target_os = "android"),
        target_has_atomic = "64"
    ))]
    mod tests {
        use super::Listener;
        use std::io::Write as _;
        use std::os::fd::AsRawFd;
        use std::time::Duration;

        /// The listener's TCP_DEFER_ACCEPT, as the kernel reports it.
        fn defer_of(l: &Listener) -> libc::c_int {
            let mut value: libc::c_int = -1;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: the descriptor is the listener's live socket for the
            // whole call; `value` and `len` are valid for writes of the sizes
            // given, and getsockopt keeps neither pointer.
            let rc = unsafe {
                libc::getsockopt(
                    l.fd.get_ref().as_raw_fd(),
                    libc::IPPROTO_TCP,
                    libc::TCP_DEFER_ACCEPT,
                    (&mut value as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
            value
        }

        #[test]
        fn a_listener_defers_only_while_its_worker_is_busy() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let std = crate::tcp::bind("127.0.0.1:0".parse().unwrap()).unwrap();
                let addr = std.local_addr().unwrap();
                let mut listener = Listener::new(std).unwrap();
                assert_eq!(
                    defer_of(&listener),
                    0,
                    "an idle worker starts not deferring"
                );

                // Clients one at a time, the worker idle between them.
                for _ in 0..40 {
                    let _client = std::net::TcpStream::connect(addr).unwrap();
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    listener.accept().await.unwrap();
                }
                assert_eq!(defer_of(&listener), 0);

                // A crowd: every accept finds the next connection queued.
                let mut crowd = Vec::new();
                for _ in 0..64 {
                    let mut c = std::net::TcpStream::connect(addr).unwrap();
                    c.write_all(b"PROBE / HTTP/1.1\r\n\r\n").unwrap();
                    crowd.push(c);
                }
                for _ in 0..64 {
                    listener.accept().await.unwrap();
                }
                assert!(defer_of(&listener) > 0, "a busy worker defers");

                // Quiet again.
                for _ in 0..200 {
                    let mut c = std::net::TcpStream::connect(addr).unwrap();
                    c.write_all(b"PROBE / HTTP/1.1\r\n\r\n").unwrap();
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    listener.accept().await.unwrap();
                }
                assert_eq!(defer_of(&listener), 0);
            });
        }
    }
}

#[cfg(not(unix))]
mod portable {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    pub struct Listener(tokio::net::TcpListener);

    impl Listener {
        /// Whether the worker mostly idles between connections: not known
        /// here.
        pub fn idle(&self) -> bool {
            false
        }

        pub fn new(listener: std::net::TcpListener) -> io::Result<Listener> {
            listener.set_nonblocking(true)?;
            Ok(Listener(tokio::net::TcpListener::from_std(listener)?))
        }

        pub async fn accept(&mut self) -> io::Result<(Stream, SocketAddr)> {
            let (s, a) = self.0.accept().await?;
            s.set_nodelay(true)?;
            Ok((Stream(s), a))
        }
    }

    pub struct Stream(tokio::net::TcpStream);

    impl Stream {
        pub async fn read(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
            let mut chunk = [0u8; READ_CHUNK];
            let n = self.0.read(&mut chunk).await?;
            buf.extend_from_slice(&chunk[..n]);
            Ok(n)
        }

        pub async fn write_all(&mut self, data: &[u8], deadline: Instant) -> io::Result<()> {
            within(deadline, self.0.write_all(data)).await
        }

        pub fn shutdown_write(&self) -> io::Result<()> {
            socket2::SockRef::from(&self.0).shutdown(std::net::Shutdown::Write)
        }
    }
}
