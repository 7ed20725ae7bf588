//! The registry: who is registered, at which address, and who waits for a
//! peer.
//!
//! It is a pure state machine: each call takes the current time (as the
//! duration since the server started) and returns the response to send; it
//! reads no clock and touches no socket, so expiry and pairing are tested
//! with a fake clock. The TCP and UDP transports share one registry.
//!
//! Memory is the constraint that shapes it: an entry is 48 bytes plus its
//! 33-byte key, so a million registrations fit in under 200 MB of hash table.

use std::collections::hash_map::{Entry, OccupiedEntry, VacantEntry};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use chat_proto::rendezvous::{ErrorStatus, Failure, Request, Response};
use chat_proto::{ClientId, Token};

use crate::limits::{FULL_SWEEP_EVERY, Throttle};

/// What the registry is told at start-up.
#[derive(Clone, Debug)]
pub struct Config {
    /// Lifetime of a registration unless refreshed.
    pub expires: Duration,
    /// Most registrations held at once; 0 means no limit.
    pub max_registrations: usize,
}

/// `Entry::seq` values that are not positions in the waiting queue.
const IDLE: u64 = 0;
const BUSY: u64 = u64::MAX;

/// Whether `seq` is a place in the waiting queue.
const fn in_queue(seq: u64) -> bool {
    seq != IDLE && seq != BUSY
}

/// One registration, kept small (see the module comment).
struct Record {
    token: Token,
    // IPv4 addresses are stored IPv4-mapped, which costs one byte less than
    // `IpAddr` and keeps the entry at 48 bytes.
    ip: Ipv6Addr,
    port: u16,
    /// Whole seconds since start at which the registration lapses.
    expires_at: u32,
    /// `IDLE`, `BUSY`, or the entry's position in `waiting`.
    seq: u64,
}

impl Record {
    fn addr(&self) -> SocketAddr {
        let ip = match self.ip.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(self.ip),
        };
        SocketAddr::new(ip, self.port)
    }

    fn live(&self, now: Duration) -> bool {
        now.as_secs() < u64::from(self.expires_at)
    }
}

/// Where a new registration goes.
enum Slot<'a> {
    Occupied(OccupiedEntry<'a, ClientId, Record>),
    Vacant(VacantEntry<'a, ClientId, Record>),
}

/// The state of one client as the registry sees it (for tests and stats).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientState {
    Registered,
    Waiting,
    Busy,
}

/// All registrations and the queue of clients waiting for a peer.
pub struct Registry {
    config: Config,
    clients: HashMap<ClientId, Record>,
    /// Waiting clients by arrival: first come, first served.
    waiting: BTreeMap<u64, ClientId>,
    next_seq: u64,
    full_sweep: Throttle,
}

impl Registry {
    pub fn new(config: Config) -> Registry {
        // Sized for the configured maximum up front (capped, so a huge
        // limit does not reserve memory it may never use): growing a
        // table of a million entries rehashes all of them at once. Only
        // the touched pages of the reservation become resident.
        let reserve = config.max_registrations.min(1 << 20);
        Registry {
            config,
            clients: HashMap::with_capacity(reserve),
            waiting: BTreeMap::new(),
            next_seq: 1,
            full_sweep: Throttle::new(FULL_SWEEP_EVERY),
        }
    }

    /// Live and not yet swept registrations.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// The state of `id`, if it holds a live registration.
    pub fn state(&self, id: &ClientId, now: Duration) -> Option<ClientState> {
        let e = self.clients.get(id).filter(|e| e.live(now))?;
        Some(match e.seq {
            IDLE => ClientState::Registered,
            BUSY => ClientState::Busy,
            _ => ClientState::Waiting,
        })
    }

