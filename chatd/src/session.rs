//! The session: what one chatd is doing, as a pure state machine.
//!
//! Inputs are the user's commands, the server's answers, and what happens on
//! the peer link; outputs are [`Action`]s for the driver to carry out
//! (send this request, open that connection, store this record, reply to
//! that command). The session reads no clock and opens no socket: `now` is
//! passed in, and [`Session::poll_timeout`] says when to call
//! [`Session::handle_timeout`] next. So registration refreshes, heartbeats,
//! turn-taking and every failure path are unit tests, not sleeps.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chat_proto::crypto::PeerKey;
use chat_proto::ipc::{Failure, FailureKind, RecordKind, Reply, State, Status, Turn};
use chat_proto::peer::{Hello, MAX_TEXT, PeerFrame};
use chat_proto::rendezvous::{ErrorStatus, IN_A_CHAT, Request, Response};
use chat_proto::{ClientId, Token};

/// Identifies a user command awaiting its reply (the driver's handle).
pub type Ticket = u64;
/// The ticket of a command the daemon gives itself: no client waits for
/// its reply, which the driver logs. Drivers number clients' tickets from 1.
pub const OWN: Ticket = 0;
/// Identifies one peer connection.
pub type LinkId = u64;
/// Identifies one request to the server.
pub type OpId = u64;

/// What the session is started with.
#[derive(Clone, Debug)]
pub struct Config {
    pub id: ClientId,
    /// The port peers connect to.
    pub port: u16,
    /// The server, as configured, for status and messages.
    pub server: String,
    /// Keep the walkie-talkie discipline.
    pub turns: bool,
    /// Send a ping this often on a quiet link.
    pub ping_every: Duration,
    /// A link silent for this long is dead.
    pub peer_timeout: Duration,
    /// Retry a failed background refresh after this long.
    pub retry_after: Duration,
}

impl Config {
    pub fn new(id: ClientId, port: u16, server: String, turns: bool) -> Config {
        Config {
            id,
            port,
            server,
            turns,
            ping_every: Duration::from_secs(3),
            peer_timeout: Duration::from_secs(9),
            retry_after: Duration::from_secs(5),
        }
    }
}

/// A user command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Register,
    Bridge { peer: Option<ClientId> },
    Chat,
    Send { text: String },
    Quit,
}

/// Something that happened.
#[derive(Clone, Debug)]
pub enum Input {
    Command {
        ticket: Ticket,
        command: Command,
    },
    /// The server answered (`Ok`, possibly an HTTP error) or could not be
    /// reached (`Err`, a reason for people).
    ServerReply {
        op: OpId,
        result: Result<Response, String>,
    },
    /// An outgoing link completed its handshake with `peer`.
    LinkUp {
        link: LinkId,
        peer: ClientId,
    },
    /// An outgoing link could not be opened.
    LinkFailed {
        link: LinkId,
        /// The status the peer refused the call with, if it answered.
        refused: Option<u16>,
        reason: String,
        /// The connection itself was refused: no daemon listens there.
        nobody_listens: bool,
    },
    /// A peer connected and asked to chat; answer with Accept or Refuse.
    Incoming {
        link: LinkId,
        hello: Hello,
    },
    Frame {
        link: LinkId,
        frame: PeerFrame,
    },
    /// A link ended without a Bye (reset, end of stream).
    LinkClosed {
        link: LinkId,
        reason: String,
    },
    /// The daemon is stopping: leave the peer and the server.
    Shutdown,
}

/// Something for the driver to do, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Server {
        op: OpId,
        request: Request,
    },
    /// Call `peer` at `addr`, proving the introduction with `key`.
    Connect {
        link: LinkId,
        addr: SocketAddr,
        hello: Hello,
        peer: ClientId,
        key: PeerKey,
    },
    Accept {
        link: LinkId,
    },
    Refuse {
        link: LinkId,
        status: u16,
        reason: String,
    },
    /// Send a frame on a link. Frames that follow a `Record` must not leave
    /// before that record is durably stored (acks promise storage).
    Send {
        link: LinkId,
        frame: PeerFrame,
    },
    /// Flush what was sent, then close.
    Close {
        link: LinkId,
    },
    /// Store and announce.
    Record(RecordKind),
    /// Store and announce a message we send as `id` on `link`: the later
    /// `Delivery` for that pair marks this very record.
    Outgoing {
        link: LinkId,
        id: u64,
        record: RecordKind,
    },
    Reply {
        ticket: Ticket,
        result: Result<Reply, Failure>,
    },
    /// Persist the client token (so a restarted daemon reclaims its id).
    SaveToken(Token),
    /// Message `id` sent on `link` was stored by the peer, or never will be:
    /// the history notes which.
    Delivery {
        link: LinkId,
        id: u64,
        delivered: bool,
    },
}

/// Why the session wants a server request.
#[derive(Clone, Debug)]
enum Purpose {
    Register(Ticket),
    /// Registering at start-up (`--register`): retried while the server
    /// cannot be reached, as a service must come up before its server.
    AutoRegister,
    Refresh,
    Bridge {
        ticket: Ticket,
        peer: Option<ClientId>,
        retried: bool,
    },
    /// Re-register after the server forgot us, then carry on with `then`.
    Reregister {
        then: Box<Purpose>,
    },
    /// Rejoin the waiting pool of a server that forgot we were waiting.
    Rejoin,
    /// Take back, with the token kept from before, a registration this
    /// daemon does not hold now (an earlier run's, most likely), then
    /// register anew with `then`. A REGISTER with that token would keep
    /// whatever the server still holds for it: an earlier run waiting for
    /// a peer stays in the pool, handed out to callers this run refuses.
    Reclaim {
        then: Box<Purpose>,
    },
    /// Tell the server we chat with `peer` (nobody waits on the answer).
    Chat {
        peer: ClientId,
        retried: bool,
    },
    Quit(Option<Ticket>),
}

#[derive(Clone, Debug)]
struct Registration {
    addr: SocketAddr,
    refresh_at: Instant,
    lapses_at: Instant,
}

#[derive(Clone, Debug)]
enum Phase {
    None,
    Waiting,
    Ready {
        peer: ClientId,
        addr: SocketAddr,
        /// What the server gave to prove the introduction to `peer`.
        key: PeerKey,
    },
    Connecting {
        peer: ClientId,
        addr: SocketAddr,
        /// The introduction's key, kept to go back to `Ready`.
        key: PeerKey,
        call: Call,
        ticket: Ticket,
    },
    /// An incoming call accepted, not yet confirmed (see [`Answering`]).
    Answering(Box<Answering>),
    Chatting(Chat),
}

/// An incoming call whose handshake passed but whose caller has not yet
/// sent a record on the link. Only the caller holding the handshake's
/// fresh key can send one, so a handshake replayed by someone who saw it
/// on the network gets this far and no further: until the caller's first
/// frame, no chat has begun for the user to see, and if none comes the
/// daemon goes back to what it was doing, as if no call had come.
#[derive(Clone, Debug)]
struct Answering {
    peer: ClientId,
    link: LinkId,
    turns: bool,
    /// Given up on, past this.
    until: Instant,
    /// A `chat` command whose own call gave way to this one.
    ticket: Option<Ticket>,
    /// The phase to go back to if the call does not complete.
    back: Phase,
    /// Answers to `bridge` commands that came meanwhile, held until the
    /// call is decided: they stand if it does not complete, and are moot
    /// if it does.
    bridged: Vec<(Ticket, Reply)>,
}

/// How long an accepted caller has to send its first frame: it sends one
/// at once, so this only bounds a call that will never complete.
const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// Least time between two returns to the pool after answered calls that
/// did not complete.
const REJOIN_AFTER_ANSWER: Duration = Duration::from_secs(30);

/// How long after such a call the return waits, so that it does not
/// overtake the CHAT the caller sent the server as its link came up.
const REJOIN_DELAY: Duration = Duration::from_secs(2);

/// Where the call of a `chat` command stands.
#[derive(Clone, Debug)]
enum Call {
    /// Connecting on this link.
    Dialing(LinkId),
    /// Refused with 409 by a peer whose id is lower: it is calling at the
    /// same time, its refusal overtook its call, and its call is the one
    /// both ends keep. That call is awaited until `until`; past it,
    /// `reason` stands.
    Crossed { until: Instant, reason: String },
}

/// How long a call refused by a crossing call waits for that call. Both
/// calls start within moments of each other, so this is plenty.
const CROSSING_WAIT: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
struct Chat {
    peer: ClientId,
    link: LinkId,
    /// Whether the two take turns: the initiator's setting, which it sends
    /// in its hello, so that both ends hold the same rule.
    turns: bool,
    my_turn: bool,
    next_id: u64,
    /// Sent messages not yet acknowledged, by id: the command to answer,
    /// and when it was sent. Ids only grow, so the first is the oldest.
    unacked: BTreeMap<u64, (Ticket, Instant)>,
    next_ping: Instant,
    deadline: Instant,
}

impl Chat {
    /// When the oldest unacknowledged message was sent.
    fn oldest_unacked(&self) -> Option<Instant> {
        self.unacked.first_key_value().map(|(_, &(_, at))| at)
    }
}

/// One daemon's session.
pub struct Session {
    config: Config,
    token: Option<Token>,
    reg: Option<Registration>,
    phase: Phase,
    ops: HashMap<OpId, (Purpose, u64)>,
    /// Bumped by `quit` and shutdown: answers to requests sent before are
    /// stale and must not register the daemon again.
    epoch: u64,
    next_op: OpId,
    next_link: LinkId,
    /// When to try registering at start-up again.
    retry_register_at: Option<Instant>,
    /// `register` commands that came while a registration was on its way:
    /// run one after another, each once the one before is answered. Two
    /// at once would both be fresh REGISTERs after a reclaim, and the
    /// second would find the id taken by the first.
    deferred_registers: VecDeque<Ticket>,
    /// When an answered call that did not complete last sent us back to
    /// the pool, and when the next such return is due, if one is owed.
    rejoined_after_answer: Option<Instant>,
    rejoin_due: Option<Instant>,
    out: VecDeque<Action>,
}

impl Session {
    /// A session; `token` is the one saved by an earlier run, if any.
    pub fn new(config: Config, token: Option<Token>) -> Session {
        Session {
            config,
            token,
            reg: None,
            phase: Phase::None,
            ops: HashMap::new(),
            epoch: 0,
            next_op: 1,
            next_link: 1,
            retry_register_at: None,
            deferred_registers: VecDeque::new(),
            rejoined_after_answer: None,
            rejoin_due: None,
            out: VecDeque::new(),
        }
    }

    /// Says in the history that the daemon (re)started, in its first
    /// state: otherwise `tail` after a restart ends with whatever the last
    /// run was doing (`registered`, or `chatting` after a crash).
    pub fn started(&mut self, unconfirmed: usize) {
        self.record_state();
        if unconfirmed > 0 {
            let text = format!(
                "{unconfirmed} message(s) sent before chatd last stopped were never acknowledged: they may not have arrived, and are marked not delivered"
            );
            tracing::warn!("{text}");
            self.notice(&text);
        }
    }

    /// The phase shown: an unconfirmed call is not, so while one is
    /// answered it is the phase the daemon goes back to should the call
    /// not complete (never itself an answer).
    fn shown(&self) -> &Phase {
        match &self.phase {
            Phase::Answering(a) => &a.back,
            p => p,
        }
    }

    pub fn state(&self) -> State {
        match self.shown() {
            Phase::Chatting(_) => State::Chatting,
            Phase::Ready { .. } | Phase::Connecting { .. } => State::Ready,
            Phase::Waiting | Phase::Answering(_) => State::Waiting,
            Phase::None if self.reg.is_some() => State::Registered,
            Phase::None => State::Idle,
        }
    }

    pub fn status(&self) -> Status {
        let (peer, turn) = match self.shown() {
            Phase::Ready { peer, .. } | Phase::Connecting { peer, .. } => (Some(*peer), None),
            Phase::Chatting(c) => (
                Some(c.peer),
                c.turns
                    .then_some(if c.my_turn { Turn::Mine } else { Turn::Peers }),
            ),
            _ => (None, None),
        };
        Status {
            id: self.config.id,
            state: self.state(),
            peer,
            server: self.config.server.clone(),
            port: self.config.port,
            turn,
            addr: self.reg.as_ref().map(|r| r.addr),
        }
    }

    /// The client token of the registration the server knows us by, from
    /// which it made the keys of the callers it introduced to us.
    pub fn token(&self) -> Option<Token> {
        self.token
    }

    /// A new link id for an incoming connection (the driver names links so
    /// that events from a link the session dropped can be told apart).
    pub fn next_link(&mut self) -> LinkId {
        let l = self.next_link;
        self.next_link += 1;
        l
    }

    /// Registers now, and keeps trying while the server is unreachable
    /// (`chatd --register`).
    pub fn register_automatically(&mut self) {
        self.retry_register_at = None;
        // One already on its way (a `register` command) does it.
        if !self.registering() {
            self.server(Purpose::AutoRegister);
        }
    }

    /// Whether a registration is on its way to the server.
    fn registering(&self) -> bool {
        self.ops.values().any(|(p, _)| {
            matches!(
                p,
                Purpose::Register(_) | Purpose::AutoRegister | Purpose::Reclaim { .. }
            )
        })
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.out.pop_front()
    }

    /// Whether a background refresh is in flight (there is at most one).
    fn refreshing(&self) -> bool {
        self.ops
            .values()
            .any(|(p, _)| matches!(p, Purpose::Refresh))
    }

    /// Leaves whatever this daemon is doing with a peer: says Bye and ends
    /// a chat (failing what was not acknowledged with `undelivered`),
    /// abandons a connection being made (failing its command with
    /// `connecting`), and makes answers to requests already sent stale.
    fn leave(&mut self, notice: String, undelivered: String, connecting: Failure) {
        match self.phase {
            Phase::Chatting(ref c) => {
                let link = c.link;
                self.out.push_back(Action::Send {
                    link,
                    frame: PeerFrame::Bye,
                });
                self.end_chat(notice, undelivered, true);
            }
            Phase::Connecting {
                ref call, ticket, ..
            } => {
                if let Call::Dialing(link) = *call {
                    self.out.push_back(Action::Close { link });
                }
                self.reply(ticket, Err(connecting));
            }
            Phase::Answering(ref a) => {
                self.out.push_back(Action::Close { link: a.link });
                if let Some((Some(ticket), _)) = self.unanswer("the daemon is leaving") {
                    self.reply(ticket, Err(connecting));
                }
            }
            _ => {}
        }
        self.set_phase(Phase::None);
        self.epoch += 1;
        self.retry_register_at = None;
        // Asked before the quit, they must not register after it.
        for ticket in std::mem::take(&mut self.deferred_registers) {
            self.fail(
                ticket,
                FailureKind::State,
                "cancelled: the daemon quit (`chatctl quit`, or it is stopping) before this registration was sent",
            );
        }
    }

