//! Talking to chat-server: a PROBE first to learn which transport it
//! serves, then one request per call, over TCP (a connection per request,
//! closed by the server, as the seeds did) or UDP (one datagram each way,
//! retransmitted after 0.5 s, doubling, for about 8 s, as SIP does).

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use chat_proto::rendezvous::{
    MAX_DATAGRAM, Parsed, Request, RequestFraming, Response, parse_response,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio::time::{Instant, timeout_at};

/// How long a TCP connect, or a whole TCP exchange, may take.
const TCP_TIMEOUT: Duration = Duration::from_secs(5);
/// The first UDP retransmission interval; it doubles after each.
const UDP_FIRST_RETRY: Duration = Duration::from_millis(500);
/// Give up on a UDP request after this long.
const UDP_GIVE_UP: Duration = Duration::from_secs(8);
/// Give up on a UDP PROBE (after TCP failed) after this long.
const UDP_PROBE_GIVE_UP: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Tcp,
    Udp,
}

/// A client of one server.
pub struct Client {
    server: String,
    /// The address and transport the last PROBE found; forgotten after a
    /// failure, so that a server that moved or restarted with another
    /// transport is found again.
    found: Mutex<Option<(SocketAddr, Transport)>>,
    /// How long a PROBE over UDP is tried after TCP failed.
    udp_probe_give_up: Duration,
    /// The address requests leave from (`--bind`), so that the server
    /// records the address peers are to reach this daemon at.
    source: Option<IpAddr>,
}

impl Client {
    /// `server` is `host:port`.
    pub fn new(server: String) -> Client {
        Client {
            server,
            found: Mutex::new(None),
            udp_probe_give_up: UDP_PROBE_GIVE_UP,
            source: None,
        }
    }

    /// The server as given, `host:port`.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Sends every request from `source` (None: whichever the system
    /// picks).
    pub fn from_source(self, source: Option<IpAddr>) -> Client {
        // `--bind ::` or `0.0.0.0` listens everywhere; requests then leave
        // from wherever the system routes them.
        let source = source.filter(|ip| !ip.is_unspecified());
        Client { source, ..self }
    }

    /// The address requests leave from, if `--bind` named one: peer links
    /// leave from it too.
    pub fn source(&self) -> Option<IpAddr> {
        self.source
    }

