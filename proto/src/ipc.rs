//! The control socket between `chatctl` and `chatd`.
//!
//! Frames are length-prefixed postcard values (see [`crate::frame`]). Each
//! side first sends a [`Hello`] stating its protocol version; a mismatch is
//! reported by both with both versions, and the connection closes. Then the
//! client sends [`ClientFrame`]s, each a numbered [`Request`], and the daemon
//! answers each with one [`DaemonFrame::Reply`] carrying the same number,
//! preceded, for `tail` and `history`, by [`DaemonFrame::Record`]s. A
//! `tail --follow` keeps receiving records until the client leaves; one that
//! reads too slowly is sent [`DaemonFrame::Dropped`] and disconnected.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::ClientId;

/// The control protocol's version: bumped on any change to these types.
pub const VERSION: u32 = 1;
/// The largest frame either way.
pub const MAX_FRAME: usize = 64 * 1024;

/// The first frame each way. Its shape never changes, so that two versions
/// can always tell each other apart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    /// The program and its version, for messages: `chatd 0.1.0`.
    pub software: String,
}

impl Hello {
    pub fn ours(program: &str) -> Hello {
        Hello {
            protocol: VERSION,
            software: format!("{program} {}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// A request and the number its reply will carry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientFrame {
    pub id: u64,
    pub request: Request,
}

/// What chatctl asks of chatd.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// The daemon's id.
    Id,
    /// id, state, peer, server, turn.
    Status,
    /// REGISTER with the server (a refresh when already registered).
    Register,
    /// BRIDGE, optionally to a named peer.
    Bridge { peer: Option<ClientId> },
    /// Start chatting with the bridged peer.
    Chat,
    /// Send one message; the reply comes once the peer stored it.
    Send { text: String },
    /// End the chat and leave the server.
    Quit,
    /// The last `last` records, then, with `follow`, every new one.
    Tail { last: u32, follow: bool },
    /// Reply once the daemon is in `state`.
    Wait { state: State },
    /// Search the stored history.
    History {
        peer: Option<ClientId>,
        grep: Option<String>,
        limit: u32,
    },
}

/// What chatd sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DaemonFrame {
    /// The answer to request `id`.
    Reply {
        id: u64,
        result: Result<Reply, Failure>,
    },
    /// One record for request `id` (`tail` or `history`).
    Record { id: u64, record: Record },
    /// The last frame to a follower that fell behind.
    Dropped { reason: String },
}

/// A successful answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Id {
        id: ClientId,
    },
    Status(Status),
    Registered {
        addr: SocketAddr,
        expires: u32,
    },
    /// `peer` is `None` when the daemon now waits for one.
    Bridged {
        peer: Option<(ClientId, SocketAddr)>,
    },
    Chatting {
        peer: ClientId,
    },
    /// Stored by the peer: `id` is the message's number on the link,
    /// `round_trip_us` the time from sending it to the peer's
    /// acknowledgement, as this daemon measured it.
    Sent {
        id: u64,
        round_trip_us: u64,
    },
    Quit,
    /// The daemon is in the state waited for.
    Reached {
        state: State,
    },
    /// The end of `tail` (without follow) or `history`.
    Done,
}

/// Why a request failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub kind: FailureKind,
    /// One line that says what failed and what to do.
    pub message: String,
}

impl Failure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Kinds of failure, so that scripts can tell them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureKind {
    /// Not possible in the current state (not registered, not chatting...).
    State,
    /// The server refused or could not be reached.
    Server,
    /// The peer refused, left, or could not be reached.
    Peer,
    /// The request itself is wrong (text too long...).
    Invalid,
    /// Not your turn (with --turns).
    Turn,
    /// The daemon is stopping.
    ShuttingDown,
    /// Storage failed.
    Storage,
}

/// The daemon's state, as `status` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum State {
    /// Not registered with the server.
    Idle,
    Registered,
    /// Registered and waiting for a peer to connect.
    Waiting,
    /// Handed a peer by the server; `chat` connects to it.
    Ready,
    Chatting,
}

impl State {
    pub const ALL: [State; 5] = [
        State::Idle,
        State::Registered,
        State::Waiting,
        State::Ready,
        State::Chatting,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Registered => "registered",
            State::Waiting => "waiting",
            State::Ready => "ready",
            State::Chatting => "chatting",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for State {
    type Err = String;
    fn from_str(s: &str) -> Result<State, String> {
        State::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!("unknown state {s:?}: one of idle, registered, waiting, ready, chatting")
            })
    }
}

/// Who may write next, with --turns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Turn {
    Mine,
    Peers,
}

/// What `status` reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub id: ClientId,
    pub state: State,
    pub peer: Option<ClientId>,
    /// The server as configured (`host:port`).
    pub server: String,
    /// The port peers connect to.
    pub port: u16,
    /// `None` unless chatting with --turns.
    pub turn: Option<Turn>,
    /// The address the server recorded for us, when registered.
    pub addr: Option<SocketAddr>,
}

/// One entry of the history: a message or an event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Position in the history; increases with every record.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: i64,
    pub kind: RecordKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordKind {
    Message {
        from: ClientId,
        to: ClientId,
        text: String,
        /// Sent by this daemon (as opposed to received).
        outgoing: bool,
        /// For a message sent: stored by the peer (`Some(true)`), lost with
        /// the link (`Some(false)`), or not known yet (`None`). A message
        /// received is stored, so `Some(true)`.
        delivered: Option<bool>,
    },
    /// The daemon changed state.
    State {
        state: State,
        peer: Option<ClientId>,
    },
    /// Something a person should know (peer left, registration lost...).
    Notice { text: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Decoder, encode};

    #[test]
    fn hello_shape_is_fixed() {
        // Version 1's Hello, byte for byte: a future version must still
        // decode it to report the mismatch.
        let mut wire = Vec::new();
        encode(
            &Hello {
                protocol: 1,
                software: "chatd 0.1.0".into(),
            },
            MAX_FRAME,
            &mut wire,
        )
        .unwrap();
        assert_eq!(&wire[..6], &[13, 0, 0, 0, 1, 11]);
        assert_eq!(&wire[6..], b"chatd 0.1.0");
    }

    #[test]
    fn frames_round_trip() {
        let frames = vec![
            DaemonFrame::Reply {
                id: 1,
                result: Ok(Reply::Done),
            },
            DaemonFrame::Reply {
                id: 2,
                result: Err(Failure::new(
                    FailureKind::State,
                    "not registered: run chatctl register",
                )),
            },
            DaemonFrame::Record {
                id: 3,
                record: Record {
                    seq: 9,
                    time_ms: 1,
                    kind: RecordKind::Message {
                        from: "a".parse().unwrap(),
                        to: "b".parse().unwrap(),
                        text: "hi".into(),
                        outgoing: true,
                        delivered: Some(true),
                    },
                },
            },
            DaemonFrame::Dropped {
                reason: "too slow".into(),
            },
        ];
        let mut wire = Vec::new();
        for f in &frames {
            encode(f, MAX_FRAME, &mut wire).unwrap();
        }
        let mut d = Decoder::new(MAX_FRAME);
        d.extend(&wire);
        for f in frames {
            assert_eq!(d.decode::<DaemonFrame>().unwrap(), Some(f));
        }
    }

    #[test]
    fn states_parse_by_name() {
        for s in State::ALL {
            assert_eq!(s.as_str().parse::<State>(), Ok(s));
        }
        assert!("busy".parse::<State>().is_err());
    }
}
