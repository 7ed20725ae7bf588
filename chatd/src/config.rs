//! chatd's settings: the command line, over the configuration file, over
//! the defaults.
//!
//! The file is TOML, `chatd/ID.toml` (else `chatd/config.toml`) under the
//! user's configuration directory, or the one `--config` names; every key
//! is documented in `docs/chatd.example.toml`.

use std::net::IpAddr;
use std::path::PathBuf;

use chat_proto::ClientId;
use clap::Parser;
use serde::Deserialize;

/// The chat daemon: one per identity. It holds the registration with the
/// rendezvous server, the peer link and the history; `chatctl` drives it
/// over a local socket.
#[derive(Parser, Debug, Clone, Default)]
#[command(name = "chatd", version, max_term_width = 100)]
pub struct Options {
    /// This daemon's id: 1 to 32 of A-Z a-z 0-9 . _ - (not . or ..)
    #[arg(long)]
    pub id: Option<ClientId>,

    /// TCP port peers connect to (0: any free one, shown by `chatctl status`)
    #[arg(long)]
    pub port: Option<u16>,

    /// Listen for peers on this address only, and reach the server and call
    /// peers from it (so the server hands peers this address) [default:
    /// every address]
    #[arg(long, value_name = "IP")]
    pub bind: Option<IpAddr>,

    /// The rendezvous server, HOST:PORT
    #[arg(long)]
    pub server: Option<String>,

    /// Control socket path [default: $XDG_RUNTIME_DIR/chatd/ID.sock]
    #[arg(long)]
    pub socket: Option<PathBuf>,

    /// Where the history is kept; made private to you (mode 700) [default: $XDG_DATA_HOME/chat/ID]
    #[arg(long)]
    pub data_dir: Option<PathBuf>,

    /// Take turns, as the seed projects did: the initiator writes first,
    /// then the two alternate (in chats this daemon starts; a chat follows
    /// the setting of the daemon that starts it)
    #[arg(long)]
    pub turns: bool,

    /// Register with the server at start-up
    #[arg(long)]
    pub register: bool,

    /// Configuration file [default: chatd/ID.toml, else chatd/config.toml,
    /// under $XDG_CONFIG_HOME]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// The configuration file: the same settings as the flags.
#[derive(Deserialize, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub id: Option<ClientId>,
    pub port: Option<u16>,
    pub bind: Option<IpAddr>,
    pub server: Option<String>,
    pub socket: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub turns: Option<bool>,
    pub register: Option<bool>,
}

/// What the daemon runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub id: ClientId,
    pub port: u16,
    pub bind: Option<IpAddr>,
    pub server: String,
    pub socket: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub turns: bool,
    pub register: bool,
    /// The file the settings came from, if any.
    pub config: Option<PathBuf>,
}

impl Options {
    /// Merges the flags with the configuration file.
    pub fn settings(self) -> Result<Settings, String> {
        let path = match &self.config {
            Some(p) => Some(p.clone()),
            None => default_config(self.id.as_ref()),
        };
        let file: FileConfig = match &path {
            Some(p) => chat_proto::config::load(p).map_err(|e| e.to_string())?,
            None => FileConfig::default(),
        };
        self.merge(file, path)
    }

    fn merge(self, file: FileConfig, path: Option<PathBuf>) -> Result<Settings, String> {
        let where_ = |key: &str, example: &str| match &path {
            Some(p) => format!(
                "pass --{key} {example}, or set `{key} = ...` in {}",
                p.display()
            ),
            None => {
                let name = self
                    .id
                    .or(file.id)
                    .map_or("ID".to_owned(), |i| i.to_string());
                let (file, shared) = config_dir().map_or(
                    (format!("chatd/{name}.toml"), "chatd/config.toml".to_owned()),
                    |d| {
                        let at = |f: &str| d.join(f).display().to_string();
                        (at(&format!("{name}.toml")), at("config.toml"))
                    },
                );
                format!(
                    "pass --{key} {example}, or set it in a configuration file ({file}, or {shared} for every id)"
                )
            }
        };
        let id = self
            .id
            .or(file.id)
            .ok_or_else(|| format!("no id given: {}", where_("id", "ID")))?;
        let port = self
            .port
            .or(file.port)
            .ok_or_else(|| format!("no peer port given: {}", where_("port", "PORT")))?;
        let server_from_file = self.server.is_none();
        let server = self
            .server
            .or(file.server)
            .ok_or_else(|| format!("no server given: {}", where_("server", "HOST:PORT")))?;
        check_server(&server).map_err(|e| match (&path, server_from_file) {
            (Some(p), true) => format!("{}: `server`: {e}", p.display()),
            _ => e,
        })?;
        Ok(Settings {
            id,
            port,
            bind: self.bind.or(file.bind),
            server,
            socket: self.socket.or(file.socket),
            data_dir: self.data_dir.or(file.data_dir),
            turns: self.turns || file.turns.unwrap_or(false),
            register: self.register || file.register.unwrap_or(false),
            config: path,
        })
    }
}

/// A server address must name a port: `HOST:PORT` or `[IPv6]:PORT`.
fn check_server(server: &str) -> Result<(), String> {
    if let Some((scheme, rest)) = server.split_once("://") {
        let rest = rest.trim_end_matches('/');
        return Err(format!(
            "bad server address {server:?}: no {scheme}:// (chatd speaks to the server itself); give HOST:PORT, such as {rest:?}"
        ));
    }
    match server
        .rsplit_once(':')
        .map(|(host, port)| (host, port.parse::<u16>()))
    {
        Some((host, Ok(port))) if !host.is_empty() && port != 0 => Ok(()),
        _ => Err(format!(
            "bad server address {server:?}: HOST:PORT expected, such as 127.0.0.1:5555 or chat.example.org:5555"
        )),
    }
}