    /// Sends `request`; `Err` is a reason a person can read, for when the
    /// server could not be reached or answered nonsense.
    pub async fn request(&self, request: &Request) -> Result<Response, String> {
        let known = *self.found.lock().unwrap_or_else(|e| e.into_inner());
        let (addr, transport) = match known {
            Some(found) => found,
            None => {
                let found = self.find().await?;
                *self.found.lock().unwrap_or_else(|e| e.into_inner()) = Some(found);
                found
            }
        };
        let result = match transport {
            Transport::Tcp => tcp_exchange(self.source, addr, &self.server, request).await,
            Transport::Udp => {
                udp_exchange(self.source, addr, &self.server, request, UDP_GIVE_UP).await
            }
        };
        if result.is_err() {
            *self.found.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        result
    }

    /// Probes every address the name resolves to, in order, and keeps the
    /// first that answers: `localhost` may resolve to `::1` first while
    /// the server listens on IPv4 only.
    async fn find(&self) -> Result<(SocketAddr, Transport), String> {
        let addrs = tokio::net::lookup_host(&self.server)
            .await
            .map_err(|e| format!("cannot resolve {}: {e}", self.server))?;
        self.first_answering(addrs).await
    }

    /// The first of `addrs` that answers a PROBE, or what each said.
    async fn first_answering(
        &self,
        addrs: impl IntoIterator<Item = SocketAddr>,
    ) -> Result<(SocketAddr, Transport), String> {
        let mut failures = Vec::new();
        for addr in addrs {
            match self.probe(addr).await {
                Ok(transport) => return Ok((addr, transport)),
                Err(e) => failures.push((addr, e)),
            }
        }
        match failures.as_slice() {
            [] => Err(format!("{} resolves to no address", self.server)),
            [(_, e)] => Err(e.clone()),
            all => Err(all
                .iter()
                .map(|(addr, e)| format!("at {addr}: {e}"))
                .collect::<Vec<_>>()
                .join("; ")),
        }
    }

    /// TCP first (the default server transport); UDP if TCP is refused.
    async fn probe(&self, addr: SocketAddr) -> Result<Transport, String> {
        let tcp_err = match tcp_exchange(self.source, addr, &self.server, &Request::Probe).await {
            Ok(Response::ProbeAck { transports, .. }) if transports.tcp => {
                return Ok(Transport::Tcp);
            }
            // Something speaks HTTP over TCP there: asking over UDP as
            // well would only add a wait and a false lead.
            Ok(Response::Error(f)) => {
                return Err(format!("PROBE: {}", crate::session::server_refused(&f)));
            }
            // A server that answers over TCP but serves UDP only.
            Ok(Response::ProbeAck { .. }) => "the server serves UDP only".to_owned(),
            Ok(other) => return Err(unexpected_probe_answer(&other)),
            Err(e) => e,
        };
        // A short try: a server that refused TCP is more likely down than
        // serving UDP only, and the user is waiting.
        let udp = udp_exchange(
            self.source,
            addr,
            &self.server,
            &Request::Probe,
            self.udp_probe_give_up,
        );
        match udp.await {
            Ok(Response::ProbeAck { transports, .. }) if transports.udp => Ok(Transport::Udp),
            Ok(Response::Error(f)) => Err(format!(
                "PROBE over UDP: {}",
                crate::session::server_refused(&f)
            )),
            Ok(other) => Err(unexpected_probe_answer(&other)),
            Err(udp_err) => Err(format!("over TCP: {tcp_err}; over UDP: {udp_err}")),
        }
    }
}

/// A PROBE answered with anything but PROBEACK or an error.
fn unexpected_probe_answer(answer: &Response) -> String {
    let what = answer
        .method()
        .map_or("an error", chat_proto::rendezvous::Method::ack);
    format!("PROBE was answered with {what}, not PROBEACK: is that a chat-server?")
}

/// The local address to send to `addr` from: `source` if given, else any.
pub(crate) fn local_for(source: Option<IpAddr>, addr: SocketAddr) -> Result<SocketAddr, String> {
    match source {
        Some(ip) if ip.is_ipv4() != addr.is_ipv4() => Err(format!(
            "cannot reach {addr} from {ip} (--bind): not the same IP version"
        )),
        Some(ip) => Ok(SocketAddr::new(ip, 0)),
        None if addr.is_ipv4() => Ok(SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))),
        None => Ok(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))),
    }
}

/// A TCP connection to `addr` from `local` (see [`local_for`]).
pub(crate) async fn connect(local: SocketAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(local)?;
    socket.connect(addr).await
}

async fn tcp_exchange(
    source: Option<IpAddr>,
    addr: SocketAddr,
    host: &str,
    request: &Request,
) -> Result<Response, String> {
    let deadline = Instant::now() + TCP_TIMEOUT;
    let local = local_for(source, addr)?;
    let mut stream = match timeout_at(deadline, connect(local, addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => {
            return Err(format!("no answer within {} s", TCP_TIMEOUT.as_secs()));
        }
    };
    let mut out = Vec::with_capacity(256);
    request.encode(
        &mut out,
        &RequestFraming {
            host: Some(host),
            request_id: None,
            close: true,
        },
    );
    let method = request.method();
    let exchange = async {
        stream.write_all(&out).await?;
        let mut buf = Vec::with_capacity(1024);
        loop {
            if stream.read_buf(&mut buf).await? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed before a whole response",
                ));
            }
            match parse_response(&buf, method, false) {
                Ok(Parsed::Complete((head, _))) => return Ok(head.response),
                Ok(Parsed::Partial) => {}
                Err(e) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        e.to_string(),
                    ));
                }
            }
        }
    };
    match timeout_at(deadline, exchange).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} s", TCP_TIMEOUT.as_secs())),
    }
}