    /// When [`Session::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let refresh = self
            .reg
            .as_ref()
            .filter(|_| !self.refreshing())
            .map(|r| r.refresh_at);
        let link = match &self.phase {
            Phase::Chatting(c) => {
                let ack = c.oldest_unacked().map(|at| at + self.config.peer_timeout);
                Some(c.next_ping.min(c.deadline).min(ack.unwrap_or(c.deadline)))
            }
            Phase::Connecting {
                call: Call::Crossed { until, .. },
                ..
            } => Some(*until),
            Phase::Answering(a) => Some(a.until),
            _ => None,
        };
        [refresh, link, self.retry_register_at, self.rejoin_due]
            .into_iter()
            .flatten()
            .min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.retry_register_at.is_some_and(|t| now >= t) {
            self.register_automatically();
        }
        if self.rejoin_due.is_some_and(|t| now >= t) {
            self.rejoin_due = None;
            // Only if still waiting: any other phase has moved on (and a
            // call being answered owes its own if it fails).
            if matches!(self.phase, Phase::Waiting) && self.reg.is_some() {
                self.rejoined_after_answer = Some(now);
                self.server(Purpose::Rejoin);
            }
        }
        if let Phase::Answering(a) = &self.phase
            && now >= a.until
        {
            let link = a.link;
            self.out.push_back(Action::Close { link });
            let secs = ANSWER_WAIT.as_secs();
            self.answer_failed(&format!("no frame within {secs} s of the handshake"), now);
        }
        if let Phase::Connecting {
            call: Call::Crossed { until, ref reason },
            ticket,
            peer,
            addr,
            ..
        } = self.phase
            && now >= until
        {
            let secs = CROSSING_WAIT.as_secs();
            let reason = format!("{reason} (and no call from {peer} came within {secs} s)");
            self.call_failed(ticket, peer, addr, &reason, Some(409), false);
        }
        if let Some(reg) = &self.reg
            && !self.refreshing()
            && now >= reg.refresh_at
        {
            if now >= reg.lapses_at {
                self.reg = None;
                self.notice("registration lapsed: the server could not be reached to refresh it; run `chatctl register` once it is back");
                self.phase_lost_with_registration();
            } else {
                self.server(Purpose::Refresh);
            }
        }
        if let Phase::Chatting(c) = &mut self.phase {
            let ack_late = c
                .oldest_unacked()
                .is_some_and(|at| now >= at + self.config.peer_timeout);
            if ack_late {
                // Alive (it pings) but not storing what we send: as good
                // as gone, and the senders must be told.
                let secs = self.config.peer_timeout.as_secs();
                let peer = c.peer;
                self.end_chat(
                    format!("left {peer}: no acknowledgement for {secs} s"),
                    format!("not delivered: {peer} did not acknowledge within {secs} s"),
                    true,
                );
            } else if now >= c.deadline {
                let secs = self.config.peer_timeout.as_secs();
                let peer = c.peer;
                self.end_chat(
                    format!("lost {peer}: nothing heard for {secs} s"),
                    format!("not delivered: lost {peer} (nothing heard for {secs} s)"),
                    true,
                );
            } else if now >= c.next_ping {
                c.next_ping = now + self.config.ping_every;
                let link = c.link;
                self.out.push_back(Action::Send {
                    link,
                    frame: PeerFrame::Ping,
                });
            }
        }
    }

    pub fn handle(&mut self, input: Input, now: Instant) {
        match input {
            Input::Command { ticket, command } => self.command(ticket, command, now),
            Input::ServerReply { op, result } => self.server_reply(op, result, now),
            Input::LinkUp { link, peer } => self.link_up(link, peer, now),
            Input::LinkFailed {
                link,
                refused,
                reason,
                nobody_listens,
            } => {
                if let Phase::Connecting {
                    call: Call::Dialing(l),
                    ticket,
                    peer,
                    addr,
                    key,
                } = self.phase
                    && l == link
                {
                    if refused == Some(409) && self.their_call_wins(&peer) {
                        self.set_phase(Phase::Connecting {
                            peer,
                            addr,
                            key,
                            call: Call::Crossed {
                                until: now + CROSSING_WAIT,
                                reason,
                            },
                            ticket,
                        });
                    } else {
                        self.call_failed(ticket, peer, addr, &reason, refused, nobody_listens);
                    }
                }
            }
            Input::Incoming { link, hello } => self.incoming(link, hello, now),
            Input::Frame { link, frame } => self.frame(link, frame, now),
            Input::LinkClosed { link, reason } => {
                if let Phase::Answering(a) = &self.phase
                    && a.link == link
                {
                    self.answer_failed(&reason, now);
                }
                if let Phase::Chatting(c) = &self.phase
                    && c.link == link
                {
                    let peer = c.peer;
                    self.end_chat(
                        format!("lost {peer}: {reason}"),
                        format!("not delivered: lost {peer} ({reason})"),
                        false,
                    );
                }
            }
            Input::Shutdown => {
                self.leave(
                    "left the chat: chatd is stopping".into(),
                    "not delivered: chatd is stopping".into(),
                    Failure::new(FailureKind::ShuttingDown, "chatd is stopping"),
                );
                // Only a registration this run made is taken back: a token
                // kept from an earlier run most likely names nothing now,
                // and stopping should not wait on the server to say so.
                if self.reg.is_some() {
                    self.server(Purpose::Quit(None));
                    self.reg = None;
                }
            }
        }
    }

    fn command(&mut self, ticket: Ticket, command: Command, now: Instant) {
        match command {
            Command::Register if self.registering() => self.deferred_registers.push_back(ticket),
            Command::Register => self.server(Purpose::Register(ticket)),
            Command::Bridge { peer } => {
                if let Err(f) = self.can_bridge(peer) {
                    return self.reply(ticket, Err(f));
                }
                self.server(Purpose::Bridge {
                    ticket,
                    peer,
                    retried: false,
                });
            }
            Command::Chat => match self.phase.clone() {
                Phase::Ready { peer, addr, key } => {
                    let link = self.next_link();
                    self.set_phase(Phase::Connecting {
                        peer,
                        addr,
                        key,
                        call: Call::Dialing(link),
                        ticket,
                    });
                    let hello = Hello {
                        id: self.config.id,
                        turns: self.config.turns,
                    };
                    self.out.push_back(Action::Connect {
                        link,
                        addr,
                        hello,
                        peer,
                        key,
                    });
                }
                Phase::Waiting => self.fail(
                    ticket,
                    FailureKind::State,
                    "waiting for a peer to connect: the peer that bridges next runs `chatctl chat`",
                ),
                Phase::Connecting { peer, .. } => self.fail(
                    ticket,
                    FailureKind::State,
                    format!("already connecting to {peer}"),
                ),
                // Nothing is shown of a call not yet confirmed: the command
                // waits on it, and gets what `chat` would have got had the
                // call not come, should it not complete.
                Phase::Answering(mut a) if a.ticket.is_none() => {
                    a.ticket = Some(ticket);
                    self.phase = Phase::Answering(a);
                }
                Phase::Answering(a) => self.fail(
                    ticket,
                    FailureKind::State,
                    format!("already connecting to {}", a.peer),
                ),
                Phase::Chatting(c) => self.fail(
                    ticket,
                    FailureKind::State,
                    format!("already chatting with {}", c.peer),
                ),
                Phase::None if self.reg.is_none() => self.fail(
                    ticket,
                    FailureKind::State,
                    "not registered: run `chatctl register`, then `chatctl bridge`",
                ),
                Phase::None => self.fail(
                    ticket,
                    FailureKind::State,
                    "no peer yet: run `chatctl bridge` first",
                ),
            },
            Command::Send { text } => self.send(ticket, text, now),
            Command::Quit => {
                let peer = match &self.phase {
                    Phase::Chatting(c) => c.peer.to_string(),
                    _ => String::new(),
                };
                self.leave(
                    format!("left the chat with {peer}"),
                    format!("not delivered: you left the chat with {peer}"),
                    Failure::new(FailureKind::State, "cancelled by `chatctl quit`"),
                );
                // A quit asked for also takes back a registration an
                // earlier run left (the token is kept).
                if self.reg.is_some() || self.token.is_some() {
                    self.reg = None;
                    self.server(Purpose::Quit(Some(ticket)));
                } else {
                    self.reply(ticket, Ok(Reply::Quit));
                }
                self.record_state();
            }
        }
    }

    fn can_bridge(&self, peer: Option<ClientId>) -> Result<(), Failure> {
        if self.reg.is_none() {
            return Err(Failure::new(
                FailureKind::State,
                "not registered: run `chatctl register` first",
            ));
        }
        if peer == Some(self.config.id) {
            return Err(Failure::new(
                FailureKind::Invalid,
                "that is your own id: name another peer",
            ));
        }
        match &self.phase {
            Phase::Chatting(c) => Err(Failure::new(
                FailureKind::State,
                format!("already chatting with {}: run `chatctl quit` first", c.peer),
            )),
            Phase::Connecting { peer, .. } => Err(Failure::new(
                FailureKind::State,
                format!("connecting to {peer}; wait for `chatctl chat` to finish"),
            )),
            _ => Ok(()),
        }
    }

    fn send(&mut self, ticket: Ticket, text: String, now: Instant) {
        let me = self.config.id;
        let Phase::Chatting(c) = &mut self.phase else {
            let why = match self.phase {
                Phase::Waiting | Phase::Answering(_) => {
                    "not chatting yet: waiting for a peer to connect"
                }
                Phase::Ready { .. } | Phase::Connecting { .. } => {
                    "not chatting yet: run `chatctl chat` to connect to your peer"
                }
                _ if self.reg.is_none() => {
                    "not chatting: run `chatctl register`, `chatctl bridge` and `chatctl chat` first"
                }
                _ => "not chatting: run `chatctl bridge` and `chatctl chat` first",
            };
            return self.fail(ticket, FailureKind::State, why);
        };
        if text.is_empty() {
            return self.fail(
                ticket,
                FailureKind::Invalid,
                "nothing to send: the message is empty",
            );
        }
        if text.len() > MAX_TEXT {
            return self.fail(
                ticket,
                FailureKind::Invalid,
                format!(
                    "message is {} bytes; at most {MAX_TEXT} are allowed",
                    text.len()
                ),
            );
        }
        if c.turns && !c.my_turn {
            let peer = c.peer;
            return self.fail(
                ticket,
                FailureKind::Turn,
                format!("not your turn: wait for {peer}'s message (turn mode)"),
            );
        }
        let id = c.next_id;
        c.next_id += 1;
        c.unacked.insert(id, (ticket, now));
        if c.turns {
            c.my_turn = false;
        }
        let (link, peer) = (c.link, c.peer);
        self.out.push_back(Action::Outgoing {
            link,
            id,
            record: RecordKind::Message {
                from: me,
                to: peer,
                text: text.clone(),
                outgoing: true,
                delivered: None,
            },
        });
        let sent_ms = 0; // filled in by the driver, which owns the wall clock
        self.out.push_back(Action::Send {
            link,
            frame: PeerFrame::Message { id, sent_ms, text },
        });
    }

    /// When this daemon and `peer` call each other at once, which call
    /// both keep: the lower id's. Both ends must decide alike.
    fn their_call_wins(&self, peer: &ClientId) -> bool {
        peer.as_str() < self.config.id.as_str()
    }

    /// The call of `chat` command `ticket` to `peer` failed for `reason`.
    ///
    /// When nothing listens at the peer's address, its daemon is gone but
    /// the server still holds it waiting, and would hand it out again to
    /// every BRIDGE until its registration lapses. A CHAT takes it out of
    /// the pool (and this daemon with it, until its next BRIDGE, which
    /// puts it back): what the server is told is true, a chat with it was
    /// begun.
    fn call_failed(
        &mut self,
        ticket: Ticket,
        peer: ClientId,
        addr: SocketAddr,
        reason: &str,
        refused: Option<u16>,
        nobody_listens: bool,
    ) {
        self.set_phase(Phase::None);
        // A peer that is gone, or that says it is not waiting (a daemon
        // restarted, whose earlier run's registration still waits on the
        // server), is taken out of the pool: otherwise the next `bridge`
        // hands it out again, until its registration lapses.
        let dropped = match (nobody_listens, refused) {
            _ if self.reg.is_none() => "",
            (true, _) => " (its chatd is gone: the server will not hand it out again)",
            (_, Some(403)) => {
                " (it is not waiting: the server will not hand it out again until it bridges)"
            }
            _ => "",
        };
        if !dropped.is_empty() {
            self.server(Purpose::Chat {
                peer,
                retried: false,
            });
        }
        let next = match refused {
            Some(401) => "run `chatctl bridge` again for a fresh introduction",
            _ => "run `chatctl bridge` for another peer",
        };
        let message = format!("cannot chat with {peer} at {addr}: {reason}{dropped}; {next}");
        // Told to every shell, not only to the one that ran `chat`.
        if ticket != OWN {
            self.notice(&message);
        }
        self.fail(ticket, FailureKind::Peer, message);
    }

    fn link_up(&mut self, link: LinkId, peer: ClientId, now: Instant) {
        let Phase::Connecting {
            call: Call::Dialing(l),
            ticket,
            peer: expected,
            addr,
            ..
        } = self.phase
        else {
            // A link the session gave up on: close it.
            return self.out.push_back(Action::Close { link });
        };
        if l != link {
            return self.out.push_back(Action::Close { link });
        }
        if peer != expected {
            self.out.push_back(Action::Close { link });
            self.set_phase(Phase::None);
            return self.fail(
                ticket,
                FailureKind::Peer,
                format!(
                    "the daemon at {addr} is {peer}, not {expected}: run `chatctl bridge` again"
                ),
            );
        }
        self.start_chat(peer, link, true, self.config.turns, now);
        // At once: the callee waits for a first frame before it believes
        // the call (see `Answering`).
        self.out.push_back(Action::Send {
            link,
            frame: PeerFrame::Ping,
        });
        self.reply(ticket, Ok(Reply::Chatting { peer }));
        self.server(Purpose::Chat {
            peer,
            retried: false,
        });
    }

    fn incoming(&mut self, link: LinkId, hello: Hello, now: Instant) {
        let me = self.config.id;
        let refuse = |status: u16, reason: String| Action::Refuse {
            link,
            status,
            reason,
        };
        if hello.id == me {
            return self
                .out
                .push_back(refuse(400, format!("{me} cannot chat with itself")));
        }
        // Another call while one is unconfirmed: the pending one goes, so
        // that a replayed handshake cannot hold the door, and this one is
        // decided as the pending one was. A `chat` that waited on the
        // pending call waits on this one if it is from the same peer, and
        // goes on as if asked now otherwise.
        let mut waiting_chat = None;
        if let Phase::Answering(a) = &self.phase {
            let (pending, from) = (a.link, a.peer);
            self.out.push_back(Action::Close { link: pending });
            if let Some((Some(ticket), _)) =
                self.unanswer("another call came before its first frame")
            {
                waiting_chat = Some((ticket, from));
            }
        }
        let answering = |ticket: Option<Ticket>, back| {
            Phase::Answering(Box::new(Answering {
                peer: hello.id,
                link,
                turns: hello.turns,
                until: now + ANSWER_WAIT,
                ticket,
                back,
                bridged: Vec::new(),
            }))
        };
        match &self.phase {
            // Both ran `chat` at once, each calling the other. One link
            // must win, the same one at both ends: the call of the lower
            // id. The higher takes it and drops its own (or has had its
            // own refused already); the lower refuses this one and keeps
            // its own, which the other end takes.
            Phase::Connecting {
                peer,
                addr,
                key,
                call,
                ticket,
            } if *peer == hello.id => {
                let (own, ticket) = (call.clone(), *ticket);
                if self.their_call_wins(&hello.id) {
                    if let Call::Dialing(own) = own {
                        self.out.push_back(Action::Close { link: own });
                    }
                    self.out.push_back(Action::Accept { link });
                    let back = Phase::Ready {
                        peer: *peer,
                        addr: *addr,
                        key: *key,
                    };
                    self.set_phase(answering(Some(ticket), back));
                } else {
                    self.out.push_back(refuse(
                        409,
                        format!("{me} is calling you at the same time; its call goes through"),
                    ));
                }
            }
            // 503, not 409: a 409 says "I am calling you", so that the
            // caller waits for that call (see `Call::Crossed`) only then.
            Phase::Chatting(_) | Phase::Connecting { .. } | Phase::Answering(_) => {
                self.out
                    .push_back(refuse(503, format!("{me} is busy in another chat")));
            }
            Phase::Waiting => {
                self.out.push_back(Action::Accept { link });
                self.set_phase(answering(None, Phase::Waiting));
            }
            Phase::Ready { peer, .. } if *peer == hello.id => {
                // Both were handed each other; whoever connects first wins.
                self.out.push_back(Action::Accept { link });
                let back = self.phase.clone();
                self.set_phase(answering(None, back));
            }
            // Handed another peer: about to call it, not waiting for anyone.
            Phase::Ready { .. } => self.out.push_back(refuse(
                403,
                format!("{me} is not waiting for you: it was handed another peer to chat with"),
            )),
            _ => self.out.push_back(refuse(
                403,
                format!("{me} is not waiting for a chat: it must run `chatctl bridge` first"),
            )),
        }
        // A `chat` that waited on the pending call waits on the newer one,
        // if that is the same peer's and was taken; otherwise it goes on
        // as if asked now.
        if let Some((ticket, from)) = waiting_chat {
            match &mut self.phase {
                Phase::Answering(a) if a.link == link && a.peer == from && a.ticket.is_none() => {
                    a.ticket = Some(ticket);
                }
                _ => self.command(ticket, Command::Chat, now),
            }
        }
    }

    fn start_chat(
        &mut self,
        peer: ClientId,
        link: LinkId,
        initiator: bool,
        turns: bool,
        now: Instant,
    ) {
        self.set_phase(Phase::Chatting(Chat {
            peer,
            link,
            turns,
            // The initiator writes first.
            my_turn: initiator,
            next_id: 1,
            unacked: BTreeMap::new(),
            next_ping: now + self.config.ping_every,
            deadline: now + self.config.peer_timeout,
        }));
    }

    /// The caller's first frame confirms an answered call: the chat
    /// begins.
    fn confirmed(&mut self, link: LinkId, now: Instant) {
        let Phase::Answering(a) = &self.phase else {
            return;
        };
        if a.link != link {
            return;
        }
        let (peer, turns, ticket) = (a.peer, a.turns, a.ticket);
        let bridged = a.bridged.iter().map(|(t, _)| *t).collect::<Vec<_>>();
        self.start_chat(peer, link, false, turns, now);
        if let Some(ticket) = ticket {
            self.reply(ticket, Ok(Reply::Chatting { peer }));
        }
        for ticket in bridged {
            self.fail(
                ticket,
                FailureKind::State,
                format!(
                    "a chat with {peer} began while the bridge was on its way; the bridge is moot"
                ),
            );
        }
    }

    /// Leaves an answered call: back to the phase the daemon was in, as
    /// if no call had come. Returns the `chat` command that was waiting
    /// on the call, if any, and whether the daemon is back to waiting.
    fn unanswer(&mut self, reason: &str) -> Option<(Option<Ticket>, bool)> {
        let Phase::Answering(a) = std::mem::replace(&mut self.phase, Phase::None) else {
            return None;
        };
        let Answering {
            peer,
            ticket,
            back,
            bridged,
            ..
        } = *a;
        tracing::info!("the call from {peer} did not complete: {reason}");
        let waiting = matches!(back, Phase::Waiting);
        // Straight back: the state shown never left `back`, which the
        // bridges held meanwhile have set.
        self.phase = back;
        for (ticket, reply) in bridged {
            self.reply(ticket, Ok(reply));
        }
        Some((ticket, waiting))
    }

    /// The answered call did not complete. Back in the pool: a real
    /// caller told the server we chat when its link came up. (At most
    /// once per `REJOIN_AFTER_ANSWER`, so that replayed handshakes cannot
    /// make a stream of requests of it.) A `chat` that waited on the call
    /// goes on as if asked now: our own call if we still hold the peer,
    /// its usual answer otherwise.
    fn answer_failed(&mut self, reason: &str, now: Instant) {
        let Some((ticket, waiting)) = self.unanswer(reason) else {
            return;
        };
        if waiting && self.reg.is_some() {
            // A moment later, so that the caller's CHAT, sent as its link
            // came up, reaches the server first; and no sooner than the
            // limit allows.
            let due = self
                .rejoined_after_answer
                .map_or(now, |t| t + REJOIN_AFTER_ANSWER)
                .max(now + REJOIN_DELAY);
            self.rejoin_due = Some(self.rejoin_due.map_or(due, |d| d.min(due)));
        }
        if let Some(ticket) = ticket {
            self.command(ticket, Command::Chat, now);
        }
    }

    fn frame(&mut self, link: LinkId, frame: PeerFrame, now: Instant) {
        self.confirmed(link, now);
        let me = self.config.id;
        let timeout = self.config.peer_timeout;
        let Phase::Chatting(c) = &mut self.phase else {
            return;
        };
        if c.link != link {
            return;
        }
        c.deadline = now + timeout;
        match frame {
            PeerFrame::Message { text, .. } if text.len() > MAX_TEXT => {
                let peer = c.peer;
                self.end_chat(
                    format!("left {peer}: it sent a message over {MAX_TEXT} bytes"),
                    format!("not delivered: {peer} broke the protocol"),
                    true,
                );
            }
            PeerFrame::Message { id, text, .. } => {
                c.my_turn = true;
                let peer = c.peer;
                self.out.push_back(Action::Record(RecordKind::Message {
                    from: peer,
                    to: me,
                    text,
                    outgoing: false,
                    delivered: Some(true),
                }));
                self.out.push_back(Action::Send {
                    link,
                    frame: PeerFrame::Ack { id },
                });
            }
            PeerFrame::Ack { id } => {
                if let Some((ticket, sent)) = c.unacked.remove(&id) {
                    let round_trip_us = now.saturating_duration_since(sent).as_micros() as u64;
                    self.out.push_back(Action::Delivery {
                        link,
                        id,
                        delivered: true,
                    });
                    self.reply(ticket, Ok(Reply::Sent { id, round_trip_us }));
                }
            }
            PeerFrame::Ping => {}
            PeerFrame::Bye => {
                let peer = c.peer;
                self.end_chat(
                    format!("{peer} left the chat"),
                    format!("not delivered: {peer} left the chat"),
                    true,
                );
            }
        }
    }

    /// Ends the chat: fails what was not acknowledged, records why, and
    /// goes back to a state from which the daemon can bridge again.
    fn end_chat(&mut self, notice: String, undelivered: String, close: bool) {
        let Phase::Chatting(c) = std::mem::replace(&mut self.phase, Phase::None) else {
            return;
        };
        if close {
            self.out.push_back(Action::Close { link: c.link });
        }
        for (id, (ticket, _)) in c.unacked {
            self.out.push_back(Action::Delivery {
                link: c.link,
                id,
                delivered: false,
            });
            self.fail(ticket, FailureKind::Peer, undelivered.clone());
        }
        self.notice(&notice);
        self.record_state();
    }

    fn server_reply(&mut self, op: OpId, result: Result<Response, String>, now: Instant) {
        let Some((purpose, epoch)) = self.ops.remove(&op) else {
            return;
        };
        if epoch != self.epoch && !matches!(purpose, Purpose::Quit(_)) {
            // Sent before a quit: its answer must not undo the quit.
            return self.fail_purpose(
                purpose,
                FailureKind::State,
                "cancelled: the daemon quit (`chatctl quit`, or it is stopping) before the server answered".into(),
            );
        }
        self.answered(purpose, result, now);
        if !self.registering()
            && let Some(ticket) = self.deferred_registers.pop_front()
        {
            self.server(Purpose::Register(ticket));
        }
    }

    fn answered(&mut self, purpose: Purpose, result: Result<Response, String>, now: Instant) {
        let server = self.config.server.clone();
        let unreachable = |why: &str| {
            format!(
                "cannot reach the server {server}: {why}; is chat-server running there? (chatd's --server, or `server =` in its config)"
            )
        };
        let unexpected = |other: &Response| {
            let answer = other.method().map_or("an error", |m| m.ack());
            format!(
                "the server {server} answered with {answer}, which does not fit the request; is it a chat-server of the same version as this chatd?"
            )
        };
        match (purpose, result) {
            (Purpose::Reclaim { then }, Ok(Response::QuitAck)) => {
                self.token = None;
                self.server(*then);
            }
            (Purpose::Reclaim { then }, Ok(Response::Error(f))) if forgot_us(&f) => {
                // Nothing left to take back.
                self.token = None;
                self.server(*then);
            }
            // Unreachable, or refused for now: the registration fails as
            // its own REGISTER would have (retried, or told), the token
            // kept for the next try.
            (Purpose::Reclaim { then }, r @ (Ok(Response::Error(_)) | Err(_))) => {
                self.answered(*then, r, now)
            }
            (
                Purpose::AutoRegister,
                Ok(Response::RegAck {
                    addr,
                    token,
                    expires,
                    ..
                }),
            ) => {
                self.registered(addr, token, expires, now);
            }
            (Purpose::AutoRegister, Ok(Response::Error(f))) if transient(&f) => {
                self.register_later(now, self.retry_wait(&f), &server_refused(&f));
            }
            (Purpose::AutoRegister, Ok(Response::Error(f))) => {
                // Not retried: said where a service's operator looks too.
                let why = format!("cannot register at start-up: {}", server_refused(&f));
                tracing::warn!("{why}");
                self.notice(&why);
            }
            (Purpose::AutoRegister, Err(why)) => {
                self.register_later(now, self.config.retry_after, &unreachable(&why));
            }
            (
                Purpose::Register(ticket),
                Ok(Response::RegAck {
                    addr,
                    token,
                    expires,
                    ..
                }),
            ) => {
                self.registered(addr, token, expires, now);
                self.reply(ticket, Ok(Reply::Registered { addr, expires }));
            }
            (
                Purpose::Refresh,
                Ok(Response::RegAck {
                    addr,
                    token,
                    expires,
                    ..
                }),
            ) => {
                self.registered(addr, token, expires, now);
                if matches!(self.phase, Phase::Waiting) {
                    // Still waiting: say so again. A restarted server lost
                    // its pool, and a server may have been told (by a
                    // CHAT from anyone) that we chat.
                    self.server(Purpose::Rejoin);
                }
            }
            (
                Purpose::Reregister { then },
                Ok(Response::RegAck {
                    addr,
                    token,
                    expires,
                    ..
                }),
            ) => {
                self.registered(addr, token, expires, now);
                self.server(*then);
            }
            (Purpose::Register(ticket), Ok(Response::Error(f))) => {
                if f.status == ErrorStatus::RegNack {
                    self.reg = None;
                }
                self.fail(ticket, FailureKind::Server, server_refused(&f));
            }
            (Purpose::Refresh, Ok(Response::Error(f))) if transient(&f) => {
                // Busy, or a proxy that cannot reach the server (a restart
                // behind nginx is a 502): as good as unreachable, so the
                // registration stands until its lifetime runs out.
                self.refresh_later(now, self.retry_wait(&f), &server_refused(&f));
            }
            (Purpose::Refresh, Ok(Response::Error(f))) => {
                self.reg = None;
                self.notice(&format!("registration lost: {}", server_refused(&f)));
                self.phase_lost_with_registration();
            }
            (Purpose::Reregister { then }, Ok(Response::Error(f)))
                if transient(&f) && self.reg.is_some() =>
            {
                // The server forgot us and cannot take us back right now:
                // the command fails, the registration is retried as a
                // refresh would be.
                let next = self.retry_refresh(now, self.retry_wait(&f));
                let message = format!(
                    "the server forgot this daemon and cannot register it again right now: {}; {next}",
                    server_refused(&f)
                );
                self.fail_purpose(*then, FailureKind::Server, message);
            }
            (Purpose::Reregister { then }, Ok(Response::Error(f))) => {
                self.reg = None;
                let message = format!(
                    "the server forgot this daemon and refused to register it again: {}; run `chatctl register`",
                    server_refused(&f)
                );
                self.phase_lost_with_registration();
                self.fail_purpose(*then, FailureKind::Server, message);
            }
            (Purpose::Refresh, Err(why)) => {
                self.refresh_later(now, self.config.retry_after, &unreachable(&why));
            }
            (Purpose::Bridge { ticket, .. }, Ok(Response::BridgeAck { .. }))
                if matches!(self.phase, Phase::Chatting(_) | Phase::Connecting { .. }) =>
            {
                // A chat began while the request was in flight: it wins.
                self.fail(
                    ticket,
                    FailureKind::State,
                    "a chat started while the bridge was on its way; the bridge is moot",
                );
            }
            (
                Purpose::Bridge {
                    ticket,
                    peer,
                    retried,
                },
                Ok(resp),
            ) => match resp {
                Response::BridgeAck {
                    peer: Some((p, addr, key)),
                } => {
                    self.set_resting(
                        Phase::Ready { peer: p, addr, key },
                        ticket,
                        Reply::Bridged {
                            peer: Some((p, addr)),
                        },
                    );
                }
                Response::BridgeAck { peer: None } => {
                    self.set_resting(Phase::Waiting, ticket, Reply::Bridged { peer: None });
                }
                Response::Error(f) if forgot_us(&f) && !retried => {
                    self.server(Purpose::Reregister {
                        then: Box::new(Purpose::Bridge {
                            ticket,
                            peer,
                            retried: true,
                        }),
                    });
                }
                Response::Error(f) => {
                    self.fail(ticket, FailureKind::Server, bridge_refused(&f, peer));
                }
                other => self.fail(ticket, FailureKind::Server, unexpected(&other)),
            },
            (
                Purpose::Rejoin,
                Ok(Response::BridgeAck {
                    peer: Some((p, addr, key)),
                }),
            ) => {
                if matches!(self.phase, Phase::Waiting) {
                    // The server had forgotten us (a restart, a lapse
                    // while this machine slept, a call that died as it
                    // began), and the peer it hands out now bridged
                    // meanwhile: it waits to be
                    // called, as we do. Whoever is handed a peer calls it,
                    // so this daemon calls, as its user would have been
                    // called: otherwise both wait for ever.
                    self.set_phase(Phase::Ready { peer: p, addr, key });
                    self.notice(&format!(
                        "on rejoining the pool, the server handed out {p}, which waits too: calling it"
                    ));
                    self.command(OWN, Command::Chat, now);
                } else if let Phase::Answering(a) = &mut self.phase
                    && matches!(a.back, Phase::Waiting)
                {
                    // The server no longer counts us as waiting: should
                    // the call being answered not complete, we call the
                    // peer it handed out, as above.
                    a.back = Phase::Ready { peer: p, addr, key };
                    a.ticket.get_or_insert(OWN);
                }
            }
            (Purpose::Rejoin, _) => {}
            (Purpose::Chat { peer, retried }, Ok(Response::Error(f)))
                if forgot_us(&f) && !retried =>
            {
                self.server(Purpose::Reregister {
                    then: Box::new(Purpose::Chat {
                        peer,
                        retried: true,
                    }),
                });
            }
            (Purpose::Chat { peer, .. }, Ok(Response::Error(f))) => {
                tracing::warn!(
                    "the server did not record the chat with {peer}: {}",
                    server_refused(&f)
                );
            }
            (Purpose::Chat { .. }, _) => {}
            (Purpose::Quit(ticket), Ok(Response::QuitAck)) => {
                self.reg = None;
                if let Some(t) = ticket {
                    self.reply(t, Ok(Reply::Quit));
                }
            }
            (Purpose::Quit(ticket), Ok(Response::Error(f))) => {
                // Unknown to the server (404) or not ours any more (401):
                // either way we are not registered there.
                self.reg = None;
                if let Some(t) = ticket {
                    if forgot_us(&f) {
                        self.reply(t, Ok(Reply::Quit));
                    } else {
                        let why = format!("refused the QUIT: {}", server_refused(&f));
                        self.fail(t, FailureKind::Server, quit_not_taken(&why));
                    }
                }
            }
            (Purpose::Quit(Some(t)), Err(why)) => {
                // It may have arrived all the same (a server that was
                // stopped, then resumed, takes it late).
                let why = format!("did not answer the QUIT: {}", unreachable(&why));
                self.fail(t, FailureKind::Server, quit_not_taken(&why));
            }
            (purpose, Err(why)) => {
                self.fail_purpose(purpose, FailureKind::Server, unreachable(&why))
            }
            (purpose, Ok(other)) => {
                self.fail_purpose(purpose, FailureKind::Server, unexpected(&other))
            }
        }
    }

    fn fail_purpose(&mut self, purpose: Purpose, kind: FailureKind, message: String) {
        match purpose {
            Purpose::Register(t) | Purpose::Bridge { ticket: t, .. } | Purpose::Quit(Some(t)) => {
                self.fail(t, kind, message)
            }
            Purpose::Reregister { then } | Purpose::Reclaim { then } => {
                self.fail_purpose(*then, kind, message)
            }
            // Nobody waits on a CHAT record: the log is where it is told.
            Purpose::Chat { peer, .. } => {
                tracing::warn!("the server did not record the chat with {peer}: {message}");
            }
            Purpose::Refresh | Purpose::Rejoin | Purpose::Quit(None) | Purpose::AutoRegister => {}
        }
    }

    fn registered(&mut self, addr: SocketAddr, token: Token, expires: u32, now: Instant) {
        let was = self.state();
        if self.token != Some(token) {
            self.token = Some(token);
            self.out.push_back(Action::SaveToken(token));
        }
        let life = Duration::from_secs(u64::from(expires.max(1)));
        self.reg = Some(Registration {
            addr,
            // Refresh at half-life, so one lost refresh still leaves time
            // for retries before the server lets the registration lapse.
            refresh_at: now + life / 2,
            lapses_at: now + life,
        });
        if was != self.state() {
            self.record_state();
        }
    }

    /// How long to wait before retrying after a transient refusal: ours,
    /// or the server's `Retry-After` if longer (capped).
    fn retry_wait(&self, f: &chat_proto::rendezvous::Failure) -> Duration {
        let theirs = Duration::from_secs(f.retry_after.map_or(0, u64::from)).min(MAX_RETRY_AFTER);
        self.config.retry_after.max(theirs)
    }

    /// Tries `chatd --register`'s registration again after `wait`, having
    /// failed for `why`.
    fn register_later(&mut self, now: Instant, wait: Duration, why: &str) {
        self.retry_register_at = Some(now + wait);
        let secs = wait.as_secs();
        tracing::warn!("cannot register at start-up: {why}; retrying in {secs} s");
    }

    /// A refresh that did not go through (`why`): tried again after `wait`.
    fn refresh_later(&mut self, now: Instant, wait: Duration, why: &str) {
        let next = self.retry_refresh(now, wait);
        tracing::warn!("cannot refresh the registration: {why}; {next}");
    }

    /// Schedules the next refresh `wait` from `now`. A wait that would
    /// reach the lapse is cut short to one last try a second before it;
    /// with no time left for that, the lapse itself is scheduled, so that
    /// it is told when it happens. Returns what happens next, in words.
    fn retry_refresh(&mut self, now: Instant, wait: Duration) -> String {
        let Some(r) = &mut self.reg else {
            return "run `chatctl register` once the server is back".into();
        };
        let secs = |d: Duration| d.as_millis().div_ceil(1000);
        let last_try = r.lapses_at.checked_sub(LAST_TRY_BEFORE_LAPSE);
        if now + wait < r.lapses_at {
            r.refresh_at = now + wait;
            format!("chatd retries in {} s", secs(wait))
        } else if let Some(last) = last_try.filter(|&t| t > now) {
            r.refresh_at = last;
            format!(
                "chatd tries once more in {} s, the last time before the registration lapses",
                secs(last - now)
            )
        } else {
            r.refresh_at = r.lapses_at;
            format!(
                "the registration lapses in {} s; run `chatctl register` once the server is back",
                secs(r.lapses_at.saturating_duration_since(now))
            )
        }
    }

    /// Without a registration there is no waiting and no handed-out peer.
    fn phase_lost_with_registration(&mut self) {
        let phase = match &mut self.phase {
            Phase::Answering(a) => &mut a.back,
            p => p,
        };
        if matches!(phase, Phase::Waiting | Phase::Ready { .. }) {
            *phase = Phase::None;
        }
        self.record_state();
    }

    fn server(&mut self, purpose: Purpose) {
        let id = self.config.id;
        let purpose = match (purpose, self.token) {
            (p @ (Purpose::Register(_) | Purpose::AutoRegister), Some(_)) if self.reg.is_none() => {
                Purpose::Reclaim { then: Box::new(p) }
            }
            (p, _) => p,
        };
        let request = match &purpose {
            Purpose::Register(_)
            | Purpose::AutoRegister
            | Purpose::Refresh
            | Purpose::Reregister { .. } => Request::Register {
                id,
                port: self.config.port,
                token: self.token,
            },
            Purpose::Bridge { peer, .. } => match self.token {
                Some(token) => Request::Bridge {
                    id,
                    token,
                    peer: *peer,
                },
                None => {
                    return self.fail_purpose(
                        purpose,
                        FailureKind::State,
                        "not registered: run `chatctl register`".into(),
                    );
                }
            },
            Purpose::Rejoin => match self.token {
                Some(token) => Request::Bridge {
                    id,
                    token,
                    peer: None,
                },
                None => return,
            },
            Purpose::Chat { peer, .. } => match self.token {
                Some(token) => Request::Chat {
                    id,
                    token,
                    peer: *peer,
                },
                None => return,
            },
            Purpose::Reclaim { .. } => match self.token {
                Some(token) => Request::Quit { id, token },
                None => return,
            },
            Purpose::Quit(ticket) => match self.token {
                Some(token) => Request::Quit { id, token },
                None => {
                    if let Some(t) = ticket {
                        self.reply(*t, Ok(Reply::Quit));
                    }
                    return;
                }
            },
        };
        let op = self.next_op;
        self.next_op += 1;
        self.ops.insert(op, (purpose, self.epoch));
        self.out.push_back(Action::Server { op, request });
    }

    /// A bridge's outcome: `phase`, and `reply` to its command. While a
    /// call is being answered, both wait on it: they stand if the call
    /// does not complete, and the bridge is moot if it does.
    fn set_resting(&mut self, phase: Phase, ticket: Ticket, reply: Reply) {
        match &mut self.phase {
            Phase::Answering(a) => {
                a.back = phase;
                a.bridged.push((ticket, reply));
            }
            _ => {
                self.set_phase(phase);
                self.reply(ticket, Ok(reply));
            }
        }
    }

    fn set_phase(&mut self, phase: Phase) {
        let before = self.state();
        self.phase = phase;
        if before != self.state() || matches!(self.phase, Phase::Chatting(_) | Phase::Ready { .. })
        {
            self.record_state();
        }
    }

    fn record_state(&mut self) {
        let status = self.status();
        let record = RecordKind::State {
            state: status.state,
            peer: status.peer,
        };
        // Identical consecutive state records say nothing new.
        let duplicate = self
            .out
            .iter()
            .rev()
            .find_map(|a| match a {
                Action::Record(r @ RecordKind::State { .. }) => Some(r == &record),
                _ => None,
            })
            .unwrap_or(false);
        if !duplicate {
            self.out.push_back(Action::Record(record));
        }
    }

    fn notice(&mut self, text: &str) {
        self.out.push_back(Action::Record(RecordKind::Notice {
            text: text.to_owned(),
        }));
    }

    fn reply(&mut self, ticket: Ticket, result: Result<Reply, Failure>) {
        // Nobody waits for the daemon's own call: its failure is told to
        // whoever follows the daemon, as the call itself was, and says
        // what to do next (`call_failed`).
        if let (OWN, Err(f)) = (ticket, &result) {
            self.notice(&format!(
                "the call chatd made by itself failed: {}",
                f.message
            ));
        }
        self.out.push_back(Action::Reply { ticket, result });
    }

    fn fail(&mut self, ticket: Ticket, kind: FailureKind, message: impl Into<String>) {
        self.reply(ticket, Err(Failure::new(kind, message)));
    }
}

