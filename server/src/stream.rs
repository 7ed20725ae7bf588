//! TCP sockets driven with only the system calls they need.
//!
//! tokio's `TcpStream` registers every accepted socket with epoll before
//! its first read, and after each read that returned data it reads again
//! until `EAGAIN`. For this server's traffic (a request of a hundred bytes,
//! a response as small, often a close) those calls are a third of the
//! work. So, as nginx does:
//! - a new socket is read at once, without registering it: with
//!   `TCP_DEFER_ACCEPT` the request is already there, and a transient
//!   connection is answered and closed without epoll ever knowing it;
//! - a read that fills less than the buffer drained the socket, so the
//!   readiness is cleared without another `recv` (tokio's readiness ticks
//!   make this safe: data arriving meanwhile sets it again).
//!
//! On platforms without `AsyncFd` (not Unix) this falls back to tokio's
//! own `TcpStream`.

use std::io;
use std::net::SocketAddr;

/// The most read from a socket at once.
const READ_CHUNK: usize = 4096;

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
    pub struct Listener(AsyncFd<socket2::Socket>);

    impl Listener {
        pub fn new(listener: std::net::TcpListener) -> io::Result<Listener> {
            listener.set_nonblocking(true)?;
            Ok(Listener(watch(socket2::Socket::from(listener))?))
        }

        /// The next connection; its socket is non-blocking and not yet
        /// registered with the reactor.
        pub async fn accept(&self) -> io::Result<(Stream, SocketAddr)> {
            loop {
                let mut guard = self.0.readable().await?;
                match guard.try_io(|l| accept(l.get_ref())) {
                    Ok(result) => return result,
                    Err(_would_block) => continue,
                }
            }
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
            loop {
                let mut guard = fd.readable().await?;
                match guard.try_io(|s| read_into(s.get_ref(), buf)) {
                    Ok(Ok(n)) => {
                        if n > 0 && n < READ_CHUNK {
                            // A short read emptied the socket.
                            guard.clear_ready();
                        }
                        return Ok(n);
                    }
                    Ok(Err(e)) => return Err(e),
                    Err(_would_block) => continue,
                }
            }
        }

        pub async fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
            if let Socket::Plain(s) = &self.0 {
                match (&*s).write(data) {
                    Ok(n) if n == data.len() => return Ok(()),
                    Ok(n) => data = &data[n..],
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            let fd = self.register()?;
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
        }

        /// Sends FIN: no more data from us.
        pub fn shutdown_write(&self) -> io::Result<()> {
            match &self.0 {
                Socket::Plain(s) => s.shutdown(std::net::Shutdown::Write),
                Socket::Registered(fd) => fd.get_ref().shutdown(std::net::Shutdown::Write),
                Socket::Closed => Ok(()),
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
    /// data (Linux), so the first read finds the request. A connection
    /// that sends nothing is still accepted after `secs`, and then meets
    /// the header timeout.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    pub fn defer_accept(listener: &std::net::TcpListener, secs: u32) -> io::Result<()> {
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
}

#[cfg(any(target_os = "linux", target_os = "android"))]
pub use unix::defer_accept;

/// Without TCP_DEFER_ACCEPT, connections are accepted at once.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub fn defer_accept(_listener: &std::net::TcpListener, _secs: u32) -> io::Result<()> {
    Ok(())
}

#[cfg(not(unix))]
mod portable {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    pub struct Listener(tokio::net::TcpListener);

    impl Listener {
        pub fn new(listener: std::net::TcpListener) -> io::Result<Listener> {
            listener.set_nonblocking(true)?;
            Ok(Listener(tokio::net::TcpListener::from_std(listener)?))
        }

        pub async fn accept(&self) -> io::Result<(Stream, SocketAddr)> {
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

        pub async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
            self.0.write_all(data).await
        }

        pub fn shutdown_write(&self) -> io::Result<()> {
            socket2::SockRef::from(&self.0).shutdown(std::net::Shutdown::Write)
        }
    }
}
