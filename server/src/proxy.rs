//! Trusted reverse proxies: the peers whose `X-Forwarded-For` header says
//! which client a request comes from.
//!
//! Behind a reverse proxy (nginx terminating TLS, say), every connection
//! comes from the proxy, so without this the server would record the
//! proxy's address as every client's contact and count every client's
//! requests against one address. The header is believed only from the
//! addresses the operator names: from anyone else it would let a client
//! register a third party's address, which is what recording the observed
//! address is there to prevent. UDP never trusts it, as a datagram's
//! source address is easily forged.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use chat_proto::rendezvous::{Failure, forwarded_client};
use ipnet::IpNet;
use serde::Deserialize;

/// One `--trusted-proxy`: an address, or a network in CIDR form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyNet(IpNet);

impl FromStr for ProxyNet {
    type Err = String;

    fn from_str(s: &str) -> Result<ProxyNet, String> {
        let s = s.trim();
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(ProxyNet(IpNet::from(ip)));
        }
        s.parse::<IpNet>().map(ProxyNet).map_err(|_| {
            format!("{s:?} is not an address or a network (write 127.0.0.1, ::1 or 10.0.0.0/8)")
        })
    }
}

impl fmt::Display for ProxyNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for ProxyNet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ProxyNet, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// The proxies the operator trusts; none by default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<ProxyNet>);

impl TrustedProxies {
    pub fn new(nets: Vec<ProxyNet>) -> TrustedProxies {
        TrustedProxies(nets)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The list as the operator would write it: `127.0.0.1, 10.0.0.0/8`.
    pub fn describe(&self) -> String {
        let nets: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        nets.join(", ")
    }

    /// Whether `ip` is one of them. An IPv4 peer of a dual-stack socket
    /// (`--bind ::`) arrives as `::ffff:a.b.c.d` and matches `a.b.c.d`.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|n| n.0.contains(&ip))
    }

    /// The client a request from `peer` speaks for: the address
    /// `X-Forwarded-For` gives if `peer` is a trusted proxy and the header
    /// is there, else `peer` itself. `head` is the request's head, parsed
    /// whole already.
    pub fn client(&self, peer: IpAddr, head: &[u8]) -> Result<IpAddr, Failure> {
        if self.is_empty() || !self.contains(peer) {
            return Ok(peer);
        }
        Ok(forwarded_client(head, |ip| self.contains(ip))?.map_or(peer, |ip| ip.to_canonical()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted(nets: &[&str]) -> TrustedProxies {
        TrustedProxies::new(nets.iter().map(|n| n.parse().unwrap()).collect())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const VIA: &[u8] = b"PROBE / HTTP/1.1\r\nX-Forwarded-For: 192.0.2.7\r\n\r\n";

    #[test]
    fn addresses_and_networks_parse_and_nothing_else() {
        let t = trusted(&["127.0.0.1", "10.0.0.0/8", "fd00::/8", " ::1 "]);
        for yes in [
            "127.0.0.1",
            "10.200.0.1",
            "fd12::1",
            "::1",
            "::ffff:10.1.2.3",
        ] {
            assert!(t.contains(ip(yes)), "{yes}");
        }
        for no in ["127.0.0.2", "11.0.0.1", "fe80::1", "::2"] {
            assert!(!t.contains(ip(no)), "{no}");
        }
        for bad in ["", "localhost", "10.0.0.0/33", "1.2.3.4:80"] {
            let e = bad.parse::<ProxyNet>().unwrap_err();
            assert!(e.contains("not an address or a network"), "{bad}: {e}");
        }
    }

    #[test]
    fn only_a_trusted_peer_is_believed() {
        let t = trusted(&["127.0.0.1"]);
        assert_eq!(t.client(ip("127.0.0.1"), VIA), Ok(ip("192.0.2.7")));
        assert_eq!(t.client(ip("::ffff:127.0.0.1"), VIA), Ok(ip("192.0.2.7")));
        assert_eq!(t.client(ip("127.0.0.2"), VIA), Ok(ip("127.0.0.2")));
        assert_eq!(
            TrustedProxies::default().client(ip("127.0.0.1"), VIA),
            Ok(ip("127.0.0.1"))
        );
        // A trusted address that connects directly speaks for itself.
        let direct = b"PROBE / HTTP/1.1\r\n\r\n";
        assert_eq!(t.client(ip("127.0.0.1"), direct), Ok(ip("127.0.0.1")));
        // A mapped address in the header is the IPv4 client it maps.
        let mapped = b"PROBE / HTTP/1.1\r\nX-Forwarded-For: ::ffff:192.0.2.7\r\n\r\n";
        assert_eq!(t.client(ip("127.0.0.1"), mapped), Ok(ip("192.0.2.7")));
        let bad = b"PROBE / HTTP/1.1\r\nX-Forwarded-For: unknown\r\n\r\n";
        assert!(t.client(ip("127.0.0.1"), bad).is_err());
        assert_eq!(t.client(ip("127.0.0.2"), bad), Ok(ip("127.0.0.2")));
    }
}
