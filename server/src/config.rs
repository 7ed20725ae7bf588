//! The command line: where to listen, which transports, and every limit.

use std::net::IpAddr;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::connection::Timeouts;
use crate::registry;
use crate::state::Limits;

/// The rendezvous server of the chat system: clients REGISTER their
/// contact and BRIDGE to be handed a waiting peer, over HTTP/1.1 on TCP,
/// UDP or both.
#[derive(Parser, Debug, Clone)]
#[command(name = "chat-server", version, max_term_width = 100)]
pub struct Options {
    /// Address to listen on (`::` for IPv6 and IPv4)
    #[arg(long, default_value = "0.0.0.0")]
    pub bind: IpAddr,

    /// Port to listen on (0 picks a free one, printed at start)
    #[arg(long, default_value_t = chat_proto::rendezvous::DEFAULT_PORT)]
    pub port: u16,

    /// Transports to serve
    #[arg(long, value_enum, default_value_t = Transport::Tcp)]
    pub transport: Transport,

    /// Serve UDP only; the same as `--transport udp`
    #[arg(short = 'u', long, conflicts_with = "transport")]
    pub udp: bool,

    /// Requests per second allowed from one address (an IPv6 /64); 0 = off
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub per_ip_rate: u32,

    /// Requests one address may send at once above its rate; 0 = off
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub per_ip_burst: u32,

    /// Concurrent TCP connections from one address; 0 = off
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub per_ip_conns: u32,

    /// Concurrent TCP connections in all; 0 = off
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    pub max_conns: usize,

    /// Registrations held at once; 0 = off
    #[arg(long, default_value_t = 100_000, value_name = "N")]
    pub max_registrations: usize,

    /// Seconds a registration lives unless refreshed
    #[arg(long, default_value_t = 300, value_name = "SECS", value_parser = clap::value_parser!(u32).range(1..))]
    pub expires: u32,

    /// Seconds a request may take to arrive complete; 0 = off
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub header_timeout: u64,

    /// Seconds an idle keep-alive connection is kept open; 0 = off
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub idle_timeout: u64,

    /// Worker threads, each with its own listening sockets; 0 = one per core
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub workers: usize,
}

/// Which sockets the server opens.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
    Both,
}

/// "Off" for a timeout: far enough away never to fire, near enough not to
/// overflow an `Instant`.
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

impl Options {
    pub fn transport(&self) -> Transport {
        if self.udp {
            Transport::Udp
        } else {
            self.transport
        }
    }

    pub fn limits(&self) -> Limits {
        Limits {
            registry: registry::Config {
                expires: Duration::from_secs(u64::from(self.expires)),
                max_registrations: self.max_registrations,
            },
            per_ip_rate: self.per_ip_rate,
            per_ip_burst: self.per_ip_burst,
            per_ip_conns: self.per_ip_conns,
            max_conns: self.max_conns,
        }
    }

    pub fn timeouts(&self) -> Timeouts {
        let secs = |s: u64| {
            if s == 0 {
                NEVER
            } else {
                Duration::from_secs(s)
            }
        };
        Timeouts {
            header: secs(self.header_timeout),
            idle: secs(self.idle_timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_seeds() {
        let o = Options::parse_from(["chat-server"]);
        assert_eq!(o.port, 5555);
        assert_eq!(o.transport(), Transport::Tcp);
        assert_eq!(o.bind.to_string(), "0.0.0.0");
    }

    #[test]
    fn dash_u_means_udp_and_equals_syntax_works() {
        let o = Options::parse_from(["chat-server", "-u", "--port=6000"]);
        assert_eq!(o.transport(), Transport::Udp);
        assert_eq!(o.port, 6000);
        assert!(Options::try_parse_from(["chat-server", "-u", "--transport", "tcp"]).is_err());
        assert!(Options::try_parse_from(["chat-server", "--expires", "0"]).is_err());
    }

    #[test]
    fn zero_turns_timeouts_off() {
        let o = Options::parse_from(["chat-server", "--header-timeout", "0"]);
        assert_eq!(o.timeouts().header, NEVER);
    }
}