/// `$XDG_CONFIG_HOME/chatd` (or the platform's equivalent).
pub fn config_dir() -> Option<PathBuf> {
    directories::BaseDirs::new().map(|b| b.config_dir().join("chatd"))
}

/// The default file, if it exists: `chatd/ID.toml`, else `chatd/config.toml`.
fn default_config(id: Option<&ClientId>) -> Option<PathBuf> {
    let dir = config_dir()?;
    let mut candidates = Vec::new();
    if let Some(id) = id {
        candidates.push(dir.join(format!("{id}.toml")));
    }
    candidates.push(dir.join("config.toml"));
    candidates.into_iter().find(|p| p.exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::path::Path;

    #[test]
    fn seed_syntax_is_accepted() {
        let o = Options::parse_from([
            "chatd",
            "--id=user1",
            "--port=3000",
            "--server=127.0.0.2:5555",
        ]);
        let s = o.merge(FileConfig::default(), None).unwrap();
        assert_eq!(s.id.as_str(), "user1");
        assert_eq!(s.port, 3000);
        assert_eq!(s.server, "127.0.0.2:5555");
        assert!(
            Options::try_parse_from(["chatd", "--id=bad id", "--port=1", "--server=x:1"]).is_err()
        );
    }

    #[test]
    fn bind_comes_from_the_flag_or_the_file() {
        let flags = |extra: &[&str]| {
            let mut args = vec!["chatd", "--id", "a", "--port", "1", "--server", "s:1"];
            args.extend_from_slice(extra);
            Options::parse_from(args)
        };
        let file = FileConfig {
            bind: Some("127.0.0.1".parse().unwrap()),
            ..FileConfig::default()
        };
        let s = flags(&[]).merge(FileConfig::default(), None).unwrap();
        assert_eq!(s.bind, None);
        let s = flags(&[]).merge(file, None).unwrap();
        assert_eq!(s.bind, Some("127.0.0.1".parse().unwrap()));
        let file = FileConfig {
            bind: Some("127.0.0.1".parse().unwrap()),
            ..FileConfig::default()
        };
        let s = flags(&["--bind", "::1"]).merge(file, None).unwrap();
        assert_eq!(s.bind, Some("::1".parse().unwrap()));
        assert!(Options::try_parse_from(["chatd", "--bind", "localhost"]).is_err());
    }

    #[test]
    fn the_server_needs_a_port() {
        for bad in ["nohost", "host:", ":5555", "host:port", "host:0"] {
            let err = Options::parse_from(["chatd", "--id", "a", "--port", "1", "--server", bad])
                .merge(FileConfig::default(), None)
                .unwrap_err();
            assert!(err.contains("HOST:PORT expected"), "{bad}: {err}");
        }
        for good in ["127.0.0.1:5555", "[::1]:5555", "chat.example.org:1"] {
            assert!(check_server(good).is_ok(), "{good}");
        }
        // A URL is a likely slip: said so, with what to give instead.
        let err = check_server("http://127.0.0.1:5555/").unwrap_err();
        assert!(
            err.contains("no http://") && err.contains("\"127.0.0.1:5555\""),
            "{err}"
        );
    }

    #[test]
    fn flags_override_the_file() {
        let file: FileConfig = chat_proto::config::parse(
            Path::new("a.toml"),
            "id = \"alice\"\nport = 4000\nserver = \"s:1\"\nturns = true\n",
        )
        .unwrap();
        let o = Options::parse_from(["chatd", "--port", "5000"]);
        let s = o.merge(file, Some("a.toml".into())).unwrap();
        assert_eq!(
            (s.id.as_str(), s.port, s.server.as_str(), s.turns),
            ("alice", 5000, "s:1", true)
        );
    }

    #[test]
    fn missing_settings_say_where_to_put_them() {
        let err = Options::parse_from(["chatd", "--id", "a", "--port", "1"])
            .merge(FileConfig::default(), Some("/c/a.toml".into()))
            .unwrap_err();
        assert_eq!(
            err,
            "no server given: pass --server HOST:PORT, or set `server = ...` in /c/a.toml"
        );
    }

    #[test]
    fn a_bad_server_from_the_file_names_the_file_and_key() {
        let file = FileConfig {
            server: Some("127.0.0.1".into()),
            ..FileConfig::default()
        };
        let err = Options::parse_from(["chatd", "--id", "a", "--port", "1"])
            .merge(file, Some("/c/a.toml".into()))
            .unwrap_err();
        assert!(
            err.starts_with("/c/a.toml: `server`: bad server address \"127.0.0.1\""),
            "{err}"
        );
    }

    #[test]
    fn the_example_file_documents_every_key() {
        let text = include_str!("../../docs/chatd.example.toml");
        // Every key, uncommented, must parse into a fully set FileConfig.
        let uncommented = chat_proto::config::example_settings(text);
        let file: FileConfig =
            chat_proto::config::parse(Path::new("example"), &uncommented).unwrap();
        assert!(file.id.is_some() && file.port.is_some() && file.server.is_some());
        assert!(file.socket.is_some() && file.data_dir.is_some());
        assert!(file.turns.is_some() && file.register.is_some());
    }
}