async fn udp_exchange(
    source: Option<IpAddr>,
    addr: SocketAddr,
    host: &str,
    request: &Request,
    give_up_after: Duration,
) -> Result<Response, String> {
    let socket = UdpSocket::bind(local_for(source, addr)?)
        .await
        .map_err(|e| format!("cannot open a UDP socket: {e}"))?;
    socket.connect(addr).await.map_err(|e| e.to_string())?;
    let rid = request_id();
    let mut out = Vec::with_capacity(256);
    request.encode(
        &mut out,
        &RequestFraming {
            host: Some(host),
            request_id: Some(&rid),
            close: false,
        },
    );
    let method = request.method();
    let give_up = Instant::now() + give_up_after;
    let mut wait = UDP_FIRST_RETRY;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        socket.send(&out).await.map_err(|e| e.to_string())?;
        let retry_at = (Instant::now() + wait).min(give_up);
        loop {
            match timeout_at(retry_at, socket.recv(&mut buf)).await {
                Err(_) => break,
                // An ICMP "port unreachable" from an earlier send: keep
                // trying until the deadline, the server may be starting.
                Ok(Err(_)) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Ok(Ok(n)) => {
                    if let Ok(Parsed::Complete((head, _))) = parse_response(&buf[..n], method, true)
                        && head.request_id.as_deref() == Some(rid.as_str())
                    {
                        return Ok(head.response);
                    }
                    // Someone else's datagram, or an old answer: ignore.
                }
            }
            if Instant::now() >= retry_at {
                break;
            }
        }
        if Instant::now() >= give_up {
            return Err(format!(
                "no answer within {:.1} s",
                give_up_after.as_secs_f64()
            ));
        }
        wait *= 2;
    }
}

/// A Request-Id unique enough to tell our retransmissions apart.
fn request_id() -> String {
    let t = chat_proto::Token::random()
        .map(|t| t.to_string())
        .unwrap_or_else(|_| {
            format!(
                "{:x}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
            )
        });
    t[..16.min(t.len())].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_testkit::Server;

    /// A loopback address where nothing listens over TCP; a UDP probe
    /// sent there goes unanswered.
    fn dead_addr() -> SocketAddr {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        drop(tcp);
        addr
    }

    #[tokio::test]
    async fn the_first_address_that_answers_is_kept() {
        let server = Server::start(&[]);
        let client = Client {
            // A dead address costs this much; the test need not wait 2 s.
            udp_probe_give_up: Duration::from_millis(200),
            ..Client::new(format!("localhost:{}", server.addr.port()))
        };
        let (dead, live) = (dead_addr(), server.addr);
        assert_eq!(
            client.first_answering([dead, live]).await,
            Ok((live, Transport::Tcp))
        );

        let err = client
            .first_answering([dead, dead_addr()])
            .await
            .unwrap_err();
        // Each address is named with what it said.
        assert!(err.contains(&format!("at {dead}: over TCP: ")), "{err}");
        assert_eq!(err.matches("at 127.0.0.1:").count(), 2, "{err}");
        assert_eq!(
            client.first_answering([]).await.unwrap_err(),
            format!("localhost:{} resolves to no address", server.addr.port())
        );
    }

    #[tokio::test]
    async fn a_proxy_page_is_named_as_such_and_udp_is_not_tried() {
        // What nginx answers when the server behind it is down.
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let page = "<html><head><title>502 Bad Gateway</title></head></html>";
        let answer = format!(
            "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
            page.len()
        );
        let proxy = tokio::spawn(async move {
            let (mut s, _) = tcp.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
            tokio::io::AsyncWriteExt::write_all(&mut s, answer.as_bytes())
                .await
                .unwrap();
        });
        let client = Client::new(addr.to_string());
        let err = client.first_answering([addr]).await.unwrap_err();
        proxy.await.unwrap();
        assert!(err.contains("answered 502 Bad Gateway"), "{err}");
        assert!(err.contains("proxy"), "{err}");
        assert!(!err.contains("<html>") && !err.contains("UDP"), "{err}");
    }

    #[tokio::test]
    async fn requests_leave_from_the_bound_address() {
        // Over TCP and over UDP, the server records the address the
        // request came from: --bind's (127.0.0.2 is loopback too).
        let server = Server::start(&["--transport", "both"]);
        let source: IpAddr = "127.0.0.2".parse().unwrap();
        for (transport, name) in [(Transport::Tcp, "tcp"), (Transport::Udp, "udp")] {
            let client = Client::new(server.addr.to_string()).from_source(Some(source));
            *client.found.lock().unwrap() = Some((server.addr, transport));
            let id: chat_proto::ClientId = format!("bound-{name}").parse().unwrap();
            let reply = client
                .request(&Request::Register {
                    id,
                    port: 4000,
                    token: None,
                })
                .await;
            match reply {
                Ok(Response::RegAck { addr, .. }) => {
                    assert_eq!(addr, SocketAddr::new(source, 4000), "{name}");
                }
                other => panic!("{name}: {other:?}"),
            }
        }
        // An address of the other IP version cannot reach the server.
        let v6 = Client::new(server.addr.to_string()).from_source(Some("::1".parse().unwrap()));
        let err = v6.request(&Request::Probe).await.unwrap_err();
        assert!(err.contains("not the same IP version"), "{err}");
    }
}
