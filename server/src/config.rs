//! chat-server's settings: the command line, over the configuration file
//! (`--config FILE`, or `config.toml` in systemd's
//! `$CONFIGURATION_DIRECTORY`), over the defaults. Every key is documented
//! in `docs/chat-server.example.toml`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};
use serde::Deserialize;

use crate::connection::Timeouts;
use crate::proxy::{ProxyNet, TrustedProxies};
use crate::registry;
use crate::state::Limits;

/// The rendezvous server of the chat system: clients REGISTER their
/// contact and BRIDGE to be handed a waiting peer, over HTTP/1.1 on TCP,
/// UDP or both.
#[derive(Parser, Debug, Clone, Default)]
#[command(name = "chat-server", version, max_term_width = 100)]
pub struct Options {
    #[command(flatten)]
    pub knobs: Knobs,

    /// Serve UDP only; the same as `--transport udp`
    #[arg(short = 'u', long, conflicts_with = "transport")]
    pub udp: bool,

    /// Configuration file (TOML) [default: config.toml in
    /// $CONFIGURATION_DIRECTORY, when systemd sets it]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// The settings a flag or the configuration file may give, each defined
/// once for both (a flag `--per-ip-rate`, a key `per-ip-rate`); a flag wins.
#[derive(Args, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Knobs {
    /// Address to listen on (`::` for IPv6 and IPv4) [default: 0.0.0.0]
    #[arg(long)]
    pub bind: Option<IpAddr>,

    /// Port to listen on (0 picks a free one, printed at start) [default: 5555]
    #[arg(long)]
    pub port: Option<u16>,

    /// Transports to serve [default: tcp]
    #[arg(long, value_enum)]
    pub transport: Option<Transport>,

    /// Requests per second allowed from one source address (for IPv6, one /64), counted apart for TCP and UDP; 0 = off [default: 20]
    #[arg(long, value_name = "N")]
    pub per_ip_rate: Option<u32>,

    /// Requests one source may send at once above its rate; 0 = off (the rate limit too) [default: 100]
    #[arg(long, value_name = "N")]
    pub per_ip_burst: Option<u32>,

    /// Concurrent TCP connections from one source; 0 = off [default: 32]
    #[arg(long, value_name = "N")]
    pub per_ip_conns: Option<u32>,

    /// Concurrent TCP connections in all; 0 = off [default: 10000]
    #[arg(long, value_name = "N")]
    pub max_conns: Option<usize>,

    /// Registrations held at once; 0 = off [default: 100000]
    #[arg(long, value_name = "N")]
    pub max_registrations: Option<usize>,

    /// Seconds a registration lives unless refreshed [default: 300]
    #[arg(long, value_name = "SECS")]
    pub expires: Option<u32>,

    /// Seconds a request may take to arrive complete, and a client to take its answers; 0 = off [default: 10]
    #[arg(long, value_name = "SECS")]
    pub header_timeout: Option<u64>,

    /// Seconds an idle keep-alive connection is kept open; 0 = off [default: 60]
    #[arg(long, value_name = "SECS")]
    pub idle_timeout: Option<u64>,

    /// Worker threads, each with its own listening sockets; 0 = one per core [default: 0]
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,

    /// Microseconds a worker may keep polling for the next request instead of sleeping, while a core is idle; it adapts to the traffic, and never polls when requests are sparse; 0 = off [default: 200]
    #[arg(long, value_name = "MICROS")]
    pub busy_poll: Option<u64>,

    /// A reverse proxy (address, or network such as 10.0.0.0/8) whose X-Forwarded-For header names the client, over TCP; repeat for more [default: none]
    #[arg(long, value_name = "ADDR")]
    #[serde(default, deserialize_with = "crate::proxy::one_or_many")]
    pub trusted_proxy: Option<Vec<ProxyNet>>,
}

/// The configuration file holds the same settings as the flags.
pub type FileConfig = Knobs;

impl Knobs {
    /// Each setting from `self` if given, else from `other`.
    fn or(self, other: Knobs) -> Knobs {
        Knobs {
            bind: self.bind.or(other.bind),
            port: self.port.or(other.port),
            transport: self.transport.or(other.transport),
            per_ip_rate: self.per_ip_rate.or(other.per_ip_rate),
            per_ip_burst: self.per_ip_burst.or(other.per_ip_burst),
            per_ip_conns: self.per_ip_conns.or(other.per_ip_conns),
            max_conns: self.max_conns.or(other.max_conns),
            max_registrations: self.max_registrations.or(other.max_registrations),
            expires: self.expires.or(other.expires),
            header_timeout: self.header_timeout.or(other.header_timeout),
            idle_timeout: self.idle_timeout.or(other.idle_timeout),
            workers: self.workers.or(other.workers),
            busy_poll: self.busy_poll.or(other.busy_poll),
            trusted_proxy: self.trusted_proxy.or(other.trusted_proxy),
        }
    }
}