/// A quit the server did not take: the daemon has left all the same (it
/// no longer chats, nor refreshes), which the bare refusal would hide.
fn quit_not_taken(why: &str) -> String {
    format!(
        "left, but the server {why}; it forgets this daemon once the registration lapses, or run `chatctl quit` again"
    )
}

/// The server does not know us (any more): it restarted or our
/// registration lapsed.
fn forgot_us(f: &chat_proto::rendezvous::Failure) -> bool {
    matches!(f.status, ErrorStatus::NotFound | ErrorStatus::Unauthorized)
}

/// A refused BRIDGE: for a named peer that is not waiting, the server's
/// reason speaks HTTP ("ask it to BRIDGE"); a chatctl user runs commands.
/// The server's first words say whether the peer is in a chat or idle.
fn bridge_refused(f: &chat_proto::rendezvous::Failure, peer: Option<ClientId>) -> String {
    let Some(p) = peer else {
        return server_refused(f);
    };
    let (what, ask) = match f.status {
        ErrorStatus::Conflict => {
            let busy = f.reason.strip_prefix(p.as_str()).map(str::trim_start);
            let why = if busy.is_some_and(|r| r.starts_with(IN_A_CHAT)) {
                "is in a chat with someone else"
            } else {
                "is not waiting for a peer"
            };
            (format!("{p} {why}"), "`chatctl bridge`")
        }
        // A 404 for us was answered by registering again and retrying
        // (`forgot_us`): one that reaches here is for the peer.
        ErrorStatus::NotFound => (f.reason.clone(), "`chatctl register` and `chatctl bridge`"),
        _ => return server_refused(f),
    };
    format!(
        "{what}: ask {p} to run {ask}, or run `chatctl bridge` without a peer ({} {})",
        f.status.code(),
        f.status.phrase()
    )
}

