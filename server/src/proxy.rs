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
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chat_proto::rendezvous::{Failure, forwarded_client};
use ipnet::IpNet;
use serde::Deserialize;

/// One `--trusted-proxy`: an address, or a network in CIDR form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyNet(IpNet);

impl FromStr for ProxyNet {
    type Err = String;

    /// An address, or a network in CIDR form, normalised: host bits
    /// cleared (`127.0.0.5/8` is `127.0.0.0/8`), and an IPv4-mapped IPv6
    /// form (`::ffff:127.0.0.1`, as `ss` shows a dual-stack socket's
    /// peers) made the IPv4 it stands for, which is how peers are matched.
    fn from_str(s: &str) -> Result<ProxyNet, String> {
        let s = s.trim();
        let net = match s.parse::<IpAddr>() {
            Ok(ip) => IpNet::from(ip),
            Err(_) => s.parse::<IpNet>().map_err(|_| bad_proxy(s))?,
        };
        Ok(ProxyNet(canonical(net).trunc()))
    }
}

/// `net` with an IPv4-mapped IPv6 network (`::ffff:0:0/96` and within)
/// written as the IPv4 network it maps.
fn canonical(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        _ => net,
    }
}

/// Why `s` is not a proxy's address, as precisely as can be told.
fn bad_proxy(s: &str) -> String {
    let why = if s.contains(',') || s.contains(char::is_whitespace) {
        "one address or network per --trusted-proxy: repeat the flag, or list them in the file"
    } else if let Some((addr, prefix)) = s.split_once('/') {
        match (addr.parse::<IpAddr>(), prefix.parse::<u8>()) {
            (Ok(IpAddr::V4(_)), Ok(_)) => "an IPv4 network's prefix is at most 32",
            (Ok(IpAddr::V6(_)), Ok(_)) => "an IPv6 network's prefix is at most 128",
            _ => "not a network: write it as 10.0.0.0/8 or fd00::/8",
        }
    } else if s.parse::<std::net::SocketAddr>().is_ok() {
        "no port: the proxy is known by its address alone"
    } else if s
        .chars()
        .any(|c| c.is_ascii_alphabetic() && !c.is_ascii_hexdigit())
    {
        "names are not resolved: give the proxy's address"
    } else {
        "not an address or a network (write 127.0.0.1, ::1 or 10.0.0.0/8)"
    };
    format!("trusted proxy {s:?}: {why}")
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

/// `trusted-proxy` in the configuration file: a list, or one address or
/// network written without brackets. (A serde `deserialize_with`.)
pub fn one_or_many<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<ProxyNet>>, D::Error> {
    struct OneOrMany;

    impl<'de> serde::de::Visitor<'de> for OneOrMany {
        type Value = Vec<ProxyNet>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(
                "an address or network, or a list of them, such as [\"127.0.0.1\", \"::1\"]",
            )
        }

        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Vec<ProxyNet>, E> {
            s.parse().map(|n| vec![n]).map_err(E::custom)
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Vec<ProxyNet>, A::Error> {
            let mut nets = Vec::new();
            while let Some(n) = seq.next_element()? {
                nets.push(n);
            }
            Ok(nets)
        }
    }

    d.deserialize_any(OneOrMany).map(Some)
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

    /// Whether a network of them holds every address (`0.0.0.0/0`,
    /// `::/0`): then any client can claim any address.
    pub fn trusts_everyone(&self) -> bool {
        self.0.iter().any(|n| n.0.prefix_len() == 0)
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

/// Interval between two warnings of each kind: often enough for an
/// operator to see the latest cause, too rarely for a client to flood the
/// log.
const WARNING_EVERY: Duration = Duration::from_secs(60);

/// What the operator is told about `X-Forwarded-For` in the log: enough
/// to find a misconfigured proxy, never a line per request.
#[derive(Debug, Default)]
pub struct ProxyLog {
    untrusted: Sparse,
    bad_header: Sparse,
}

impl ProxyLog {
    /// A peer that is not a trusted proxy sent the header. Any client
    /// can, so this only says what was seen; its likeliest cause, though,
    /// is a proxy the operator forgot to name.
    pub fn untrusted(&self, peer: IpAddr, now: Duration) {
        if self.untrusted.due(now) {
            tracing::warn!(
                %peer,
                "X-Forwarded-For from a peer that is not a trusted proxy, ignored (said at most once a minute): if {peer} is a reverse proxy of yours, name it with --trusted-proxy, or every client behind it is registered at its address",
            );
        } else {
            tracing::debug!(%peer, "X-Forwarded-For from a peer that is not a trusted proxy, ignored");
        }
    }

    /// A trusted proxy sent a header that is not a list of addresses.
    pub fn bad_header(&self, peer: IpAddr, failure: &Failure, now: Duration) {
        if self.bad_header.due(now) {
            tracing::warn!(%peer, "answered 400 (said at most once a minute): {}", failure.reason);
        } else {
            tracing::debug!(%peer, "answered 400: {}", failure.reason);
        }
    }
}

/// A warning said at most once per [`WARNING_EVERY`], whichever thread
/// gets to say it.
#[derive(Debug, Default)]
struct Sparse {
    /// When it was last said, in whole seconds on the server's clock, plus
    /// one (0: never).
    said_at: AtomicU64,
}

impl Sparse {
    fn due(&self, now: Duration) -> bool {
        let t = now.as_secs() + 1;
        let last = self.said_at.load(Ordering::Relaxed);
        (last == 0 || t >= last + WARNING_EVERY.as_secs())
            && self
                .said_at
                .compare_exchange(last, t, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
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
        for (bad, why) in [
            ("", "not an address or a network"),
            ("localhost", "names are not resolved"),
            ("10.0.0.0/33", "prefix is at most 32"),
            ("::/129", "prefix is at most 128"),
            ("10.0.0.0/x", "not a network"),
            ("1.2.3.4:80", "no port"),
            ("127.0.0.1,::1", "repeat the flag"),
        ] {
            let e = bad.parse::<ProxyNet>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        // As peers are matched: host bits cleared, mapped forms as IPv4.
        for (given, is) in [
            ("127.0.0.5/8", "127.0.0.0/8"),
            ("::ffff:127.0.0.2", "127.0.0.2/32"),
            ("::ffff:0:0/96", "0.0.0.0/0"),
            ("2001:db8::1/32", "2001:db8::/32"),
        ] {
            assert_eq!(
                given.parse::<ProxyNet>().unwrap().to_string(),
                is,
                "{given}"
            );
        }
        let mapped = trusted(&["::ffff:127.0.0.2"]);
        assert!(mapped.contains(ip("127.0.0.2")));
        assert!(mapped.contains(ip("::ffff:127.0.0.2")));
        assert!(trusted(&["::ffff:0:0/96"]).trusts_everyone());
        assert!(!trusted(&["10.0.0.0/8", "::1"]).trusts_everyone());
    }

    #[test]
    fn a_warning_is_said_at_most_once_a_minute() {
        let s = Sparse::default();
        let at = Duration::from_secs;
        assert!(s.due(at(0)));
        assert!(!s.due(at(0)) && !s.due(at(59)));
        assert!(s.due(at(60)));
        assert!(!s.due(at(100)));
        assert!(s.due(at(1000)));
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