/// Which sockets the server opens.
#[derive(ValueEnum, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tcp,
    Udp,
    Both,
}

/// What the server runs with.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub bind: IpAddr,
    pub port: u16,
    pub transport: Transport,
    pub per_ip_rate: u32,
    pub per_ip_burst: u32,
    pub per_ip_conns: u32,
    pub max_conns: usize,
    pub max_registrations: usize,
    pub expires: u32,
    pub header_timeout: u64,
    pub idle_timeout: u64,
    pub workers: usize,
    /// The longest a worker polls for the next request; zero is off.
    pub busy_poll: Duration,
    pub trusted_proxies: TrustedProxies,
    pub config: Option<PathBuf>,
}

/// "Off" for a timeout: far enough away never to fire, near enough not to
/// overflow an `Instant`.
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

impl Options {
    /// Merges the flags with the configuration file, if any.
    pub fn settings(self) -> Result<Settings, String> {
        let path = self.config.clone().or_else(|| {
            std::env::var_os("CONFIGURATION_DIRECTORY")
                .map(|d| PathBuf::from(d).join("config.toml"))
                .filter(|p| p.exists())
        });
        let file = match &path {
            Some(p) => chat_proto::config::load(p).map_err(|e| e.to_string())?,
            None => FileConfig::default(),
        };
        self.merge(file, path)
    }

    fn merge(self, f: FileConfig, path: Option<PathBuf>) -> Result<Settings, String> {
        let flag_expires = self.knobs.expires;
        let k = self.knobs.or(f);
        let transport = if self.udp {
            Transport::Udp
        } else {
            k.transport.unwrap_or(Transport::Tcp)
        };
        let expires = k.expires.unwrap_or(300);
        if expires == 0 {
            let from = match (flag_expires, &path) {
                (Some(_), _) => "--expires 0".to_owned(),
                (None, Some(p)) => format!("expires = 0 in {}", p.display()),
                (None, None) => "expires = 0".to_owned(),
            };
            return Err(format!(
                "{from}: a registration must live at least 1 second; the default is 300"
            ));
        }
        Ok(Settings {
            bind: k.bind.unwrap_or(IpAddr::from([0, 0, 0, 0])),
            port: k.port.unwrap_or(chat_proto::rendezvous::DEFAULT_PORT),
            transport,
            per_ip_rate: k.per_ip_rate.unwrap_or(20),
            per_ip_burst: k.per_ip_burst.unwrap_or(100),
            per_ip_conns: k.per_ip_conns.unwrap_or(32),
            max_conns: k.max_conns.unwrap_or(10_000),
            max_registrations: k.max_registrations.unwrap_or(100_000),
            expires,
            header_timeout: k.header_timeout.unwrap_or(10),
            idle_timeout: k.idle_timeout.unwrap_or(60),
            workers: k.workers.unwrap_or(0),
            busy_poll: Duration::from_micros(k.busy_poll.unwrap_or(200)),
            trusted_proxies: TrustedProxies::new(k.trusted_proxy.unwrap_or_default()),
            config: path,
        })
    }
}