    /// Acts on one request from `source` (the address the server observed).
    ///
    /// `fresh_token` is called only when a new registration needs a token;
    /// its failure (no randomness) becomes a 503.
    pub fn handle<E>(
        &mut self,
        request: &Request,
        source: IpAddr,
        now: Duration,
        fresh_token: impl FnOnce() -> Result<Token, E>,
    ) -> Response {
        let result = match *request {
            Request::Probe => {
                return Response::Error(Failure::bad_request(
                    "PROBE is answered by the transport, not the registry",
                ));
            }
            Request::Register { id, port, token } => {
                self.register(id, port, token, source, now, fresh_token)
            }
            Request::Bridge { id, token, peer } => self.bridge(id, token, peer, now),
            Request::Chat { id, token, peer } => self.chat(id, token, peer, now),
            Request::Quit { id, token } => self.quit(id, token, now),
        };
        result.unwrap_or_else(Response::Error)
    }

    fn register<E>(
        &mut self,
        id: ClientId,
        port: u16,
        token: Option<Token>,
        source: IpAddr,
        now: Duration,
        fresh_token: impl FnOnce() -> Result<Token, E>,
    ) -> Result<Response, Failure> {
        let ip = match source {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        let expires_at = self.deadline(now);
        let expires = self.config.expires.as_secs() as u32;
        let max = self.config.max_registrations;
        if max != 0 && self.clients.len() >= max && !self.clients.contains_key(&id) {
            self.make_room(now);
            if self.clients.len() >= max {
                return Err(Failure {
                    retry_after: Some(60),
                    ..Failure::new(
                        ErrorStatus::Unavailable,
                        format!("server full: {max} clients are registered; try again later"),
                    )
                });
            }
        }
        // One hash-table probe for the common cases (a fresh id, a
        // refresh): at a million entries each probe is a cache miss.
        let mut lapsed_seq = None;
        let slot = match self.clients.entry(id) {
            Entry::Occupied(o) if o.get().live(now) => {
                let e = o.into_mut();
                if token != Some(e.token) {
                    return Err(Failure::new(
                        ErrorStatus::RegNack,
                        format!(
                            "id {id} is registered by another client: choose another id, or send its Client-Token to refresh"
                        ),
                    ));
                }
                // A refresh: the token stays, so that a lost response
                // cannot lock the client out; the contact follows the
                // client.
                e.ip = ip;
                e.port = port;
                e.expires_at = expires_at;
                return Ok(Response::RegAck {
                    id,
                    addr: e.addr(),
                    token: e.token,
                    expires,
                });
            }
            // Lapsed but not swept yet: the id is free again.
            Entry::Occupied(o) => {
                lapsed_seq = Some(o.get().seq);
                Slot::Occupied(o)
            }
            Entry::Vacant(v) => Slot::Vacant(v),
        };
        let token = fresh_token().map_err(|_| {
            Failure::new(
                ErrorStatus::Unavailable,
                "server cannot make a token right now; try again",
            )
        })?;
        let entry = Record {
            token,
            ip,
            port,
            expires_at,
            seq: IDLE,
        };
        let addr = entry.addr();
        match slot {
            Slot::Occupied(mut o) => {
                o.insert(entry);
            }
            Slot::Vacant(v) => {
                v.insert(entry);
            }
        }
        if let Some(seq) = lapsed_seq.filter(|&s| in_queue(s)) {
            self.waiting.remove(&seq);
        }
        Ok(Response::RegAck {
            id,
            addr,
            token,
            expires,
        })
    }

    /// When full, drop lapsed registrations, but at most once a second: a
    /// sweep walks the whole table, and a flood of REGISTERs against a
    /// full server must not make it walk the table for each one.
    fn make_room(&mut self, now: Duration) {
        if self.full_sweep.ready(now) {
            self.sweep(now);
        }
    }

    fn bridge(
        &mut self,
        id: ClientId,
        token: Token,
        peer: Option<ClientId>,
        now: Duration,
    ) -> Result<Response, Failure> {
        self.authenticate(id, token, now)?;
        let found = match peer {
            Some(p) if p == id => {
                return Err(Failure::bad_request(
                    "Peer-Id is your own id: name another client",
                ));
            }
            Some(p) => {
                let e = self.live(&p, now).ok_or_else(|| unknown(&p))?;
                if !in_queue(e.seq) {
                    return Err(Failure::new(
                        ErrorStatus::Conflict,
                        format!(
                            "{p} is not waiting for a peer: ask it to BRIDGE, or BRIDGE without Peer-Id"
                        ),
                    ));
                }
                Some((p, e.addr()))
            }
            None => self.longest_waiting_other(id, now),
        };
        match found {
            Some((p, addr)) => {
                // The caller has its peer, so it stops waiting for one.
                self.set_seq(id, IDLE);
                Ok(Response::BridgeAck {
                    peer: Some((p, addr)),
                })
            }
            None => {
                let waiting = self.clients.get(&id).is_some_and(|e| in_queue(e.seq));
                if !waiting {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    self.set_seq(id, seq);
                }
                Ok(Response::BridgeAck { peer: None })
            }
        }
    }

    /// The waiting client that came first, other than `id`; lapsed ones
    /// met on the way are dropped, so they are never handed out.
    fn longest_waiting_other(
        &mut self,
        id: ClientId,
        now: Duration,
    ) -> Option<(ClientId, SocketAddr)> {
        let mut lapsed = Vec::new();
        let mut found = None;
        for (_, candidate) in self.waiting.iter() {
            if *candidate == id {
                continue;
            }
            match self.clients.get(candidate) {
                Some(e) if e.live(now) => {
                    found = Some((*candidate, e.addr()));
                    break;
                }
                _ => lapsed.push(*candidate),
            }
        }
        for c in lapsed {
            self.remove(&c);
        }
        found
    }

    fn chat(
        &mut self,
        id: ClientId,
        token: Token,
        peer: ClientId,
        now: Duration,
    ) -> Result<Response, Failure> {
        self.authenticate(id, token, now)?;
        if peer == id {
            return Err(Failure::bad_request(
                "Peer-Id is your own id: name the peer you chat with",
            ));
        }
        let p = self.live(&peer, now).ok_or_else(|| unknown(&peer))?;
        // A chat starts with a client that waits for one (or already
        // chats, when CHAT is repeated); otherwise any registered client
        // could take any idle one out of play.
        if p.seq == IDLE {
            return Err(Failure::new(
                ErrorStatus::Conflict,
                format!("{peer} is not waiting for a chat: BRIDGE to be handed a waiting client"),
            ));
        }
        // The two chat directly now; the server only needs to stop handing
        // either of them out.
        self.set_seq(id, BUSY);
        self.set_seq(peer, BUSY);
        Ok(Response::ChatAck)
    }

    fn quit(&mut self, id: ClientId, token: Token, now: Duration) -> Result<Response, Failure> {
        self.authenticate(id, token, now)?;
        self.remove(&id);
        Ok(Response::QuitAck)
    }

    fn authenticate(&self, id: ClientId, token: Token, now: Duration) -> Result<(), Failure> {
        let e = self.live(&id, now).ok_or_else(|| {
            Failure::new(
                ErrorStatus::NotFound,
                format!("{id} is not registered (or its registration expired): REGISTER first"),
            )
        })?;
        if e.token != token {
            return Err(Failure::new(
                ErrorStatus::Unauthorized,
                format!("wrong Client-Token for {id}: send the token REGISTER returned"),
            ));
        }
        Ok(())
    }

    fn live(&self, id: &ClientId, now: Duration) -> Option<&Record> {
        self.clients.get(id).filter(|e| e.live(now))
    }

    fn set_seq(&mut self, id: ClientId, seq: u64) {
        if let Some(e) = self.clients.get_mut(&id) {
            if in_queue(e.seq) {
                self.waiting.remove(&e.seq);
            }
            e.seq = seq;
            if in_queue(seq) {
                self.waiting.insert(seq, id);
            }
        }
    }

    fn remove(&mut self, id: &ClientId) {
        if let Some(e) = self.clients.remove(id)
            && in_queue(e.seq)
        {
            self.waiting.remove(&e.seq);
        }
    }

    fn deadline(&self, now: Duration) -> u32 {
        // Rounding the start up means a registration never lapses early.
        let start = now.as_secs() + u64::from(now.subsec_nanos() > 0);
        (start + self.config.expires.as_secs()).min(u64::from(u32::MAX)) as u32
    }

    /// Drops every lapsed registration; returns how many. The server calls
    /// it now and then so that memory follows the live count.
    pub fn sweep(&mut self, now: Duration) -> usize {
        let before = self.clients.len();
        let waiting = &mut self.waiting;
        self.clients.retain(|_, e| {
            let keep = e.live(now);
            if !keep && in_queue(e.seq) {
                waiting.remove(&e.seq);
            }
            keep
        });
        before - self.clients.len()
    }
}

fn unknown(id: &ClientId) -> Failure {
    Failure::new(
        ErrorStatus::NotFound,
        format!("no client {id} is registered"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    fn id(s: &str) -> ClientId {
        s.parse().unwrap()
    }

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    struct Harness {
        reg: Registry,
        next_token: u8,
    }

    impl Harness {
        fn new(expires: u64, max: usize) -> Harness {
            Harness {
                reg: Registry::new(Config {
                    expires: Duration::from_secs(expires),
                    max_registrations: max,
                }),
                next_token: 1,
            }
        }

        fn send(&mut self, r: Request, now: Duration) -> Response {
            let t = Token::from_bytes([self.next_token; 16]);
            let r = self.reg.handle(&r, IP, now, || Ok::<_, Infallible>(t));
            if matches!(r, Response::RegAck { token, .. } if token == t) {
                self.next_token += 1;
            }
            r
        }

        fn register(&mut self, name: &str, port: u16, now: Duration) -> Token {
            match self.send(
                Request::Register {
                    id: id(name),
                    port,
                    token: None,
                },
                now,
            ) {
                Response::RegAck { token, .. } => token,
                other => panic!("register {name}: {other:?}"),
            }
        }

        fn bridge(
            &mut self,
            name: &str,
            token: Token,
            peer: Option<&str>,
            now: Duration,
        ) -> Response {
            self.send(
                Request::Bridge {
                    id: id(name),
                    token,
                    peer: peer.map(id),
                },
                now,
            )
        }
    }

    fn status(r: &Response) -> u16 {
        match r {
            Response::Error(f) => f.status.code(),
            _ => 200,
        }
    }

    fn peer_of(r: &Response) -> Option<String> {
        match r {
            Response::BridgeAck { peer } => peer.map(|(p, _)| p.to_string()),
            other => panic!("not a BRIDGEACK: {other:?}"),
        }
    }

    #[test]
    fn register_records_the_observed_address_and_a_token() {
        let mut h = Harness::new(300, 0);
        let r = h.send(
            Request::Register {
                id: id("alice"),
                port: 4000,
                token: None,
            },
            secs(0.0),
        );
        let Response::RegAck {
            id: got,
            addr,
            expires,
            ..
        } = r
        else {
            panic!("{r:?}")
        };
        assert_eq!(got, id("alice"));
        assert_eq!(addr, "192.0.2.1:4000".parse().unwrap());
        assert_eq!(expires, 300);
        assert_eq!(
            h.reg.state(&id("alice"), secs(1.0)),
            Some(ClientState::Registered)
        );
    }

    #[test]
    fn ipv6_sources_are_kept_as_ipv6() {
        let mut reg = Registry::new(Config {
            expires: Duration::from_secs(10),
            max_registrations: 0,
        });
        let src: IpAddr = "2001:db8::7".parse().unwrap();
        let r = reg.handle(
            &Request::Register {
                id: id("v6"),
                port: 9,
                token: None,
            },
            src,
            secs(0.0),
            || Ok::<_, Infallible>(Token::from_bytes([1; 16])),
        );
        let Response::RegAck { addr, .. } = r else {
            panic!("{r:?}")
        };
        assert_eq!(addr, "[2001:db8::7]:9".parse().unwrap());
    }

    #[test]
    fn id_held_under_another_token_is_refused() {
        let mut h = Harness::new(300, 0);
        let t = h.register("alice", 4000, secs(0.0));
        let r = h.send(
            Request::Register {
                id: id("alice"),
                port: 4001,
                token: None,
            },
            secs(1.0),
        );
        assert_eq!(status(&r), 409);
        let wrong = Token::from_bytes([0xee; 16]);
        let r = h.send(
            Request::Register {
                id: id("alice"),
                port: 4001,
                token: Some(wrong),
            },
            secs(1.0),
        );
        assert_eq!(status(&r), 409);
        assert!(matches!(
            r,
            Response::Error(Failure {
                status: ErrorStatus::RegNack,
                ..
            })
        ));
        // The holder is untouched.
        let r = h.send(
            Request::Register {
                id: id("alice"),
                port: 4002,
                token: Some(t),
            },
            secs(2.0),
        );
        assert_eq!(status(&r), 200);
    }

    #[test]
    fn refresh_keeps_the_token_and_extends_the_lifetime() {
        let mut h = Harness::new(10, 0);
        let t = h.register("alice", 4000, secs(0.0));
        let r = h.send(
            Request::Register {
                id: id("alice"),
                port: 4001,
                token: Some(t),
            },
            secs(9.0),
        );
        let Response::RegAck { token, addr, .. } = r else {
            panic!("{r:?}")
        };
        assert_eq!(token, t);
        assert_eq!(addr.port(), 4001);
        // Without the refresh it would have lapsed at 10 s.
        assert_eq!(
            h.reg.state(&id("alice"), secs(18.5)),
            Some(ClientState::Registered)
        );
        assert_eq!(h.reg.state(&id("alice"), secs(19.0)), None);
    }

    #[test]
    fn expiry_is_never_early_and_frees_the_id() {
        let mut h = Harness::new(10, 0);
        h.register("alice", 4000, secs(0.5));
        assert_eq!(
            h.reg.state(&id("alice"), secs(10.49)),
            Some(ClientState::Registered)
        );
        assert_eq!(h.reg.state(&id("alice"), secs(11.0)), None);
        // Another client may take the lapsed id, without the old token.
        let r = h.send(
            Request::Register {
                id: id("alice"),
                port: 5000,
                token: None,
            },
            secs(11.0),
        );
        assert_eq!(status(&r), 200);
    }

    #[test]
    fn an_expired_client_is_never_handed_out() {
        let mut h = Harness::new(10, 0);
        let a = h.register("alice", 1, secs(0.0));
        assert_eq!(peer_of(&h.bridge("alice", a, None, secs(0.0))), None);
        let b = h.register("bob", 2, secs(20.0));
        // alice lapsed at 10 s: bob waits instead of getting her.
        assert_eq!(peer_of(&h.bridge("bob", b, None, secs(20.0))), None);
        assert_eq!(status(&h.bridge("bob", b, Some("alice"), secs(20.0))), 404);
        assert_eq!(
            h.reg.state(&id("bob"), secs(20.0)),
            Some(ClientState::Waiting)
        );
    }

    #[test]
    fn bridge_pairs_first_come_first_served() {
        let mut h = Harness::new(300, 0);
        let a = h.register("a", 1, secs(0.0));
        let b = h.register("b", 2, secs(0.0));
        let c = h.register("c", 3, secs(0.0));
        assert_eq!(peer_of(&h.bridge("a", a, None, secs(1.0))), None);
        assert_eq!(h.reg.state(&id("a"), secs(1.0)), Some(ClientState::Waiting));
        // b is handed a, the one waiting longest, and does not wait itself.
        let r = h.bridge("b", b, None, secs(2.0));
        let Response::BridgeAck {
            peer: Some((p, addr)),
        } = r
        else {
            panic!("{r:?}")
        };
        assert_eq!((p, addr), (id("a"), "192.0.2.1:1".parse().unwrap()));
        assert_eq!(
            h.reg.state(&id("b"), secs(2.0)),
            Some(ClientState::Registered)
        );
        // a keeps waiting until a CHAT, so c is handed a as well.
        assert_eq!(
            peer_of(&h.bridge("c", c, None, secs(3.0))).as_deref(),
            Some("a")
        );
    }

    #[test]
    fn bridging_again_while_waiting_keeps_the_place() {
        let mut h = Harness::new(300, 0);
        let a = h.register("a", 1, secs(0.0));
        let b = h.register("b", 2, secs(0.0));
        let c = h.register("c", 3, secs(0.0));
        assert_eq!(peer_of(&h.bridge("a", a, None, secs(1.0))), None);
        assert_eq!(peer_of(&h.bridge("a", a, None, secs(2.0))), None);
        // c cannot be taken into a chat it did not wait for.
        assert_eq!(
            status(&h.send(
                Request::Chat {
                    id: id("b"),
                    token: b,
                    peer: id("c"),
                },
                secs(3.0),
            )),
            409
        );
        // b and c bridge: a, who came first, is handed to both.
        assert_eq!(
            peer_of(&h.bridge("b", b, None, secs(4.0))).as_deref(),
            Some("a")
        );
        assert_eq!(
            peer_of(&h.bridge("c", c, None, secs(4.0))).as_deref(),
            Some("a")
        );
    }

    #[test]
    fn bridge_with_peer_id() {
        let mut h = Harness::new(300, 0);
        let a = h.register("a", 1, secs(0.0));
        let b = h.register("b", 2, secs(0.0));
        assert_eq!(status(&h.bridge("a", a, Some("nobody"), secs(1.0))), 404);
        assert_eq!(status(&h.bridge("a", a, Some("b"), secs(1.0))), 409);
        assert_eq!(status(&h.bridge("a", a, Some("a"), secs(1.0))), 400);
        assert_eq!(peer_of(&h.bridge("b", b, None, secs(1.0))), None);
        assert_eq!(
            peer_of(&h.bridge("a", a, Some("b"), secs(2.0))).as_deref(),
            Some("b")
        );
    }

    #[test]
    fn chat_makes_both_busy_and_out_of_the_pool() {
        let mut h = Harness::new(300, 0);
        let a = h.register("a", 1, secs(0.0));
        let b = h.register("b", 2, secs(0.0));
        let c = h.register("c", 3, secs(0.0));
        h.bridge("a", a, None, secs(0.0));
        assert_eq!(
            peer_of(&h.bridge("b", b, None, secs(0.0))).as_deref(),
            Some("a")
        );
        assert_eq!(
            status(&h.send(
                Request::Chat {
                    id: id("b"),
                    token: b,
                    peer: id("a")
                },
                secs(1.0)
            )),
            200
        );
        assert_eq!(h.reg.state(&id("a"), secs(1.0)), Some(ClientState::Busy));
        assert_eq!(h.reg.state(&id("b"), secs(1.0)), Some(ClientState::Busy));
        // Nobody is handed out now: c waits.
        assert_eq!(peer_of(&h.bridge("c", c, None, secs(2.0))), None);
        assert_eq!(status(&h.bridge("c", c, Some("a"), secs(2.0))), 409);
        // A busy client that bridges again rejoins.
        assert_eq!(
            peer_of(&h.bridge("a", a, None, secs(3.0))).as_deref(),
            Some("c")
        );
    }

    #[test]
    fn chat_errors() {
        let mut h = Harness::new(300, 0);
        let a = h.register("a", 1, secs(0.0));
        assert_eq!(
            status(&h.send(
                Request::Chat {
                    id: id("a"),
                    token: a,
                    peer: id("x")
                },
                secs(0.0)
            )),
            404
        );
        assert_eq!(
            status(&h.send(
                Request::Chat {
                    id: id("a"),
                    token: a,
                    peer: id("a")
                },
                secs(0.0)
            )),
            400
        );
    }

    #[test]
    fn tokens_are_checked_on_every_request() {
        let mut h = Harness::new(300, 0);
        let a = h.register("a", 1, secs(0.0));
        h.register("b", 2, secs(0.0));
        let wrong = Token::from_bytes([0xaa; 16]);
        for r in [
            Request::Bridge {
                id: id("a"),
                token: wrong,
                peer: None,
            },
            Request::Chat {
                id: id("a"),
                token: wrong,
                peer: id("b"),
            },
            Request::Quit {
                id: id("a"),
                token: wrong,
            },
        ] {
            assert_eq!(status(&h.send(r, secs(1.0))), 401);
        }
        assert_eq!(
            h.reg.state(&id("a"), secs(1.0)),
            Some(ClientState::Registered)
        );
        // Unknown ids are 404 whatever the token.
        assert_eq!(
            status(&h.send(
                Request::Quit {
                    id: id("zz"),
                    token: a
                },
                secs(1.0)
            )),
            404
        );
    }

    #[test]
    fn quit_removes_and_frees_the_id() {
        let mut h = Harness::new(300, 0);
        let a = h.register("a", 1, secs(0.0));
        h.bridge("a", a, None, secs(0.0));
        assert_eq!(
            status(&h.send(
                Request::Quit {
                    id: id("a"),
                    token: a
                },
                secs(1.0)
            )),
            200
        );
        assert_eq!(h.reg.state(&id("a"), secs(1.0)), None);
        assert!(h.reg.waiting.is_empty());
        assert_eq!(
            status(&h.send(
                Request::Quit {
                    id: id("a"),
                    token: a
                },
                secs(1.0)
            )),
            404
        );
        h.register("a", 9, secs(2.0));
    }

    #[test]
    fn max_registrations_gives_503_until_one_lapses() {
        let mut h = Harness::new(10, 2);
        let a = h.register("a", 1, secs(0.0));
        h.register("b", 2, secs(5.0));
        let r = h.send(
            Request::Register {
                id: id("c"),
                port: 3,
                token: None,
            },
            secs(6.0),
        );
        assert_eq!(status(&r), 503);
        // Refreshing an existing registration is never refused for space.
        let r = h.send(
            Request::Register {
                id: id("a"),
                port: 1,
                token: Some(a),
            },
            secs(6.0),
        );
        assert_eq!(status(&r), 200);
        // b lapses at 15 s and makes room.
        let r = h.send(
            Request::Register {
                id: id("c"),
                port: 3,
                token: None,
            },
            secs(15.0),
        );
        assert_eq!(status(&r), 200);
        assert_eq!(h.reg.len(), 2);
    }

    #[test]
    fn a_full_registry_sweeps_at_most_once_a_second() {
        let mut h = Harness::new(10, 1);
        h.register("a", 1, secs(0.0));
        let full = |h: &mut Harness, t| {
            status(&h.send(
                Request::Register {
                    id: id("b"),
                    port: 2,
                    token: None,
                },
                secs(t),
            ))
        };
        assert_eq!(full(&mut h, 9.5), 503);
        // a lapsed at 10 s, but the last sweep was under a second ago.
        assert_eq!(full(&mut h, 10.2), 503);
        assert_eq!(full(&mut h, 10.6), 200);
    }

    #[test]
    fn token_failure_is_503_and_stores_nothing() {
        let mut reg = Registry::new(Config {
            expires: Duration::from_secs(10),
            max_registrations: 0,
        });
        let r = reg.handle(
            &Request::Register {
                id: id("a"),
                port: 1,
                token: None,
            },
            IP,
            secs(0.0),
            || Err(()),
        );
        assert_eq!(status(&r), 503);
        assert!(reg.is_empty());
    }

    #[test]
    fn sweep_drops_lapsed_entries_and_their_places() {
        let mut h = Harness::new(10, 0);
        let a = h.register("a", 1, secs(0.0));
        h.bridge("a", a, None, secs(0.0));
        h.register("b", 2, secs(8.0));
        assert_eq!(h.reg.sweep(secs(12.0)), 1);
        assert_eq!(h.reg.len(), 1);
        assert!(h.reg.waiting.is_empty());
    }

    #[test]
    fn entries_stay_small() {
        // The memory target (256 bytes per registration with hash-table
        // overhead) rests on this.
        assert!(std::mem::size_of::<(ClientId, Record)>() <= 88);
    }
}