/// Whether a refusal says "not now" rather than "no": the server was busy
/// or full, or a proxy in front of it could not reach it. Such a request
/// is retried as if the server were unreachable.
fn transient(f: &chat_proto::rendezvous::Failure) -> bool {
    matches!(f.status.code(), 408 | 429 | 500 | 502 | 503 | 504)
}

/// Longest a server's `Retry-After` delays a retry: past it, the
/// registration would lapse before the retry anyway.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// How long before a registration lapses a refresh that keeps failing is
/// tried one last time.
const LAST_TRY_BEFORE_LAPSE: Duration = Duration::from_secs(1);

pub(crate) fn server_refused(f: &chat_proto::rendezvous::Failure) -> String {
    // The server's own reason for this one ("send its Client-Token")
    // speaks to HTTP clients; a daemon's user cannot send a token.
    let reason = match f.status {
        ErrorStatus::RegNack => {
            "another client holds this id (another chatd, or an earlier one whose token was lost): stop it, wait until its registration lapses (300 s unless the server sets --expires), or start chatd with another --id"
        }
        _ => f.reason.as_ref(),
    };
    let (code, phrase) = (f.status.code(), f.status.phrase());
    // chat-server answers in one line of text and with statuses of its
    // own; a page of HTML, or a status it never sends, comes from
    // something in front of it.
    if reason.trim_start().starts_with('<') || matches!(f.status, ErrorStatus::Other(_)) {
        return format!(
            "the server's address answered {code} {phrase}, which is not chat-server's own answer: a proxy in front of the server that cannot reach it, or not a chat-server at that address"
        );
    }
    format!("the server refused: {reason} ({code} {phrase})")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_proto::rendezvous::Failure as HttpFailure;

    fn id(s: &str) -> ClientId {
        s.parse().unwrap()
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    const TOKEN: Token = Token::from_bytes([7; 16]);
    const KEY: PeerKey = PeerKey::from_bytes([8; 16]);

    /// A session with a virtual clock.
    struct T {
        s: Session,
        now: Instant,
        next_ticket: Ticket,
    }

    impl T {
        fn new(turns: bool) -> T {
            T::started(turns, None)
        }

        /// A session whose earlier run saved `token`.
        fn with_saved_token(token: Token) -> T {
            T::started(false, Some(token))
        }

        fn started(turns: bool, token: Option<Token>) -> T {
            T {
                s: Session::new(
                    Config::new(id("me"), 4000, "server:5555".into(), turns),
                    token,
                ),
                now: Instant::now(),
                next_ticket: 1,
            }
        }

        fn advance(&mut self, d: Duration) {
            self.now += d;
            if self.s.poll_timeout().is_some_and(|t| t <= self.now) {
                self.s.handle_timeout(self.now);
            }
        }

        fn input(&mut self, i: Input) -> Vec<Action> {
            self.s.handle(i, self.now);
            self.drain()
        }

        fn drain(&mut self) -> Vec<Action> {
            std::iter::from_fn(|| self.s.poll_action()).collect()
        }

        /// A call from `peer`: its link, and what the session did.
        fn call_from(&mut self, peer: &str, turns: bool) -> (LinkId, Vec<Action>) {
            let link = self.s.next_link();
            let hello = Hello {
                id: id(peer),
                turns,
            };
            (link, self.input(Input::Incoming { link, hello }))
        }

        /// A call from `peer`, accepted, then confirmed by its first frame
        /// (a ping): the actions of both.
        fn answered(&mut self, peer: &str, turns: bool) -> (LinkId, Vec<Action>) {
            let (link, mut a) = self.call_from(peer, turns);
            a.extend(self.input(Input::Frame {
                link,
                frame: PeerFrame::Ping,
            }));
            (link, a)
        }

        fn command(&mut self, c: Command) -> (Ticket, Vec<Action>) {
            let ticket = self.next_ticket;
            self.next_ticket += 1;
            (ticket, self.input(Input::Command { ticket, command: c }))
        }

        /// The one server request among `actions`.
        fn server_op(actions: &[Action]) -> (OpId, Request) {
            let ops: Vec<_> = actions
                .iter()
                .filter_map(|a| match a {
                    Action::Server { op, request } => Some((*op, request.clone())),
                    _ => None,
                })
                .collect();
            assert_eq!(ops.len(), 1, "{actions:?}");
            ops[0].clone()
        }

        /// Link `link` closed under the session, with nothing said.
        fn closed(&mut self, link: LinkId) -> Vec<Action> {
            self.input(Input::LinkClosed {
                link,
                reason: "gone".into(),
            })
        }

        /// The server's refusal `f` of request `op`.
        fn refused(&mut self, op: OpId, f: HttpFailure) -> Vec<Action> {
            self.input(Input::ServerReply {
                op,
                result: Ok(Response::Error(f)),
            })
        }

        /// The server's REGACK to request `op`, with the usual token.
        fn regack(&mut self, op: OpId) -> Vec<Action> {
            self.regack_with(op, TOKEN)
        }

        /// The server's REGACK to request `op`, issuing `token`.
        fn regack_with(&mut self, op: OpId, token: Token) -> Vec<Action> {
            self.input(Input::ServerReply {
                op,
                result: Ok(Response::RegAck {
                    id: id("me"),
                    addr: addr(4000),
                    token,
                    expires: 300,
                }),
            })
        }

        fn register(&mut self) {
            let (_, a) = self.command(Command::Register);
            let (op, _) = T::server_op(&a);
            self.regack(op);
            assert_eq!(self.s.state(), State::Registered);
        }

        /// Registered, then bridged: handed `peer`, or waiting (`None`).
        fn bridged(&mut self, peer: Option<(ClientId, SocketAddr)>) {
            self.register();
            let (_, a) = self.command(Command::Bridge { peer: None });
            let (op, _) = T::server_op(&a);
            self.input(Input::ServerReply {
                op,
                result: Ok(Response::BridgeAck {
                    peer: peer.map(|(p, a)| (p, a, KEY)),
                }),
            });
        }

        fn chatting(&mut self, initiator: bool) -> LinkId {
            if initiator {
                self.bridged(Some((id("bob"), addr(5000))));
                let (_, a) = self.command(Command::Chat);
                let link = match &a[..] {
                    [.., Action::Connect { link, addr: to, .. }] if *to == addr(5000) => *link,
                    other => panic!("{other:?}"),
                };
                let a = self.input(Input::LinkUp {
                    link,
                    peer: id("bob"),
                });
                assert!(a.iter().any(|x| matches!(
                    x,
                    Action::Reply {
                        result: Ok(Reply::Chatting { .. }),
                        ..
                    }
                )));
                link
            } else {
                self.bridged(None);
                assert_eq!(self.s.state(), State::Waiting);
                // The initiator set up as this daemon is.
                let turns = self.s.config.turns;
                let (link, a) = self.call_from("bob", turns);
                assert!(a.contains(&Action::Accept { link }), "{a:?}");
                // Not a chat until the caller's first frame confirms it.
                assert_eq!(self.s.state(), State::Waiting);
                self.input(Input::Frame {
                    link,
                    frame: PeerFrame::Ping,
                });
                assert_eq!(self.s.state(), State::Chatting);
                link
            }
        }
    }

    fn reply_of(actions: &[Action], ticket: Ticket) -> Result<Reply, Failure> {
        actions
            .iter()
            .find_map(|a| match a {
                Action::Reply { ticket: t, result } if *t == ticket => Some(result.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no reply for {ticket} in {actions:?}"))
    }

    fn replied(actions: &[Action], ticket: Ticket) -> bool {
        actions
            .iter()
            .any(|a| matches!(a, Action::Reply { ticket: t, .. } if *t == ticket))
    }

    fn sent_messages(actions: &[Action]) -> Vec<(u64, String)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send {
                    frame: PeerFrame::Message { id, text, .. },
                    ..
                } => Some((*id, text.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn register_saves_the_token_and_reports_the_address() {
        let mut t = T::new(false);
        let (ticket, a) = t.command(Command::Register);
        let (op, req) = T::server_op(&a);
        assert_eq!(
            req,
            Request::Register {
                id: id("me"),
                port: 4000,
                token: None
            }
        );
        let a = t.regack(op);
        assert!(a.contains(&Action::SaveToken(TOKEN)));
        assert_eq!(
            reply_of(&a, ticket),
            Ok(Reply::Registered {
                addr: addr(4000),
                expires: 300
            })
        );
        assert!(a.contains(&Action::Record(RecordKind::State {
            state: State::Registered,
            peer: None
        })));
        // Registering again refreshes with the token.
        let (_, a) = t.command(Command::Register);
        assert_eq!(
            T::server_op(&a).1,
            Request::Register {
                id: id("me"),
                port: 4000,
                token: Some(TOKEN)
            }
        );
    }

    #[test]
    fn registering_at_start_up_retries_until_the_server_answers() {
        let mut t = T::new(false);
        t.s.register_automatically();
        let (op, _) = T::server_op(&t.drain());
        t.input(Input::ServerReply {
            op,
            result: Err("connection refused".into()),
        });
        assert_eq!(t.s.state(), State::Idle);
        t.advance(Duration::from_secs(4));
        assert!(t.drain().is_empty());
        t.advance(Duration::from_secs(1));
        let (op, req) = T::server_op(&t.drain());
        assert!(matches!(req, Request::Register { .. }));
        t.regack(op);
        assert_eq!(t.s.state(), State::Registered);
        // A refusal is not retried: it needs a person.
        let mut t = T::new(false);
        t.s.register_automatically();
        let (op, _) = T::server_op(&t.drain());
        let a = t.refused(op, HttpFailure::new(ErrorStatus::RegNack, "taken"));
        assert!(a.iter().any(
            |x| matches!(x, Action::Record(RecordKind::Notice { text }) if text.contains("another client holds this id"))
        ));
        assert_eq!(t.s.poll_timeout(), None);
    }

    #[test]
    fn a_saved_token_takes_back_the_earlier_runs_registration_first() {
        for quit_answer in [
            Ok(Response::QuitAck),
            Ok(Response::Error(HttpFailure::new(
                ErrorStatus::NotFound,
                "no client me is registered",
            ))),
        ] {
            let mut t = T::with_saved_token(TOKEN);
            // Whatever the server still holds for that run (waiting for a
            // peer, say) is taken back ...
            let (ticket, a) = t.command(Command::Register);
            let (op, request) = T::server_op(&a);
            assert_eq!(
                request,
                Request::Quit {
                    id: id("me"),
                    token: TOKEN
                }
            );
            // ... and the id registered anew, with nothing carried over.
            let a = t.input(Input::ServerReply {
                op,
                result: quit_answer,
            });
            let (op, request) = T::server_op(&a);
            assert_eq!(
                request,
                Request::Register {
                    id: id("me"),
                    port: 4000,
                    token: None
                }
            );
            let fresh = Token::from_bytes([9; 16]);
            let a = t.regack_with(op, fresh);
            assert!(a.contains(&Action::SaveToken(fresh)), "{a:?}");
            assert!(reply_of(&a, ticket).is_ok(), "{a:?}");
        }
        // The server out of reach: the registration fails as it would have,
        // and the token is kept for the next try.
        let mut t = T::with_saved_token(TOKEN);
        let (ticket, a) = t.command(Command::Register);
        let (op, _) = T::server_op(&a);
        let a = t.input(Input::ServerReply {
            op,
            result: Err("connection refused".into()),
        });
        let f = reply_of(&a, ticket).unwrap_err();
        assert!(f.message.contains("cannot reach the server"), "{f:?}");
        let (_, a) = t.command(Command::Register);
        assert_eq!(
            T::server_op(&a).1,
            Request::Quit {
                id: id("me"),
                token: TOKEN
            }
        );
    }

    #[test]
    fn registrations_asked_at_once_go_one_after_another() {
        let mut t = T::with_saved_token(TOKEN);
        let (first, a) = t.command(Command::Register);
        let (quit, _) = T::server_op(&a);
        // A second one, and --register's, wait for the first.
        let (second, a) = t.command(Command::Register);
        assert!(
            !a.iter().any(|x| matches!(x, Action::Server { .. })),
            "{a:?}"
        );
        t.s.register_automatically();
        assert!(t.drain().is_empty());
        let a = t.input(Input::ServerReply {
            op: quit,
            result: Ok(Response::QuitAck),
        });
        let (op, _) = T::server_op(&a);
        let fresh = Token::from_bytes([9; 16]);
        let a = t.regack_with(op, fresh);
        assert!(reply_of(&a, first).is_ok(), "{a:?}");
        // Then the second, a refresh with the new token: not refused.
        let (op, request) = T::server_op(&a);
        assert_eq!(
            request,
            Request::Register {
                id: id("me"),
                port: 4000,
                token: Some(fresh)
            }
        );
        let a = t.regack_with(op, fresh);
        assert!(reply_of(&a, second).is_ok(), "{a:?}");
        assert_eq!(t.s.state(), State::Registered);
    }

    #[test]
    fn regnack_and_unreachable_server_are_clear_failures() {
        let mut t = T::new(false);
        let (ticket, a) = t.command(Command::Register);
        let (op, _) = T::server_op(&a);
        let a = t.refused(
            op,
            HttpFailure::new(
                ErrorStatus::RegNack,
                "id me is registered by another client",
            ),
        );
        let f = reply_of(&a, ticket).unwrap_err();
        assert_eq!(f.kind, FailureKind::Server);
        // Told as a daemon's user can act on it, not as the server's HTTP
        // reason ("send its Client-Token").
        assert!(f.message.contains("another client holds this id"), "{f:?}");
        assert!(f.message.contains("another --id"), "{f:?}");
        assert!(!f.message.contains("Client-Token"), "{f:?}");
        assert_eq!(t.s.state(), State::Idle);
        let (ticket, a) = t.command(Command::Register);
        let (op, _) = T::server_op(&a);
        let a = t.input(Input::ServerReply {
            op,
            result: Err("connection refused".into()),
        });
        let f = reply_of(&a, ticket).unwrap_err();
        assert!(
            f.message
                .contains("cannot reach the server server:5555: connection refused"),
            "{f:?}"
        );
    }

    #[test]
    fn commands_out_of_order_say_what_to_run() {
        let mut t = T::new(false);
        for (c, hint) in [
            (Command::Bridge { peer: None }, "chatctl register"),
            (Command::Chat, "chatctl register"),
            (Command::Send { text: "x".into() }, "chatctl register"),
        ] {
            let (ticket, a) = t.command(c);
            let f = reply_of(&a, ticket).unwrap_err();
            assert_eq!(f.kind, FailureKind::State);
            assert!(f.message.contains(hint), "{f:?}");
        }
        t.register();
        let (ticket, a) = t.command(Command::Chat);
        assert!(
            reply_of(&a, ticket)
                .unwrap_err()
                .message
                .contains("chatctl bridge")
        );
        let (ticket, a) = t.command(Command::Send { text: "x".into() });
        assert!(
            reply_of(&a, ticket)
                .unwrap_err()
                .message
                .contains("not chatting")
        );
        let (ticket, a) = t.command(Command::Bridge {
            peer: Some(id("me")),
        });
        assert_eq!(reply_of(&a, ticket).unwrap_err().kind, FailureKind::Invalid);
    }

    #[test]
    fn bridge_then_wait_or_ready() {
        let mut t = T::new(false);
        t.register();
        let (ticket, a) = t.command(Command::Bridge {
            peer: Some(id("bob")),
        });
        let (op, req) = T::server_op(&a);
        assert_eq!(
            req,
            Request::Bridge {
                id: id("me"),
                token: TOKEN,
                peer: Some(id("bob"))
            }
        );
        let a = t.input(Input::ServerReply {
            op,
            result: Ok(Response::BridgeAck {
                peer: Some((id("bob"), addr(5000), KEY)),
            }),
        });
        assert_eq!(
            reply_of(&a, ticket),
            Ok(Reply::Bridged {
                peer: Some((id("bob"), addr(5000)))
            })
        );
        assert_eq!(t.s.state(), State::Ready);
        assert_eq!(t.s.status().peer, Some(id("bob")));
        let (ticket, a) = t.command(Command::Bridge { peer: None });
        let (op, _) = T::server_op(&a);
        let a = t.input(Input::ServerReply {
            op,
            result: Ok(Response::BridgeAck { peer: None }),
        });
        assert_eq!(reply_of(&a, ticket), Ok(Reply::Bridged { peer: None }));
        assert_eq!(t.s.state(), State::Waiting);
    }

    #[test]
    fn a_server_that_forgot_us_is_registered_with_again() {
        let mut t = T::new(false);
        t.register();
        let (ticket, a) = t.command(Command::Bridge { peer: None });
        let (op, _) = T::server_op(&a);
        let a = t.refused(
            op,
            HttpFailure::new(ErrorStatus::NotFound, "me is not registered"),
        );
        let (op, req) = T::server_op(&a);
        assert_eq!(
            req,
            Request::Register {
                id: id("me"),
                port: 4000,
                token: Some(TOKEN)
            }
        );
        let fresh = Token::from_bytes([8; 16]);
        let a = t.regack_with(op, fresh);
        assert!(a.contains(&Action::SaveToken(fresh)));
        let (op, req) = T::server_op(&a);
        assert_eq!(
            req,
            Request::Bridge {
                id: id("me"),
                token: fresh,
                peer: None
            }
        );
        let a = t.input(Input::ServerReply {
            op,
            result: Ok(Response::BridgeAck { peer: None }),
        });
        assert_eq!(reply_of(&a, ticket), Ok(Reply::Bridged { peer: None }));
        // A second 404 is not retried forever.
        let (ticket, a) = t.command(Command::Bridge {
            peer: Some(id("ghost")),
        });
        let (op, _) = T::server_op(&a);
        let a = t.refused(
            op,
            HttpFailure::new(ErrorStatus::NotFound, "no client ghost"),
        );
        let (op, _) = T::server_op(&a);
        let a = t.regack_with(op, fresh);
        let (op, _) = T::server_op(&a);
        let a = t.refused(
            op,
            HttpFailure::new(ErrorStatus::NotFound, "no client ghost"),
        );
        assert!(
            reply_of(&a, ticket)
                .unwrap_err()
                .message
                .contains("no client ghost")
        );
    }

    #[test]
    fn registration_is_refreshed_at_half_life_and_retried() {
        let mut t = T::new(false);
        t.register();
        t.advance(Duration::from_secs(149));
        assert!(t.drain().is_empty());
        t.advance(Duration::from_secs(1));
        let a = t.drain();
        let (op, req) = T::server_op(&a);
        assert_eq!(
            req,
            Request::Register {
                id: id("me"),
                port: 4000,
                token: Some(TOKEN)
            }
        );
        // Unreachable: retried 5 s later, still registered meanwhile.
        t.input(Input::ServerReply {
            op,
            result: Err("timed out".into()),
        });
        assert_eq!(t.s.state(), State::Registered);
        t.advance(Duration::from_secs(5));
        let (op, _) = T::server_op(&t.drain());
        t.regack(op);
        assert_eq!(t.s.poll_timeout(), Some(t.now + Duration::from_secs(150)));
    }

    #[test]
    fn a_refresh_refused_for_now_is_retried_not_dropped() {
        let mut t = T::new(false);
        t.register();
        t.advance(Duration::from_secs(150));
        // A proxy whose server is restarting answers 502 with a page.
        let (op, _) = T::server_op(&t.drain());
        let page = "<html><head><title>502 Bad Gateway</title></head></html>";
        let bad_gateway = HttpFailure::new(ErrorStatus::Other(502), page);
        assert!(!server_refused(&bad_gateway).contains("<html>"));
        assert!(server_refused(&bad_gateway).contains("502 Bad Gateway"));
        t.refused(op, bad_gateway);
        assert_eq!(t.s.state(), State::Registered, "a 502 is not a refusal");
        t.advance(Duration::from_secs(4));
        assert!(t.drain().is_empty());
        t.advance(Duration::from_secs(1));
        // Rate limited: its Retry-After, when longer than ours, is kept.
        let (op, _) = T::server_op(&t.drain());
        let limited = HttpFailure {
            retry_after: Some(30),
            ..HttpFailure::new(ErrorStatus::TooManyRequests, "rate limited")
        };
        t.refused(op, limited);
        assert_eq!(t.s.state(), State::Registered);
        assert_eq!(t.s.poll_timeout(), Some(t.now + Duration::from_secs(30)));
        // A real refusal still ends it.
        t.advance(Duration::from_secs(30));
        let (op, _) = T::server_op(&t.drain());
        t.refused(op, HttpFailure::new(ErrorStatus::RegNack, "taken"));
        assert_eq!(t.s.state(), State::Idle);
    }

    #[test]
    fn a_long_retry_after_does_not_outlive_the_registration() {
        let mut t = T::new(false);
        t.register();
        t.advance(Duration::from_secs(150));
        let (op, _) = T::server_op(&t.drain());
        let busy = HttpFailure {
            retry_after: Some(100_000),
            ..HttpFailure::new(ErrorStatus::Unavailable, "busy")
        };
        t.refused(op, busy);
        // Cut short to one last try, a second before the lapse at 300 s.
        assert_eq!(t.s.poll_timeout(), Some(t.now + Duration::from_secs(149)));
        t.advance(Duration::from_secs(149));
        let (op, _) = T::server_op(&t.drain());
        t.input(Input::ServerReply {
            op,
            result: Err("timed out".into()),
        });
        // No time for another: the lapse comes next, and a command that
        // finds the server forgot us is told so, not promised a retry.
        assert_eq!(t.s.poll_timeout(), Some(t.now + Duration::from_secs(1)));
        let (ticket, a) = t.command(Command::Bridge { peer: None });
        let (op, _) = T::server_op(&a);
        let a = t.refused(op, HttpFailure::new(ErrorStatus::NotFound, "who?"));
        let (op, _) = T::server_op(&a);
        let a = t.refused(op, HttpFailure::new(ErrorStatus::Other(502), "<html>"));
        let told = a.iter().any(|x| {
            matches!(x, Action::Reply { ticket: tk, result: Err(e) }
                if *tk == ticket && e.message.contains("lapses in 1 s"))
        });
        assert!(told, "{a:?}");
        t.advance(Duration::from_secs(1));
        assert_eq!(t.s.state(), State::Idle);
    }

    #[test]
    fn a_server_that_forgot_us_and_is_busy_is_retried_later() {
        let mut t = T::new(false);
        t.register();
        let (ticket, a) = t.command(Command::Bridge { peer: None });
        let (op, _) = T::server_op(&a);
        // The server restarted: it does not know us.
        let a = t.refused(op, HttpFailure::new(ErrorStatus::NotFound, "unknown id"));
        let (op, req) = T::server_op(&a);
        assert!(matches!(req, Request::Register { .. }), "{req:?}");
        // And its proxy cannot reach it for a moment.
        let a = t.refused(op, HttpFailure::new(ErrorStatus::Other(502), "<html>"));
        let failed = a.iter().any(|x| {
            matches!(x, Action::Reply { ticket: tk, result: Err(e) }
                if *tk == ticket && e.message.contains("retries in 5 s"))
        });
        assert!(failed, "{a:?}");
        assert_eq!(t.s.state(), State::Registered, "kept, to be retried");
        t.advance(Duration::from_secs(5));
        let (_, req) = T::server_op(&t.drain());
        assert!(matches!(req, Request::Register { .. }), "{req:?}");
    }

    #[test]
    fn registering_at_start_up_waits_out_a_busy_server() {
        let mut t = T::new(false);
        t.s.register_automatically();
        let (op, _) = T::server_op(&t.drain());
        let full = HttpFailure {
            retry_after: Some(60),
            ..HttpFailure::new(ErrorStatus::Unavailable, "server full")
        };
        t.refused(op, full);
        t.advance(Duration::from_secs(59));
        assert!(t.drain().is_empty());
        t.advance(Duration::from_secs(1));
        let (op, req) = T::server_op(&t.drain());
        assert!(
            matches!(req, Request::Register { token: None, .. }),
            "{req:?}"
        );
        t.regack(op);
        assert_eq!(t.s.state(), State::Registered);
    }

    #[test]
    fn registration_lapses_when_the_server_stays_away() {
        let mut t = T::new(false);
        t.register();
        let mut now_waiting = false;
        // Refresh attempts keep failing until the lifetime runs out.
        for _ in 0..200 {
            t.advance(Duration::from_secs(5));
            let a = t.drain();
            if let Some(Action::Server { op, .. }) =
                a.iter().find(|x| matches!(x, Action::Server { .. }))
            {
                t.input(Input::ServerReply {
                    op: *op,
                    result: Err("connection refused".into()),
                });
            }
            if t.s.state() == State::Idle {
                now_waiting = true;
                break;
            }
        }
        assert!(now_waiting, "the registration should lapse after 300 s");
    }

    #[test]
    fn a_refreshed_registration_after_a_server_restart_rejoins_the_pool() {
        let mut t = T::new(false);
        t.bridged(None);
        t.advance(Duration::from_secs(150));
        let (op, _) = T::server_op(&t.drain());
        // A restarted server issues a new token: it had forgotten us.
        let a = t.regack_with(op, Token::from_bytes([9; 16]));
        let (op, req) = T::server_op(&a);
        assert!(matches!(req, Request::Bridge { peer: None, .. }));
        // bob bridged while the server had forgotten us, and waits: the
        // server hands him out, and this daemon calls him.
        let a = t.input(Input::ServerReply {
            op,
            result: Ok(Response::BridgeAck {
                peer: Some((id("bob"), addr(5000), KEY)),
            }),
        });
        let Some(Action::Connect { link, addr: to, .. }) = a
            .iter()
            .find(|x| matches!(x, Action::Connect { .. }))
            .cloned()
        else {
            panic!("no call: {a:?}")
        };
        assert_eq!(to, addr(5000));
        let a = t.input(Input::LinkUp {
            link,
            peer: id("bob"),
        });
        assert_eq!(t.s.state(), State::Chatting);
        assert_eq!(reply_of(&a, OWN), Ok(Reply::Chatting { peer: id("bob") }));
    }

    #[test]
    fn a_failed_call_of_the_daemons_own_is_told() {
        let mut t = T::new(false);
        t.bridged(None);
        t.advance(Duration::from_secs(150));
        let (op, _) = T::server_op(&t.drain());
        let a = t.regack(op);
        let (op, _) = T::server_op(&a);
        let a = t.input(Input::ServerReply {
            op,
            result: Ok(Response::BridgeAck {
                peer: Some((id("bob"), addr(5000), KEY)),
            }),
        });
        let Some(Action::Connect { link, .. }) = a
            .iter()
            .find(|x| matches!(x, Action::Connect { .. }))
            .cloned()
        else {
            panic!("no call: {a:?}")
        };
        let a = t.input(Input::LinkFailed {
            link,
            refused: None,
            reason: "connection refused".into(),
            nobody_listens: true,
        });
        let told = a.iter().any(|x| {
            matches!(x, Action::Record(RecordKind::Notice { text }) if text.contains("connection refused")
                && text.contains("its chatd is gone")
                && text.ends_with("run `chatctl bridge` for another peer")
                && text.matches("chatctl bridge").count() == 1)
        });
        assert!(told, "{a:?}");
        // The server is told, so that it hands bob to nobody else.
        assert_eq!(
            T::server_op(&a).1,
            Request::Chat {
                id: id("me"),
                token: TOKEN,
                peer: id("bob")
            }
        );
    }

    #[test]
    fn chat_as_initiator_tells_the_server_and_sends_with_acks() {
        let mut t = T::new(false);
        t.bridged(Some((id("bob"), addr(5000))));
        let (ticket, a) = t.command(Command::Chat);
        let Some(Action::Connect { link, hello, .. }) = a.last().cloned() else {
            panic!("{a:?}")
        };
        assert_eq!(
            hello,
            Hello {
                id: id("me"),
                turns: false
            }
        );
        let a = t.input(Input::LinkUp {
            link,
            peer: id("bob"),
        });
        assert_eq!(
            reply_of(&a, ticket),
            Ok(Reply::Chatting { peer: id("bob") })
        );
        assert_eq!(
            T::server_op(&a).1,
            Request::Chat {
                id: id("me"),
                token: TOKEN,
                peer: id("bob")
            }
        );
        assert_eq!(t.s.state(), State::Chatting);

        let (t1, a) = t.command(Command::Send {
            text: "hello".into(),
        });
        assert_eq!(sent_messages(&a), vec![(1, "hello".to_owned())]);
        assert!(a.contains(&Action::Outgoing {
            link,
            id: 1,
            record: RecordKind::Message {
                from: id("me"),
                to: id("bob"),
                text: "hello".into(),
                outgoing: true,
                delivered: None
            }
        }));
        let (t2, a) = t.command(Command::Send {
            text: "again".into(),
        });
        assert_eq!(sent_messages(&a), vec![(2, "again".to_owned())]);
        t.now += Duration::from_millis(3);
        let a = t.input(Input::Frame {
            link,
            frame: PeerFrame::Ack { id: 2 },
        });
        assert!(a.contains(&Action::Delivery {
            link,
            id: 2,
            delivered: true
        }));
        assert_eq!(
            reply_of(&a, t2),
            Ok(Reply::Sent {
                id: 2,
                round_trip_us: 3000
            })
        );
        let a = t.input(Input::Frame {
            link,
            frame: PeerFrame::Ack { id: 1 },
        });
        assert!(matches!(reply_of(&a, t1), Ok(Reply::Sent { id: 1, .. })));
    }

    #[test]
    fn the_daemon_at_the_address_must_be_the_peer() {
        let mut t = T::new(false);
        let (ticket, link) = calling(&mut t, "bob");
        let a = t.input(Input::LinkUp {
            link,
            peer: id("mallory"),
        });
        assert!(a.contains(&Action::Close { link }));
        assert!(
            reply_of(&a, ticket)
                .unwrap_err()
                .message
                .contains("is mallory, not bob")
        );
        assert_eq!(t.s.state(), State::Registered);
    }

    /// Bridged to `peer`, runs `chat`: the ticket and the call's link.
    fn calling(t: &mut T, peer: &str) -> (Ticket, LinkId) {
        t.bridged(Some((id(peer), addr(5000))));
        let (ticket, a) = t.command(Command::Chat);
        match a.last() {
            Some(Action::Connect { link, .. }) => (ticket, *link),
            other => panic!("{other:?}"),
        }
    }

    /// Bridged to `peer`, runs `chat`, and has its call refused with 409
    /// for `why`: the ticket, and what the session did.
    fn refused_409(t: &mut T, peer: &str, why: &str) -> (Ticket, Vec<Action>) {
        let (ticket, link) = calling(t, peer);
        let a = t.input(Input::LinkFailed {
            link,
            refused: Some(409),
            reason: format!("refused (409): {peer} {why}"),
            nobody_listens: false,
        });
        (ticket, a)
    }

    #[test]
    fn a_failed_connect_goes_back_to_registered() {
        // ("me" is the daemon's own id.) Only a 409 from a lower id can be
        // a crossing call; every other failure is told at once, a busy
        // peer's 503 whatever its id.
        for (peer, refused, why) in [
            (
                "zed",
                Some(409),
                "refused (409): zed is busy in another chat",
            ),
            (
                "bob",
                Some(503),
                "refused (503): bob is busy in another chat",
            ),
            (
                "bob",
                Some(403),
                "refused (403): bob is not waiting for a chat",
            ),
            ("bob", None, "Connection refused (os error 111)"),
        ] {
            let mut t = T::new(false);
            let (ticket, link) = calling(&mut t, peer);
            let a = t.input(Input::LinkFailed {
                link,
                refused,
                reason: why.into(),
                nobody_listens: false,
            });
            let f = reply_of(&a, ticket).unwrap_err();
            assert!(f.message.contains(why), "{f:?}");
            assert!(f.message.contains("chatctl bridge"), "{f:?}");
            assert_eq!(t.s.state(), State::Registered);
        }
    }

    #[test]
    fn a_call_refused_by_a_crossing_call_takes_that_call() {
        // bob (the lower id) refused our call because it is calling us,
        // and its refusal came before its call.
        let mut t = T::new(false);
        let (ticket, a) = refused_409(&mut t, "bob", "is calling you at the same time");
        assert!(!replied(&a, ticket), "{a:?}");
        assert_eq!(t.s.state(), State::Ready);
        assert_eq!(t.s.status().peer, Some(id("bob")));

        // Anyone else is refused meanwhile, as busy ...
        let (_, a) = t.call_from("carol", false);
        assert!(
            matches!(&a[..], [Action::Refuse { status: 503, .. }]),
            "{a:?}"
        );
        // ... and bob's call is taken, on bob's rule for turns.
        let (theirs, a) = t.answered("bob", true);
        assert!(a.contains(&Action::Accept { link: theirs }), "{a:?}");
        assert!(
            !a.iter().any(|x| matches!(x, Action::Close { .. })),
            "{a:?}"
        );
        assert_eq!(
            reply_of(&a, ticket),
            Ok(Reply::Chatting { peer: id("bob") })
        );
        assert_eq!(t.s.state(), State::Chatting);
        assert_eq!(t.s.status().turn, Some(Turn::Peers));
    }

    /// What a handshake replayed by an eavesdropper gets: accepted, since
    /// it passes the key check, but never confirmed, as only the real
    /// caller can send a frame. Nothing is shown, and the daemon goes on
    /// waiting, whether the link times out, closes, or another call comes.
    #[test]
    fn an_answered_call_without_a_first_frame_changes_nothing() {
        for how in ["timeout", "closed", "another call"] {
            let mut t = T::new(false);
            t.bridged(None);
            let (link, a) = t.call_from("bob", false);
            assert!(a.contains(&Action::Accept { link }), "{a:?}");
            let mut seen = a;
            assert_eq!(t.s.state(), State::Waiting);
            assert_eq!(t.s.status().peer, None);
            assert_eq!(t.s.poll_timeout(), Some(t.now + ANSWER_WAIT), "{how}");
            let (_, sent) = t.command(Command::Send { text: "hi".into() });
            seen.extend(sent);
            match how {
                "timeout" => {
                    t.advance(ANSWER_WAIT - Duration::from_millis(1));
                    assert_eq!(t.drain(), [], "not yet");
                    t.advance(Duration::from_millis(1));
                    let a = t.drain();
                    assert_eq!(a[0], Action::Close { link });
                    seen.extend(a);
                }
                "closed" => seen.extend(t.input(Input::LinkClosed {
                    link,
                    reason: "connection closed".into(),
                })),
                _ => {
                    let (next, a) = t.call_from("bob", false);
                    assert!(a.contains(&Action::Close { link }), "{a:?}");
                    assert!(a.contains(&Action::Accept { link: next }), "{a:?}");
                    // The newer call, confirmed, is the chat.
                    let a = t.input(Input::Frame {
                        link: next,
                        frame: PeerFrame::Ping,
                    });
                    assert!(a.contains(&Action::Record(RecordKind::State {
                        state: State::Chatting,
                        peer: Some(id("bob")),
                    })));
                    assert_eq!(t.s.state(), State::Chatting, "{how}");
                    continue;
                }
            }
            assert_eq!(t.s.state(), State::Waiting, "{how}");
            assert!(
                !seen.iter().any(|x| matches!(
                    x,
                    Action::Record(RecordKind::State { .. } | RecordKind::Notice { .. })
                )),
                "{how}: {seen:?}"
            );
            // A real caller that got this far told the server we chat: the
            // daemon bridges again to be back in the pool, once that CHAT
            // has surely arrived.
            assert!(
                !seen.iter().any(|x| matches!(x, Action::Server { .. })),
                "{seen:?}"
            );
            t.advance(REJOIN_DELAY);
            let (op, request) = T::server_op(&t.drain());
            assert!(
                matches!(request, Request::Bridge { peer: None, .. }),
                "{request:?}"
            );
            t.input(Input::ServerReply {
                op,
                result: Ok(Response::BridgeAck { peer: None }),
            });
            assert_eq!(t.s.state(), State::Waiting, "{how}");
            // Still in the pool: the next real caller gets through.
            let (link, _) = t.answered("carol", false);
            assert_eq!(t.s.state(), State::Chatting, "{how}");
            assert!(matches!(&t.s.phase, Phase::Chatting(c) if c.link == link));
        }
    }

    /// A caller speaks at once, so that the callee can believe its call.
    #[test]
    fn a_caller_sends_a_frame_as_soon_as_the_link_is_up() {
        let mut t = T::new(false);
        let (_, link) = calling(&mut t, "bob");
        let a = t.input(Input::LinkUp {
            link,
            peer: id("bob"),
        });
        assert!(a.contains(&Action::Send {
            link,
            frame: PeerFrame::Ping
        }));
    }

    /// Our call gave way to a crossing one that then did not complete: the
    /// `chat` goes on with our own call, the introduction kept; a second
    /// call from the same peer meanwhile takes the `chat` over instead.
    #[test]
    fn a_crossing_call_that_does_not_complete_leaves_the_chat_to_our_own_call() {
        let mut t = T::new(false);
        let (chat, own) = calling(&mut t, "bob");
        let (theirs, a) = t.call_from("bob", false);
        assert!(a.contains(&Action::Close { link: own }), "{a:?}");
        assert!(a.contains(&Action::Accept { link: theirs }), "{a:?}");
        assert!(!replied(&a, chat));
        let a = t.input(Input::LinkClosed {
            link: theirs,
            reason: "connection reset".into(),
        });
        assert!(!replied(&a, chat), "{a:?}");
        let Some(Action::Connect {
            link: again, key, ..
        }) = a.last().cloned()
        else {
            panic!("{a:?}")
        };
        assert_eq!(key, KEY, "the introduction is kept");
        let a = t.input(Input::LinkUp {
            link: again,
            peer: id("bob"),
        });
        assert_eq!(reply_of(&a, chat), Ok(Reply::Chatting { peer: id("bob") }));

        // Bob calls twice while our `chat` waits: the second call is the
        // one it waits on.
        let mut t = T::new(false);
        let (chat, _) = calling(&mut t, "bob");
        let (first, _) = t.call_from("bob", false);
        let (second, a) = t.answered("bob", false);
        assert!(a.contains(&Action::Close { link: first }), "{a:?}");
        assert_eq!(reply_of(&a, chat), Ok(Reply::Chatting { peer: id("bob") }));
        assert!(matches!(&t.s.phase, Phase::Chatting(c) if c.link == second));
    }

    /// A `chat` waiting on a call is answered whatever becomes of a newer
    /// call from the same peer, even one that is refused.
    #[test]
    fn a_waiting_chat_is_answered_when_the_newer_call_is_refused() {
        let mut t = T::new(false);
        t.bridged(None);
        let (_, a) = t.command(Command::Bridge { peer: None });
        let (op, _) = T::server_op(&a);
        t.call_from("bob", false);
        let (chat, _) = t.command(Command::Chat);
        // Handed carol meanwhile: the phase to go back to is Ready{carol},
        // which refuses bob's next call ...
        t.input(Input::ServerReply {
            op,
            result: Ok(Response::BridgeAck {
                peer: Some((id("carol"), addr(6000), KEY)),
            }),
        });
        let (_, a) = t.call_from("bob", false);
        assert!(
            a.iter()
                .any(|x| matches!(x, Action::Refuse { status: 403, .. })),
            "{a:?}"
        );
        // ... and the waiting `chat` goes on as if asked now: it calls carol.
        assert!(
            matches!(a.last(), Some(Action::Connect { peer, .. }) if *peer == id("carol")),
            "{a:?}"
        );
        assert!(!replied(&a, chat), "answered when the call ends");
        let Some(Action::Connect { link, .. }) = a.last().cloned() else {
            unreachable!()
        };
        let a = t.input(Input::LinkUp {
            link,
            peer: id("carol"),
        });
        assert_eq!(
            reply_of(&a, chat),
            Ok(Reply::Chatting { peer: id("carol") })
        );
    }

    /// A rejoin answered with a peer while a call is being answered: the
    /// server no longer counts us as waiting, so should the call not
    /// complete, the daemon calls that peer itself.
    #[test]
    fn a_rejoin_answered_during_an_answer_calls_its_peer_if_the_call_fails() {
        let mut t = T::new(false);
        t.bridged(None);
        let (first, _) = t.call_from("bob", false);
        t.closed(first);
        t.advance(REJOIN_DELAY);
        let (op, request) = T::server_op(&t.drain());
        assert!(matches!(request, Request::Bridge { .. }), "{request:?}");
        let (link, _) = t.call_from("bob", false);
        t.input(Input::ServerReply {
            op,
            result: Ok(Response::BridgeAck {
                peer: Some((id("carol"), addr(6000), KEY)),
            }),
        });
        assert_eq!(t.s.state(), State::Ready);
        let a = t.closed(link);
        assert!(
            matches!(a.last(), Some(Action::Connect { peer, .. }) if *peer == id("carol")),
            "{a:?}"
        );
    }

    /// Replayed handshakes, one after another, send the daemon back to the
    /// pool once per `REJOIN_AFTER_ANSWER`, not once each.
    #[test]
    fn failed_answers_rejoin_the_pool_at_most_so_often() {
        let mut t = T::new(false);
        t.bridged(None);
        let mut bridges = Vec::new();
        let mut answer_bridges = |t: &mut T, a: Vec<Action>| {
            for x in a {
                if let Action::Server {
                    op,
                    request: Request::Bridge { .. },
                } = x
                {
                    bridges.push(t.now);
                    t.input(Input::ServerReply {
                        op,
                        result: Ok(Response::BridgeAck { peer: None }),
                    });
                }
            }
        };
        let start = t.now;
        for _ in 0..10 {
            let (link, _) = t.call_from("bob", false);
            let a = t.closed(link);
            answer_bridges(&mut t, a);
            for _ in 0..15 {
                t.advance(REJOIN_AFTER_ANSWER / 60);
                let a = t.drain();
                answer_bridges(&mut t, a);
            }
        }
        // Ten failures over two and a half periods: one return shortly
        // after the first, and those owed since, each when the limit
        // allowed it, none lost.
        let at: Vec<Duration> = bridges.iter().map(|b| *b - start).collect();
        assert_eq!(
            at,
            [
                REJOIN_DELAY,
                REJOIN_DELAY + REJOIN_AFTER_ANSWER,
                REJOIN_DELAY + 2 * REJOIN_AFTER_ANSWER
            ]
        );
        assert_eq!(t.s.state(), State::Waiting);
    }

    /// What else may happen while a call is being answered: a `chat`
    /// waits on it; a bridge answered meanwhile holds for afterwards; quit
    /// closes it; losing the registration leaves nothing to go back to.
    #[test]
    fn commands_and_answers_while_a_call_is_being_answered() {
        // `chat` from waiting: on confirmation it is the chat ...
        let mut t = T::new(false);
        t.bridged(None);
        let (link, _) = t.call_from("bob", false);
        let (chat, a) = t.command(Command::Chat);
        assert!(!replied(&a, chat), "{a:?}");
        let a = t.input(Input::Frame {
            link,
            frame: PeerFrame::Ping,
        });
        assert_eq!(reply_of(&a, chat), Ok(Reply::Chatting { peer: id("bob") }));
        // ... and if the call does not complete, what `chat` says when
        // waiting.
        let mut t = T::new(false);
        t.bridged(None);
        let (link, _) = t.call_from("bob", false);
        let (chat, _) = t.command(Command::Chat);
        let a = t.closed(link);
        let f = reply_of(&a, chat).unwrap_err();
        assert!(f.message.contains("waiting for a peer"), "{f:?}");

        // A bridge answered while the call is pending holds afterwards.
        let mut t = T::new(false);
        t.bridged(None);
        let (bridge, a) = t.command(Command::Bridge { peer: None });
        let (op, _) = T::server_op(&a);
        let (link, _) = t.call_from("bob", false);
        let a = t.input(Input::ServerReply {
            op,
            result: Ok(Response::BridgeAck {
                peer: Some((id("carol"), addr(6000), KEY)),
            }),
        });
        assert!(
            !replied(&a, bridge),
            "held until the call is decided: {a:?}"
        );
        let a = t.closed(link);
        assert_eq!(
            reply_of(&a, bridge),
            Ok(Reply::Bridged {
                peer: Some((id("carol"), addr(6000)))
            })
        );
        assert_eq!(t.s.state(), State::Ready);
        assert_eq!(t.s.status().peer, Some(id("carol")));
        // ... and is moot if the call goes through.
        let mut t = T::new(false);
        t.bridged(None);
        let (bridge, a) = t.command(Command::Bridge { peer: None });
        let (op, _) = T::server_op(&a);
        let (link, _) = t.call_from("bob", false);
        t.input(Input::ServerReply {
            op,
            result: Ok(Response::BridgeAck {
                peer: Some((id("carol"), addr(6000), KEY)),
            }),
        });
        let a = t.input(Input::Frame {
            link,
            frame: PeerFrame::Ping,
        });
        let f = reply_of(&a, bridge).unwrap_err();
        assert!(f.message.contains("moot"), "{f:?}");
        assert_eq!(t.s.state(), State::Chatting);
        assert_eq!(t.s.status().peer, Some(id("bob")));

        // A call from the peer we were handed goes back to Ready.
        let mut t = T::new(false);
        t.bridged(Some((id("bob"), addr(5000))));
        let (link, _) = t.call_from("bob", false);
        assert_eq!(t.s.state(), State::Ready);
        t.closed(link);
        assert!(matches!(t.s.phase, Phase::Ready { peer, .. } if peer == id("bob")));

        // Quit closes the pending link and answers the waiting `chat`.
        let mut t = T::new(false);
        let (chat, _) = calling(&mut t, "bob");
        let (link, _) = t.call_from("bob", false);
        let (_, a) = t.command(Command::Quit);
        assert!(a.contains(&Action::Close { link }), "{a:?}");
        assert!(reply_of(&a, chat).is_err());
        assert_eq!(t.s.state(), State::Idle);

        // The registration lapses meanwhile: nothing to go back to.
        let mut t = T::new(false);
        t.bridged(None);
        let (link, _) = t.call_from("bob", false);
        t.s.reg = None;
        t.s.phase_lost_with_registration();
        t.closed(link);
        assert!(matches!(t.s.phase, Phase::None), "{:?}", t.s.phase);
    }

    #[test]
    fn a_409_from_a_lower_id_stands_if_no_call_follows() {
        // An older bob, which refused with 409 when busy.
        let mut t = T::new(false);
        let (ticket, _) = refused_409(&mut t, "bob", "is busy in another chat");
        assert_eq!(t.s.poll_timeout(), Some(t.now + CROSSING_WAIT));
        t.advance(CROSSING_WAIT - Duration::from_millis(1));
        assert!(!replied(&t.drain(), ticket));
        t.advance(Duration::from_millis(1));
        let f = reply_of(&t.drain(), ticket).unwrap_err();
        assert!(f.message.contains("bob is busy"), "{f:?}");
        assert!(
            f.message.contains("no call from bob came within 2 s"),
            "{f:?}"
        );
        assert_eq!(t.s.state(), State::Registered);
    }

    #[test]
    fn quitting_while_awaiting_a_crossing_call_answers_the_chat() {
        let mut t = T::new(false);
        let (ticket, _) = refused_409(&mut t, "bob", "is calling you at the same time");
        let (_, a) = t.command(Command::Quit);
        assert!(reply_of(&a, ticket).is_err(), "{a:?}");
        assert!(
            !a.iter().any(|x| matches!(x, Action::Close { .. })),
            "{a:?}"
        );
    }

    #[test]
    fn incoming_chats_are_accepted_only_when_waiting() {
        let mut t = T::new(false);
        t.register();
        let (_, a) = t.call_from("eve", false);
        assert!(
            matches!(&a[..], [Action::Refuse { status: 403, .. }]),
            "{a:?}"
        );
        let link = t.chatting(false);
        assert_eq!(t.s.status().peer, Some(id("bob")));
        let (_, a) = t.call_from("eve", false);
        assert!(
            matches!(&a[..], [Action::Refuse { status: 503, reason, .. }] if reason.contains("busy")),
            "{a:?}"
        );
        // The chat is undisturbed.
        assert_eq!(t.s.state(), State::Chatting);
        let (_, a) = t.command(Command::Send { text: "x".into() });
        assert!(
            a.iter()
                .any(|x| matches!(x, Action::Send { link: l, .. } if *l == link))
        );
    }

    #[test]
    fn received_messages_are_stored_before_the_ack() {
        let mut t = T::new(false);
        let link = t.chatting(false);
        let a = t.input(Input::Frame {
            link,
            frame: PeerFrame::Message {
                id: 9,
                sent_ms: 0,
                text: "hi".into(),
            },
        });
        assert_eq!(
            a,
            vec![
                Action::Record(RecordKind::Message {
                    from: id("bob"),
                    to: id("me"),
                    text: "hi".into(),
                    outgoing: false,
                    delivered: Some(true)
                }),
                Action::Send {
                    link,
                    frame: PeerFrame::Ack { id: 9 }
                },
            ]
        );
        // Frames from another link are ignored.
        assert!(
            t.input(Input::Frame {
                link: link + 100,
                frame: PeerFrame::Bye
            })
            .is_empty()
        );
    }

    #[test]
    fn turns_alternate_starting_with_the_initiator() {
        let mut t = T::new(true);
        let link = t.chatting(true);
        assert_eq!(t.s.status().turn, Some(Turn::Mine));
        let (t1, a) = t.command(Command::Send { text: "1".into() });
        assert_eq!(sent_messages(&a).len(), 1);
        let _ = t1;
        let (t2, a) = t.command(Command::Send { text: "2".into() });
        let f = reply_of(&a, t2).unwrap_err();
        assert_eq!(f.kind, FailureKind::Turn);
        assert!(f.message.contains("not your turn"), "{f:?}");
        assert_eq!(t.s.status().turn, Some(Turn::Peers));
        t.input(Input::Frame {
            link,
            frame: PeerFrame::Message {
                id: 1,
                sent_ms: 0,
                text: "r".into(),
            },
        });
        let (_, a) = t.command(Command::Send { text: "3".into() });
        assert_eq!(sent_messages(&a).len(), 1);

        // The responder waits for the initiator.
        let mut r = T::new(true);
        r.chatting(false);
        let (t3, a) = r.command(Command::Send {
            text: "first?".into(),
        });
        assert_eq!(reply_of(&a, t3).unwrap_err().kind, FailureKind::Turn);
    }

    #[test]
    fn two_calls_crossing_settle_on_the_lower_ids() {
        // "me" calls bob while bob calls "me"; bob's id is the lower.
        for (peer, mine_wins) in [("bob", false), ("zed", true)] {
            let mut t = T::new(false);
            let (chat, own) = calling(&mut t, peer);
            let (theirs, a) = t.answered(peer, false);
            if mine_wins {
                assert!(
                    matches!(&a[..], [Action::Refuse { status: 409, reason, .. }] if reason.contains("at the same time")),
                    "{a:?}"
                );
                assert!(
                    matches!(t.s.phase, Phase::Connecting { call: Call::Dialing(link), .. } if link == own)
                );
            } else {
                assert!(a.contains(&Action::Close { link: own }), "{a:?}");
                assert!(a.contains(&Action::Accept { link: theirs }), "{a:?}");
                assert_eq!(reply_of(&a, chat), Ok(Reply::Chatting { peer: id(peer) }));
                assert_eq!(t.s.state(), State::Chatting);
                // The call it dropped, answering late, changes nothing.
                let a = t.input(Input::LinkUp {
                    link: own,
                    peer: id(peer),
                });
                assert_eq!(a, [Action::Close { link: own }]);
                assert_eq!(t.s.state(), State::Chatting);
            }
        }
    }

    #[test]
    fn the_responder_follows_the_initiators_turns() {
        for (mine, theirs) in [(false, true), (true, false)] {
            let mut r = T::new(mine);
            r.bridged(None);
            r.answered("bob", theirs);
            let (t, a) = r.command(Command::Send {
                text: "first?".into(),
            });
            if theirs {
                assert_eq!(reply_of(&a, t).unwrap_err().kind, FailureKind::Turn);
                assert_eq!(r.s.status().turn, Some(Turn::Peers));
            } else {
                assert_eq!(sent_messages(&a).len(), 1, "{a:?}");
                assert_eq!(r.s.status().turn, None);
            }
        }
    }

    #[test]
    fn without_turns_both_write_at_any_time() {
        let mut t = T::new(false);
        t.chatting(false);
        for i in 0..3 {
            let (_, a) = t.command(Command::Send {
                text: i.to_string(),
            });
            assert_eq!(sent_messages(&a).len(), 1);
        }
        assert_eq!(t.s.status().turn, None);
    }

    #[test]
    fn messages_are_validated() {
        let mut t = T::new(false);
        t.chatting(true);
        let (tk, a) = t.command(Command::Send {
            text: String::new(),
        });
        assert_eq!(reply_of(&a, tk).unwrap_err().kind, FailureKind::Invalid);
        let (tk, a) = t.command(Command::Send {
            text: "x".repeat(MAX_TEXT + 1),
        });
        assert!(reply_of(&a, tk).unwrap_err().message.contains("at most"));
    }

    #[test]
    fn pings_flow_and_silence_ends_the_chat_within_ten_seconds() {
        let mut t = T::new(false);
        let link = t.chatting(true);
        t.advance(Duration::from_secs(3));
        assert_eq!(
            t.drain(),
            vec![Action::Send {
                link,
                frame: PeerFrame::Ping
            }]
        );
        // A ping from the peer keeps the link alive.
        t.input(Input::Frame {
            link,
            frame: PeerFrame::Ping,
        });
        t.advance(Duration::from_secs(3));
        t.drain();
        let (ticket, _) = t.command(Command::Send {
            text: "lost?".into(),
        });
        t.advance(Duration::from_secs(3));
        t.drain();
        assert_eq!(t.s.state(), State::Chatting);
        // Then silence: 9 s after the peer's ping, the chat ends.
        let mut ended = Vec::new();
        for _ in 0..4 {
            t.advance(Duration::from_secs(3));
            ended.extend(t.drain());
        }
        assert_eq!(t.s.state(), State::Registered);
        assert!(ended.contains(&Action::Close { link }));
        // The history is told the message never arrived.
        assert!(ended.contains(&Action::Delivery {
            link,
            id: 1,
            delivered: false
        }));
        let f = reply_of(&ended, ticket).unwrap_err();
        assert!(
            f.message
                .contains("not delivered: lost bob (nothing heard for 9 s)"),
            "{f:?}"
        );
        assert!(ended.iter().any(|a| matches!(a, Action::Record(RecordKind::Notice { text }) if text.contains("lost bob"))));
    }

    #[test]
    fn a_peer_that_pings_but_never_acknowledges_is_left() {
        let mut t = T::new(false);
        let link = t.chatting(true);
        let (ticket, _) = t.command(Command::Send {
            text: "stored?".into(),
        });
        // It keeps pinging, so the link looks alive...
        let mut ended = Vec::new();
        for _ in 0..4 {
            t.input(Input::Frame {
                link,
                frame: PeerFrame::Ping,
            });
            t.advance(Duration::from_secs(3));
            ended.extend(t.drain());
        }
        // ...but the message was not acknowledged within 9 s.
        assert_eq!(t.s.state(), State::Registered);
        let f = reply_of(&ended, ticket).unwrap_err();
        assert!(
            f.message.contains("did not acknowledge within 9 s"),
            "{f:?}"
        );
        assert!(ended.contains(&Action::Delivery {
            link,
            id: 1,
            delivered: false
        }));
    }

    #[test]
    fn acknowledged_messages_do_not_time_out() {
        let mut t = T::new(false);
        let link = t.chatting(true);
        for round in 0..5u64 {
            let (_, a) = t.command(Command::Send { text: "x".into() });
            assert_eq!(sent_messages(&a).len(), 1);
            t.input(Input::Frame {
                link,
                frame: PeerFrame::Ack { id: round + 1 },
            });
            t.input(Input::Frame {
                link,
                frame: PeerFrame::Ping,
            });
            t.advance(Duration::from_secs(3));
            t.drain();
        }
        assert_eq!(t.s.state(), State::Chatting);
    }

    #[test]
    fn an_oversized_message_ends_the_link() {
        let mut t = T::new(false);
        let link = t.chatting(false);
        let a = t.input(Input::Frame {
            link,
            frame: PeerFrame::Message {
                id: 1,
                sent_ms: 0,
                text: "x".repeat(MAX_TEXT + 1),
            },
        });
        assert!(a.contains(&Action::Close { link }));
        assert!(
            !a.iter()
                .any(|x| matches!(x, Action::Record(RecordKind::Message { .. })))
        );
        assert_eq!(t.s.state(), State::Registered);
    }

    #[test]
    fn a_bridge_answer_after_a_chat_began_is_moot() {
        let mut t = T::new(false);
        t.bridged(None);
        // Waiting; a second bridge goes out, and a peer connects meanwhile.
        let (ticket, a) = t.command(Command::Bridge { peer: None });
        let (op, _) = T::server_op(&a);
        t.answered("bob", false);
        assert_eq!(t.s.state(), State::Chatting);
        let a = t.input(Input::ServerReply {
            op,
            result: Ok(Response::BridgeAck {
                peer: Some((id("carol"), addr(6000), KEY)),
            }),
        });
        assert_eq!(reply_of(&a, ticket).unwrap_err().kind, FailureKind::State);
        assert_eq!(t.s.state(), State::Chatting, "the chat is untouched");
        assert_eq!(t.s.status().peer, Some(id("bob")));
    }

    #[test]
    fn answers_sent_before_a_quit_do_not_register_again() {
        let mut t = T::new(false);
        t.register();
        t.advance(Duration::from_secs(150));
        let (refresh, _) = T::server_op(&t.drain());
        let (_, a) = t.command(Command::Quit);
        let (quit, _) = T::server_op(&a);
        t.input(Input::ServerReply {
            op: quit,
            result: Ok(Response::QuitAck),
        });
        // The refresh's answer comes after the quit.
        t.regack(refresh);
        assert_eq!(t.s.state(), State::Idle);
        assert_eq!(t.s.poll_timeout(), None, "nothing left to refresh");
        // Nor does a start-up retry after a quit.
        let mut t = T::new(false);
        t.s.register_automatically();
        let (op, _) = T::server_op(&t.drain());
        t.input(Input::ServerReply {
            op,
            result: Err("down".into()),
        });
        t.command(Command::Quit);
        assert_eq!(t.s.poll_timeout(), None);
    }

    #[test]
    fn waiting_is_said_again_at_every_refresh() {
        let mut t = T::new(false);
        t.bridged(None);
        t.advance(Duration::from_secs(150));
        let (op, _) = T::server_op(&t.drain());
        let a = t.regack(op);
        assert!(matches!(
            T::server_op(&a).1,
            Request::Bridge { peer: None, .. }
        ));
    }

    #[test]
    fn bye_and_a_closed_link_end_the_chat() {
        let mut t = T::new(false);
        let link = t.chatting(false);
        let (ticket, _) = t.command(Command::Send { text: "x".into() });
        let a = t.input(Input::Frame {
            link,
            frame: PeerFrame::Bye,
        });
        assert!(
            reply_of(&a, ticket)
                .unwrap_err()
                .message
                .contains("bob left the chat")
        );
        assert_eq!(t.s.state(), State::Registered);
        let mut t = T::new(false);
        let link = t.chatting(true);
        let a = t.input(Input::LinkClosed {
            link,
            reason: "connection reset".into(),
        });
        assert!(a.iter().any(|x| matches!(x, Action::Record(RecordKind::Notice { text }) if text == "lost bob: connection reset")));
        assert_eq!(t.s.state(), State::Registered);
    }

    #[test]
    fn quit_leaves_the_peer_and_the_server() {
        let mut t = T::new(false);
        let link = t.chatting(true);
        let (ticket, a) = t.command(Command::Quit);
        assert!(a.contains(&Action::Send {
            link,
            frame: PeerFrame::Bye
        }));
        assert!(a.contains(&Action::Close { link }));
        let (op, req) = T::server_op(&a);
        assert_eq!(
            req,
            Request::Quit {
                id: id("me"),
                token: TOKEN
            }
        );
        assert_eq!(t.s.state(), State::Idle);
        let a = t.input(Input::ServerReply {
            op,
            result: Ok(Response::QuitAck),
        });
        assert_eq!(reply_of(&a, ticket), Ok(Reply::Quit));
        // Quitting with nothing to leave succeeds.
        let mut fresh = T::new(false);
        let (ticket, a) = fresh.command(Command::Quit);
        assert_eq!(reply_of(&a, ticket), Ok(Reply::Quit));
    }

    #[test]
    fn a_quit_the_server_refuses_says_the_daemon_left_all_the_same() {
        let mut t = T::new(false);
        t.chatting(true);
        let (ticket, a) = t.command(Command::Quit);
        let (op, _) = T::server_op(&a);
        let a = t.input(Input::ServerReply {
            op,
            result: Ok(Response::Error(chat_proto::rendezvous::Failure {
                retry_after: Some(1),
                ..chat_proto::rendezvous::Failure::new(
                    chat_proto::rendezvous::ErrorStatus::TooManyRequests,
                    "rate limited",
                )
            })),
        });
        let message = reply_of(&a, ticket).unwrap_err().message;
        assert!(
            message.starts_with("left, but the server refused the QUIT")
                && message.contains("rate limited")
                && message.contains("chatctl quit"),
            "{message}"
        );
        assert_eq!(t.s.state(), State::Idle);
        // Asked again, the quit goes to the server again.
        let (_, a) = t.command(Command::Quit);
        assert!(matches!(T::server_op(&a).1, Request::Quit { .. }));
    }

    #[test]
    fn shutdown_says_bye_and_quits() {
        let mut t = T::new(false);
        let link = t.chatting(false);
        let a = t.input(Input::Shutdown);
        assert!(a.contains(&Action::Send {
            link,
            frame: PeerFrame::Bye
        }));
        assert_eq!(
            T::server_op(&a).1,
            Request::Quit {
                id: id("me"),
                token: TOKEN
            }
        );
    }

    #[test]
    fn state_records_follow_every_change_once() {
        let mut t = T::new(false);
        let mut all = Vec::new();
        t.register();
        let (_, a) = t.command(Command::Bridge { peer: None });
        all.extend(a.clone());
        let (op, _) = T::server_op(&a);
        all.extend(t.input(Input::ServerReply {
            op,
            result: Ok(Response::BridgeAck { peer: None }),
        }));
        let (link, accepted) = t.call_from("bob", false);
        all.extend(accepted);
        all.extend(t.input(Input::Frame {
            link,
            frame: PeerFrame::Bye,
        }));
        let states: Vec<State> = all
            .iter()
            .filter_map(|a| match a {
                Action::Record(RecordKind::State { state, .. }) => Some(*state),
                _ => None,
            })
            .collect();
        assert_eq!(
            states,
            vec![State::Waiting, State::Chatting, State::Registered]
        );
    }
}