impl Settings {
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
            trusted_proxies: self.trusted_proxies.clone(),
        }
    }

    pub fn timeouts(&self) -> Timeouts {
        // 0 is off; anything past NEVER is as good as off, and kept there
        // so that deadlines computed from it cannot overflow an Instant.
        let secs = |s: u64| {
            if s == 0 {
                NEVER
            } else {
                Duration::from_secs(s).min(NEVER)
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

    use std::path::Path;

    fn settings(args: &[&str]) -> Settings {
        let mut argv = vec!["chat-server"];
        argv.extend_from_slice(args);
        Options::parse_from(argv)
            .merge(FileConfig::default(), None)
            .unwrap()
    }

    #[test]
    fn defaults_match_the_seeds() {
        let s = settings(&[]);
        assert_eq!(s.port, 5555);
        assert_eq!(s.transport, Transport::Tcp);
        assert_eq!(s.bind.to_string(), "0.0.0.0");
        assert_eq!((s.per_ip_rate, s.per_ip_burst, s.expires), (20, 100, 300));
    }

    #[test]
    fn dash_u_means_udp_and_equals_syntax_works() {
        let s = settings(&["-u", "--port=6000"]);
        assert_eq!(s.transport, Transport::Udp);
        assert_eq!(s.port, 6000);
        assert!(Options::try_parse_from(["chat-server", "-u", "--transport", "tcp"]).is_err());
        assert!(
            Options::parse_from(["chat-server", "--expires", "0"])
                .merge(FileConfig::default(), None)
                .is_err()
        );
        let err = Options::parse_from(["chat-server"])
            .merge(
                FileConfig {
                    expires: Some(0),
                    ..FileConfig::default()
                },
                Some(PathBuf::from("/etc/chat-server/config.toml")),
            )
            .unwrap_err();
        assert!(
            err.contains("expires = 0 in /etc/chat-server/config.toml"),
            "{err}"
        );
    }

    #[test]
    fn trusted_proxies_come_from_repeated_flags_or_a_list() {
        let s = settings(&["--trusted-proxy", "127.0.0.1", "--trusted-proxy=10.0.0.0/8"]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(s.trusted_proxies.contains(ip("127.0.0.1")));
        assert!(s.trusted_proxies.contains(ip("10.9.8.7")));
        assert!(!s.trusted_proxies.contains(ip("127.0.0.2")));
        assert!(settings(&[]).trusted_proxies.is_empty());
        let err = Options::try_parse_from(["chat-server", "--trusted-proxy", "nginx"]).unwrap_err();
        assert!(err.to_string().contains("names are not resolved"), "{err}");
        let f: FileConfig = chat_proto::config::parse(
            Path::new("s.toml"),
            "trusted-proxy = [\"::1\", \"fd00::/8\"]\n",
        )
        .unwrap();
        let s = Options::parse_from(["chat-server"]).merge(f, None).unwrap();
        assert!(s.trusted_proxies.contains(ip("fd00::5")));
        // One address may go without brackets.
        let f: FileConfig =
            chat_proto::config::parse(Path::new("s.toml"), "trusted-proxy = \"127.0.0.1\"\n")
                .unwrap();
        assert_eq!(f.trusted_proxy, Some(vec!["127.0.0.1".parse().unwrap()]));
        // A bad entry is named, with the key's line.
        let bad = chat_proto::config::parse::<FileConfig>(
            Path::new("s.toml"),
            "trusted-proxy = [\n  \"::1\",\n  \"10.0.0.0/40\",\n]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(bad.contains("prefix is at most 32"), "{bad}");
        assert!(bad.contains("line 1, key `trusted-proxy`"), "{bad}");
        let bad =
            chat_proto::config::parse::<FileConfig>(Path::new("s.toml"), "trusted-proxy = 7\n")
                .unwrap_err()
                .to_string();
        assert!(bad.contains("a list of them"), "{bad}");
    }

    #[test]
    fn zero_turns_timeouts_off_and_huge_ones_are_capped() {
        assert_eq!(
            settings(&["--header-timeout", "0"]).timeouts().header,
            NEVER
        );
        let huge = u64::MAX.to_string();
        assert_eq!(settings(&["--idle-timeout", &huge]).timeouts().idle, NEVER);
    }

    #[test]
    fn flags_override_the_file() {
        let f: FileConfig = chat_proto::config::parse(
            Path::new("s.toml"),
            "port = 7000\ntransport = \"both\"\nper-ip-rate = 5\n",
        )
        .unwrap();
        let s = Options::parse_from(["chat-server", "--per-ip-rate", "9"])
            .merge(f, None)
            .unwrap();
        assert_eq!(
            (s.port, s.transport, s.per_ip_rate),
            (7000, Transport::Both, 9)
        );
    }

    #[test]
    fn the_example_file_documents_every_key() {
        let text = include_str!("../../docs/chat-server.example.toml");
        let uncommented = chat_proto::config::example_settings(text);
        let f: FileConfig = chat_proto::config::parse(Path::new("example"), &uncommented).unwrap();
        let every = [
            f.bind.is_some(),
            f.port.is_some(),
            f.transport.is_some(),
            f.per_ip_rate.is_some(),
            f.per_ip_burst.is_some(),
            f.per_ip_conns.is_some(),
            f.max_conns.is_some(),
            f.max_registrations.is_some(),
            f.expires.is_some(),
            f.header_timeout.is_some(),
            f.idle_timeout.is_some(),
            f.workers.is_some(),
            f.busy_poll.is_some(),
            f.trusted_proxy.is_some(),
        ];
        assert!(every.iter().all(|&b| b), "{f:?}");
    }
}
