//! Starts the real `chat-server` binary on 127.0.0.1 and talks to it over
//! real sockets, with bounded waits everywhere.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

pub use chat_testkit::http::{
    Reply, build, connect, connect_from, exchange, read_reply, read_to_close, request,
};
pub use chat_testkit::{Server, WAIT, eventually};

/// Registers `id` and returns its token.
pub fn register(addr: SocketAddr, id: &str, port: u16) -> String {
    let r = request(
        addr,
        "REGISTER",
        &[("Client-Id", id), ("Client-Port", &port.to_string())],
    );
    assert_eq!(r.status, 200, "register {id}: {r:?}");
    r.header("Client-Token").expect("token").to_owned()
}

/// A UDP client socket on 127.0.0.1.
pub fn udp_socket() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").expect("bind udp")
}

/// Sends one datagram and waits up to `wait` for one back.
pub fn udp_exchange(s: &UdpSocket, to: SocketAddr, raw: &[u8], wait: Duration) -> Option<String> {
    s.send_to(raw, to).expect("send datagram");
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 65536];
    match s.recv_from(&mut buf) {
        Ok((n, _)) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(_) => None,
    }
}
