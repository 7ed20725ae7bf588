//! chatd's command line.

use std::path::PathBuf;

use chat_proto::ClientId;
use clap::Parser;

/// The chat daemon: one per identity. It holds the registration with the
/// rendezvous server, the peer link and the history; `chatctl` drives it
/// over a local socket.
#[derive(Parser, Debug, Clone)]
#[command(name = "chatd", version, max_term_width = 100)]
pub struct Options {
    /// This daemon's id: 1 to 32 of A-Z a-z 0-9 . _ -
    #[arg(long)]
    pub id: ClientId,

    /// TCP port peers connect to (0: any free one, shown by `chatctl status`)
    #[arg(long)]
    pub port: u16,

    /// The rendezvous server, HOST:PORT
    #[arg(long)]
    pub server: String,

    /// Control socket path [default: $XDG_RUNTIME_DIR/chatd/ID.sock]
    #[arg(long)]
    pub socket: Option<PathBuf>,

    /// Where the history is kept [default: $XDG_DATA_HOME/chat/ID]
    #[arg(long)]
    pub data_dir: Option<PathBuf>,

    /// Take turns, as the seed projects did: the initiator writes first,
    /// then the two alternate
    #[arg(long)]
    pub turns: bool,

    /// Register with the server at start-up
    #[arg(long)]
    pub register: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_syntax_is_accepted() {
        let o = Options::parse_from([
            "chatd",
            "--id=user1",
            "--port=3000",
            "--server=127.0.0.2:5555",
        ]);
        assert_eq!(o.id.as_str(), "user1");
        assert_eq!(o.port, 3000);
        assert_eq!(o.server, "127.0.0.2:5555");
        assert!(
            Options::try_parse_from(["chatd", "--id=bad id", "--port=1", "--server=x:1"]).is_err()
        );
    }
}
