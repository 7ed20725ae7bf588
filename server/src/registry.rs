//! The registry: who is registered, at which address, and who waits for a
//! peer.
//!
//! It is a pure state machine: each call takes the current time (as the
//! duration since the server started) and returns the response to send; it
//! reads no clock and touches no socket, so expiry and pairing are tested
//! with a fake clock. The TCP and UDP transports share one registry.
//!
//! Its layout follows from one fact: at a million registrations nothing
//! fits in a cache, so a REGISTER costs about as much as the number of
//! places in memory it touches at random. Records sit in a queue in the
//! order they were queued, which is the order they lapse in (a
//! registration lives `expires` seconds from its last REGISTER): a new
//! record is appended next to the last one, and expiry pops records from
//! the front, both in sequence. A small index ([`crate::index`]) maps an
//! id's hash to its record's position, 8 bytes a slot, so a fresh REGISTER
//! touches one cache line of it at random, asked for before the registry's
//! lock is taken ([`Lookahead`]). Expiry does not touch the index at all:
//! it leaves the slot pointing before the front, and such stale slots are
//! purged in one sequential pass when the index would otherwise grow.
//! Expiry itself pops a few records per request, never walking the whole
//! registry under the lock; the purge is the one pass that walks the index
//! (about 20 ms at 1.4 million entries, once every few seconds of such
//! churn: `cargo run --release -p chat-server --example registry`).

use std::collections::{BTreeMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use chat_proto::crypto::PeerKey;
use chat_proto::rendezvous::{ErrorStatus, Failure, IN_A_CHAT, Request, Response};
use chat_proto::{ClientId, Token};

use crate::index::{Index, Slot, Whereabouts};

/// What the registry is told at start-up.
#[derive(Clone, Debug)]
pub struct Config {
    /// Lifetime of a registration unless refreshed.
    pub expires: Duration,
    /// Most registrations held at once; 0 means no limit.
    pub max_registrations: usize,
}

/// `Record::seq` values that are not positions in the waiting queue.
const IDLE: u64 = 0;
const BUSY: u64 = u64::MAX;
/// The client quit; the record waits in the queue to be popped or reused.
const GONE: u64 = u64::MAX - 1;

/// Whether `seq` is a place in the waiting queue.
const fn in_queue(seq: u64) -> bool {
    seq != IDLE && seq != BUSY && seq != GONE
}

/// Records due to be popped that each request pops on its way: more than
/// one, so that expiry keeps up with requests that each queue one record.
const POP_PER_REQUEST: usize = 4;

/// Records a full registry pops to make room for one more, at most: enough
/// to get past a run of quit records, few enough that one request never
/// stalls the others.
const POP_TO_MAKE_ROOM: usize = 1024;

/// Quit records tolerated beside the held ones before the queue is
/// compacted (see [`Registry::compact`]); below this a compaction would
/// cost more than the memory it saves.
const MIN_COMPACT: usize = 4096;

/// One registration, kept small (see the module comment).
struct Record {
    id: ClientId,
    token: Token,
    // IPv4 addresses are stored IPv4-mapped, which costs one byte less than
    // `IpAddr` and keeps the record at 88 bytes.
    ip: Ipv6Addr,
    port: u16,
    /// Whole seconds since start at which the registration lapses.
    expires_at: u32,
    /// `expires_at` as it was when the record was queued. The queue is in
    /// this order; a record refreshed since is queued again when it
    /// reaches the front.
    queued_until: u32,
    /// The id's hash, so that neither a requeue nor a rebuilt index hashes
    /// the id again.
    hash: u32,
    /// `IDLE`, `BUSY`, `GONE`, or the record's place in `waiting`.
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

/// What a REGISTER's caller can do before it takes the registry's lock:
/// hash the id and ask the CPU for the id's index line. At a million
/// registrations that line is a cache miss, and the registry's own
/// prefetch left it too little time to arrive. Asked for here, it loads
/// while the caller makes the token and waits for the lock. Measured
/// through sockets (`bench/ab.sh`, keep-alive 64): REGISTER/PROBE 2-5%
/// higher than with the prefetch under the lock (docs/BENCHMARKS.md).
#[derive(Clone, Debug)]
pub struct Lookahead {
    hasher: RandomState,
    lines: Arc<Whereabouts>,
}

impl Lookahead {
    /// `id`'s hash for [`Registry::handle`], its index line on its way.
    pub fn register(&self, id: &ClientId) -> Hashed {
        let hash = hash_with(&self.hasher, id);
        self.lines.prefetch(hash);
        Hashed(hash)
    }
}

/// An id's hash, made by its registry's [`Lookahead`].
#[derive(Clone, Copy, Debug)]
pub struct Hashed(u32);

/// The state of one client as the registry sees it (for tests).
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientState {
    Registered,
    Waiting,
    Busy,
}

/// All registrations and the queue of clients waiting for a peer.
pub struct Registry {
    config: Config,
    /// Every record, in the order it was queued (see the module comment).
    queue: VecDeque<Record>,
    /// The position of `queue[0]`. Positions count up, wrapping, so a
    /// record keeps its position while the front moves.
    front: u32,
    /// Id hash → position. May hold stale slots (before the front); a slot
    /// is trusted only once the record it points to has the right id.
    index: Index,
    /// SipHash with a random key: ids come from clients, and a keyed hash
    /// keeps them from choosing ids that collide.
    hasher: RandomState,
    /// Where `index`'s table is, for [`Lookahead`]s.
    lines: Arc<Whereabouts>,
    /// Registrations held: live, or lapsed and not popped yet. Every other
    /// record in the queue is a quit one (see `gone`).
    held: usize,
    /// The latest `queued_until` pushed to the back. Kept here rather than
    /// read off the back record, whose line the other worker has often
    /// just written: reading it was a wait for that line at every fresh
    /// REGISTER (`perf annotate`, docs/BENCHMARKS.md).
    back_until: u32,
    /// Waiting clients by arrival: first come, first served.
    waiting: BTreeMap<u64, ClientId>,
    next_seq: u64,
}

impl Registry {
    pub fn new(config: Config) -> Registry {
        // Sized for the configured maximum up front (capped, so a huge
        // limit does not reserve memory it may never use): growing a
        // queue or an index of a million entries moves all of them at
        // once. Only the touched pages of the reservation become resident.
        let reserve = config.max_registrations.min(1 << 20);
        let registry = Registry {
            config,
            queue: VecDeque::with_capacity(reserve),
            front: 0,
            index: Index::with_capacity(reserve),
            hasher: RandomState::new(),
            lines: Arc::default(),
            held: 0,
            back_until: 0,
            waiting: BTreeMap::new(),
            next_seq: 1,
        };
        registry.lines.publish(&registry.index);
        registry
    }

    /// A [`Lookahead`] for this registry, to keep beside its lock.
    pub fn lookahead(&self) -> Lookahead {
        Lookahead {
            hasher: self.hasher.clone(),
            lines: Arc::clone(&self.lines),
        }
    }

    /// Registrations held: live ones, and lapsed ones not dropped yet.
    pub fn len(&self) -> usize {
        self.held
    }

    pub fn is_empty(&self) -> bool {
        self.held == 0
    }

    /// The state of `id`, if it holds a live registration.
    #[cfg(test)]
    pub fn state(&self, id: &ClientId, now: Duration) -> Option<ClientState> {
        let e = self.live(id, now)?;
        Some(match e.seq {
            IDLE => ClientState::Registered,
            BUSY => ClientState::Busy,
            _ => ClientState::Waiting,
        })
    }

    /// Acts on one request from `source`: the address the server observed,
    /// or the client a trusted proxy named (`crate::proxy`).
    ///
    /// `hashed` is a REGISTER's id as this registry's [`Lookahead`] hashed
    /// it, if the caller did. `fresh_token` is called only when a new
    /// registration needs a token; its failure (no randomness) becomes a
    /// 503.
    pub fn handle<E>(
        &mut self,
        request: &Request,
        hashed: Option<Hashed>,
        source: IpAddr,
        now: Duration,
        fresh_token: impl FnOnce() -> Result<Token, E>,
    ) -> Response {
        let response = self.act(request, hashed, source, now, fresh_token);
        // A REGISTER may have grown the index, a pop shrunk it.
        self.lines.publish(&self.index);
        response
    }

    fn act<E>(
        &mut self,
        request: &Request,
        hashed: Option<Hashed>,
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
                // The server hashes ahead (and asks for the index line);
                // a caller that did not is only slower.
                let hash = match hashed {
                    Some(Hashed(hash)) => {
                        debug_assert_eq!(hash, self.hash(&id), "hashed by another registry");
                        hash
                    }
                    None => self.hash(&id),
                };
                self.pop_due(now, POP_PER_REQUEST);
                self.register(id, hash, port, token, source, now, fresh_token)
            }
            Request::Bridge { id, token, peer } => self.popped(now).bridge(id, token, peer, now),
            Request::Chat { id, token, peer } => self.popped(now).chat(id, token, peer, now),
            Request::Quit { id, token } => self.popped(now).quit(id, token, now),
        };
        result.unwrap_or_else(Response::Error)
    }

    /// Pops the records due at `now` that one request pops on its way.
    fn popped(&mut self, now: Duration) -> &mut Registry {
        self.pop_due(now, POP_PER_REQUEST);
        self
    }

    #[allow(clippy::too_many_arguments)] // REGISTER's fields, and its hash
    fn register<E>(
        &mut self,
        id: ClientId,
        hash: u32,
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
        // One probe of the index for the common cases (a fresh id, a
        // refresh): at a million entries each probe is a cache miss.
        let mut found = self.find(&id, hash);
        if let Some(i) = found {
            let e = &mut self.queue[i];
            if e.live(now) {
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
                // client. The record is queued again when it reaches the
                // front, not now, so a refresh touches nothing else.
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
        }
        // A new registration: in a fresh record, or in the lapsed or quit
        // record the id left behind.
        let reuses_held = found.is_some_and(|i| self.queue[i].seq != GONE);
        let max = self.config.max_registrations;
        if max != 0 && !reuses_held && self.held >= max {
            self.pop_due(now, POP_TO_MAKE_ROOM);
            if self.held >= max {
                return Err(Failure {
                    retry_after: Some(60),
                    ..Failure::new(
                        ErrorStatus::Unavailable,
                        format!("server full: {max} clients are registered; try again later"),
                    )
                });
            }
            // The pop moved the front, and may have taken the id's record.
            found = found.and_then(|_| self.find(&id, hash));
        }
        if found.is_none() && self.queue.len() >= u32::MAX as usize {
            return Err(Failure::new(
                ErrorStatus::Unavailable,
                "server full: no room for another registration; try again later",
            ));
        }
        let token = fresh_token().map_err(|_| {
            Failure::new(
                ErrorStatus::Unavailable,
                "server cannot make a token right now; try again",
            )
        })?;
        // A reused record keeps its place in the queue, and is queued again
        // (with the new deadline) when it reaches the front; a new one
        // goes to the back.
        let queued_until = match found {
            Some(i) => self.queue[i].queued_until,
            None => self.queued_until(expires_at),
        };
        let record = Record {
            id,
            token,
            ip,
            port,
            expires_at,
            queued_until,
            hash,
            seq: IDLE,
        };
        let addr = record.addr();
        match found {
            Some(i) => {
                let old = std::mem::replace(&mut self.queue[i], record);
                if old.seq == GONE {
                    self.held += 1;
                } else if in_queue(old.seq) {
                    self.waiting.remove(&old.seq);
                }
            }
            None => {
                self.purge_if_full();
                self.push_back(record);
                self.held += 1;
            }
        }
        Ok(Response::RegAck {
            id,
            addr,
            token,
            expires,
        })
    }

    fn bridge(
        &mut self,
        id: ClientId,
        token: Token,
        peer: Option<ClientId>,
        now: Duration,
    ) -> Result<Response, Failure> {
        let me = self.authenticate(id, token, now)?;
        let found = match peer {
            Some(p) if p == id => {
                return Err(Failure::bad_request(
                    "Peer-Id is your own id: name another client",
                ));
            }
            Some(p) => {
                let e = self.live(&p, now).ok_or_else(|| unknown(&p))?;
                if !in_queue(e.seq) {
                    let why = if e.seq == BUSY {
                        format!("{IN_A_CHAT}, not waiting for a peer")
                    } else {
                        "is not waiting for a peer".to_owned()
                    };
                    return Err(Failure::new(
                        ErrorStatus::Conflict,
                        format!("{p} {why}: ask it to BRIDGE, or BRIDGE without Peer-Id"),
                    ));
                }
                Some((p, e.addr(), PeerKey::derive(&e.token, &id)))
            }
            None => self.longest_waiting_other(id, now),
        };
        match found {
            Some(peer) => {
                // The caller has its peer, so it stops waiting for one.
                self.set_seq(me, IDLE);
                Ok(Response::BridgeAck { peer: Some(peer) })
            }
            None => {
                if !in_queue(self.queue[me].seq) {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    self.set_seq(me, seq);
                }
                Ok(Response::BridgeAck { peer: None })
            }
        }
    }

    /// The waiting client that came first, other than `id`; lapsed ones
    /// met on the way leave the waiting queue, so they are never handed
    /// out.
    fn longest_waiting_other(
        &mut self,
        id: ClientId,
        now: Duration,
    ) -> Option<(ClientId, SocketAddr, PeerKey)> {
        let mut lapsed = Vec::new();
        let mut found = None;
        for (&seq, candidate) in self.waiting.iter() {
            if *candidate == id {
                continue;
            }
            match self.live(candidate, now) {
                Some(e) => {
                    found = Some((*candidate, e.addr(), PeerKey::derive(&e.token, &id)));
                    break;
                }
                None => lapsed.push((seq, *candidate)),
            }
        }
        for (seq, c) in lapsed {
            self.waiting.remove(&seq);
            if let Some(i) = self.find(&c, self.hash(&c)) {
                self.queue[i].seq = IDLE;
            }
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
        let me = self.authenticate(id, token, now)?;
        if peer == id {
            return Err(Failure::bad_request(
                "Peer-Id is your own id: name the peer you chat with",
            ));
        }
        let them = self.live_at(&peer, now).ok_or_else(|| unknown(&peer))?;
        let p = &self.queue[them];
        // A chat starts with a client that waits for one (or already
        // chats, when CHAT is repeated); otherwise any registered client
        // could take any idle one out of play.
        if p.seq == IDLE {
            return Err(Failure::new(
                ErrorStatus::Conflict,
                format!("{peer} is not waiting for a chat: BRIDGE to be handed a waiting client"),
            ));
        }
        // Busy with someone else: only a caller already in a chat (one
        // repeating its CHAT) may name a busy peer.
        if p.seq == BUSY && self.queue[me].seq != BUSY {
            return Err(Failure::new(
                ErrorStatus::Conflict,
                format!("{peer} is busy in another chat: BRIDGE to be handed a waiting client"),
            ));
        }
        // The two chat directly now; the server only needs to stop handing
        // either of them out.
        self.set_seq(me, BUSY);
        self.set_seq(them, BUSY);
        Ok(Response::ChatAck)
    }

    fn quit(&mut self, id: ClientId, token: Token, now: Duration) -> Result<Response, Failure> {
        let me = self.authenticate(id, token, now)?;
        // The record stays queued, lapsed, until it is popped or the id
        // registers again; its slot stays too.
        self.set_seq(me, GONE);
        self.queue[me].expires_at = 0;
        self.held -= 1;
        if self.gone() > self.held.max(MIN_COMPACT) {
            self.compact();
        }
        Ok(Response::QuitAck)
    }

    /// The queue index of `id`'s live record, if `token` is its token.
    /// Indices hold until the next pop or compaction, so a request finds
    /// each of its records once.
    fn authenticate(&self, id: ClientId, token: Token, now: Duration) -> Result<usize, Failure> {
        let i = self.live_at(&id, now).ok_or_else(|| {
            Failure::new(
                ErrorStatus::NotFound,
                format!("{id} is not registered (or its registration expired): REGISTER first"),
            )
        })?;
        if self.queue[i].token != token {
            return Err(Failure::new(
                ErrorStatus::Unauthorized,
                format!("wrong Client-Token for {id}: send the token REGISTER returned"),
            ));
        }
        Ok(i)
    }

    fn hash(&self, id: &ClientId) -> u32 {
        hash_with(&self.hasher, id)
    }

    /// The queue index of `id`'s record (live, lapsed or quit), if the id
    /// has one.
    fn find(&self, id: &ClientId, hash: u32) -> Option<usize> {
        let (queue, front) = (&self.queue, self.front);
        let at = |pos: u32| pos.wrapping_sub(front) as usize;
        let pos = self
            .index
            .find(hash, |pos| queue.get(at(pos)).is_some_and(|r| r.id == *id))?;
        Some(at(pos))
    }

    /// The queue index of `id`'s record, if it is live.
    fn live_at(&self, id: &ClientId, now: Duration) -> Option<usize> {
        let i = self.find(id, self.hash(id))?;
        self.queue[i].live(now).then_some(i)
    }

    fn live(&self, id: &ClientId, now: Duration) -> Option<&Record> {
        self.live_at(id, now).map(|i| &self.queue[i])
    }

    /// Sets the record at queue index `i` to `seq`, keeping `waiting` in
    /// step.
    fn set_seq(&mut self, i: usize, seq: u64) {
        let e = &mut self.queue[i];
        if in_queue(e.seq) {
            self.waiting.remove(&e.seq);
        }
        e.seq = seq;
        if in_queue(seq) {
            self.waiting.insert(seq, e.id);
        }
    }

    /// Appends `record` to the queue and gives it a slot.
    fn push_back(&mut self, record: Record) {
        let hash = record.hash;
        let pos = self.enqueue(record);
        self.index.insert(hash, pos);
    }

    /// Appends `record` (its `queued_until` from [`Registry::queued_until`])
    /// to the queue; returns its position. The one place the queue grows
    /// at the back, so that `back_until` follows it.
    fn enqueue(&mut self, record: Record) -> u32 {
        let pos = self.front.wrapping_add(self.queue.len() as u32);
        self.back_until = self.back_until.max(record.queued_until);
        self.queue.push_back(record);
        self.prefetch_next_back();
        pos
    }

    /// Asks for the line the next record pushed will end on. Written
    /// cold, that line holds up the record's stores and every store after
    /// them (x86 commits stores in order), and a load that must wait for
    /// one of those stores waits for it too: `perf annotate` showed a
    /// REGISTER stalled there (docs/BENCHMARKS.md). The next push comes
    /// microseconds later, time enough for the line to arrive.
    fn prefetch_next_back(&self) {
        let (a, b) = self.queue.as_slices();
        let last = if b.is_empty() { a } else { b };
        // The slot after the back, and its last byte: a prefetch reads
        // nothing, so an address past the buffer (the ring wraps there,
        // or is full) only wastes it.
        let next = last.as_ptr_range().end.wrapping_add(1);
        crate::index::prefetch(next.cast::<u8>().wrapping_sub(1));
    }

    /// Drops the slots that point before the front.
    fn drop_stale_slots(&mut self) {
        self.index.retain(self.current());
    }

    /// Whether a slot points into the queue (not before its front), as of
    /// now.
    fn current(&self) -> impl Fn(Slot) -> bool + use<> {
        let (front, len) = (self.front, self.queue.len());
        move |s| (s.pos.wrapping_sub(front) as usize) < len
    }

    fn deadline(&self, now: Duration) -> u32 {
        // Rounding the start up means a registration never lapses early.
        let start = now.as_secs() + u64::from(now.subsec_nanos() > 0);
        (start + self.config.expires.as_secs()).min(u64::from(u32::MAX)) as u32
    }

    /// What a record lapsing at `at` is queued with at the back: `at`, or
    /// the latest deadline queued so far if that is later (a refreshed
    /// record going back, or a request from a thread whose clock read lost
    /// a race; kept even once the record that had it is gone), so
    /// that the queue stays in order and popping can stop at the first
    /// record not due. A record may then be popped a little after it
    /// lapsed, never before.
    fn queued_until(&self, at: u32) -> u32 {
        self.back_until.max(at)
    }

    /// Pops up to `budget` records from the front whose queued deadline
    /// has passed. A record refreshed since it was queued goes to the back
    /// instead.
    fn pop_due(&mut self, now: Duration, budget: usize) -> Sweep {
        let mut done = Sweep {
            looked: 0,
            lapsed: 0,
        };
        while done.looked < budget {
            let due = |r: &Record| now.as_secs() >= u64::from(r.queued_until);
            if !self.queue.front().is_some_and(due) {
                break;
            }
            let Some(mut r) = self.queue.pop_front() else {
                break;
            };
            done.looked += 1;
            let pos = self.front;
            self.front = self.front.wrapping_add(1);
            if r.seq == GONE {
                // A quit record: gone with it.
            } else if r.live(now) {
                r.queued_until = self.queued_until(r.expires_at);
                let hash = r.hash;
                let to = self.enqueue(r);
                // Every held record has a slot; should one be missing all
                // the same, the record gets one rather than being lost.
                if !self.index.repoint(hash, pos, to) {
                    self.index.insert(hash, to);
                }
            } else {
                // The slot is left stale, for a later purge.
                if in_queue(r.seq) {
                    self.waiting.remove(&r.seq);
                }
                self.held -= 1;
                done.lapsed += 1;
            }
        }
        done
    }

    /// Before an insert that would make the index grow, drops its stale
    /// slots in one sequential pass: in steady churn there are about as
    /// many of those as live ones, and growing would double the index
    /// instead. With few stale slots the index grows, or every insert
    /// would pay for a pass.
    fn purge_if_full(&mut self) {
        let stale = self.index.len().saturating_sub(self.queue.len());
        if self.index.len() < self.index.capacity() || stale < self.index.len() / 4 {
            return;
        }
        self.drop_stale_slots();
    }

    /// Quit records still in the queue: all that are not held.
    fn gone(&self) -> usize {
        self.queue.len() - self.held
    }

    /// Drops quit records from the queue and rebuilds the index, so that
    /// a flood of REGISTER and QUIT cannot fill memory with records
    /// waiting to lapse. It runs once quit records outnumber held ones, so
    /// its cost is a constant per QUIT.
    fn compact(&mut self) {
        self.queue.retain(|r| r.seq != GONE);
        self.index.clear();
        for i in 0..self.queue.len() {
            let pos = self.front.wrapping_add(i as u32);
            self.index.insert(self.queue[i].hash, pos);
        }
    }

    /// Drops the registrations that have lapsed; returns how many, up to
    /// `budget` records looked at. The server calls it now and then, a
    /// slice at a time, so that memory follows the live count even when
    /// no request comes, without holding the lock for long.
    pub fn sweep(&mut self, now: Duration, budget: usize) -> Sweep {
        let done = self.pop_due(now, budget);
        if done.looked < budget {
            self.shrink();
        }
        self.lines.publish(&self.index);
        done
    }

    /// Gives back memory after a crowd has left: keeps room for twice
    /// what is held.
    fn shrink(&mut self) {
        let want = (self.queue.len() * 2).max(1024);
        if self.queue.capacity() > 2 * want {
            self.queue.shrink_to(want);
        }
        if self.index.capacity() > 2 * want {
            self.index.shrink_to(want, self.current());
        }
    }
}

/// What one slice of [`Registry::sweep`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sweep {
    /// Records popped; under the budget means nothing more was due.
    pub looked: usize,
    /// Registrations dropped.
    pub lapsed: usize,
}

fn hash_with(hasher: &RandomState, id: &ClientId) -> u32 {
    // The low half of SipHash's output is as good as any other half.
    hasher.hash_one(id) as u32
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
        ahead: Lookahead,
        next_token: u64,
    }

    impl Harness {
        fn new(expires: u64, max: usize) -> Harness {
            let reg = Registry::new(Config {
                expires: Duration::from_secs(expires),
                max_registrations: max,
            });
            Harness {
                ahead: reg.lookahead(),
                reg,
                next_token: 1,
            }
        }

        fn send(&mut self, r: Request, now: Duration) -> Response {
            let n = self.next_token.to_le_bytes();
            let mut t = [0; 16];
            t[..8].copy_from_slice(&n);
            t[8..].copy_from_slice(&n);
            let t = Token::from_bytes(t);
            // Every other REGISTER hashed ahead, as the server does, the
            // rest by the registry: the two must agree.
            let hashed = match &r {
                Request::Register { id, .. } if self.next_token.is_multiple_of(2) => {
                    Some(self.ahead.register(id))
                }
                _ => None,
            };
            let r = self
                .reg
                .handle(&r, hashed, IP, now, || Ok::<_, Infallible>(t));
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
            Response::BridgeAck { peer } => peer.map(|(p, _, _)| p.to_string()),
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
            None,
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
            peer: Some((p, addr, key)),
        } = r
        else {
            panic!("{r:?}")
        };
        assert_eq!((p, addr), (id("a"), "192.0.2.1:1".parse().unwrap()));
        // The key a holds the registration for, made for b alone.
        assert_eq!(key, PeerKey::derive(&a, &id("b")));
        assert_ne!(key, PeerKey::derive(&b, &id("b")));
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
        let idle = h.bridge("a", a, Some("b"), secs(1.0));
        assert_eq!(status(&idle), 409);
        let Response::Error(f) = idle else {
            unreachable!()
        };
        assert!(f.reason.starts_with("b is not waiting"), "{}", f.reason);
        assert_eq!(status(&h.bridge("a", a, Some("a"), secs(1.0))), 400);
        assert_eq!(peer_of(&h.bridge("b", b, None, secs(1.0))), None);
        let r = h.bridge("a", a, Some("b"), secs(2.0));
        assert_eq!(peer_of(&r).as_deref(), Some("b"));
        let Response::BridgeAck {
            peer: Some((_, _, key)),
        } = r
        else {
            unreachable!()
        };
        assert_eq!(key, PeerKey::derive(&b, &id("a")));
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
        // The CHAT repeated (a lost answer) is still fine.
        let chat = |from: &str, token, to: &str| Request::Chat {
            id: id(from),
            token,
            peer: id(to),
        };
        assert_eq!(status(&h.send(chat("b", b, "a"), secs(1.5))), 200);
        // Nobody else may take a busy client into a chat of its own.
        assert_eq!(status(&h.send(chat("c", c, "a"), secs(1.5))), 409);
        assert_eq!(
            h.reg.state(&id("c"), secs(1.5)),
            Some(ClientState::Registered)
        );
        // Nobody is handed out now: c waits.
        assert_eq!(peer_of(&h.bridge("c", c, None, secs(2.0))), None);
        let busy = h.bridge("c", c, Some("a"), secs(2.0));
        assert_eq!(status(&busy), 409);
        let Response::Error(f) = busy else {
            unreachable!()
        };
        assert!(f.reason.starts_with("a is in a chat"), "{}", f.reason);
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
        // (register panics unless answered with a REGACK.)
        h.register("c", 3, secs(15.0));
        assert_eq!(h.reg.len(), 2);
    }

    #[test]
    fn a_full_registry_has_room_as_soon_as_one_lapses() {
        let mut h = Harness::new(10, 1);
        h.register("a", 1, secs(0.5));
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
        assert_eq!(full(&mut h, 10.9), 503);
        // a lapses at 11 s (its start rounded up).
        assert_eq!(full(&mut h, 11.0), 200);
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
            None,
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
        let done = h.reg.sweep(secs(12.0), 100);
        assert_eq!((done.looked, done.lapsed), (1, 1));
        assert_eq!(h.reg.len(), 1);
        assert!(h.reg.waiting.is_empty());
    }

    impl Registry {
        /// Checks every invariant the layout rests on.
        fn check(&self) {
            let mut held = 0;
            let mut gone = 0;
            let mut last = 0;
            for (i, r) in self.queue.iter().enumerate() {
                assert!(r.queued_until >= last, "queue out of order at {i}");
                last = r.queued_until;
                assert_eq!(r.hash, self.hash(&r.id));
                if r.seq == GONE {
                    gone += 1;
                } else {
                    held += 1;
                }
                assert_eq!(self.find(&r.id, r.hash), Some(i), "{} not found", r.id);
                if in_queue(r.seq) {
                    assert_eq!(self.waiting.get(&r.seq), Some(&r.id));
                }
            }
            assert_eq!((self.held, self.gone()), (held, gone));
            for (seq, id) in &self.waiting {
                let i = self
                    .find(id, self.hash(id))
                    .expect("a waiting id has a record");
                assert_eq!(self.queue[i].seq, *seq);
            }
        }
    }

    #[test]
    fn a_refreshed_registration_is_queued_again_not_dropped() {
        let mut h = Harness::new(10, 0);
        let a = h.register("a", 1, secs(0.5));
        let refresh = Request::Register {
            id: id("a"),
            port: 1,
            token: Some(a),
        };
        assert_eq!(status(&h.send(refresh, secs(8.0))), 200);
        // Its first deadline (11 s) comes: it goes to the back.
        let done = h.reg.sweep(secs(12.0), 100);
        assert_eq!((done.looked, done.lapsed), (1, 0));
        h.reg.check();
        // The refresh at 8 s holds it to 18 s.
        assert_eq!(
            h.reg.state(&id("a"), secs(17.9)),
            Some(ClientState::Registered)
        );
        let done = h.reg.sweep(secs(18.0), 100);
        assert_eq!((done.looked, done.lapsed), (1, 1));
        assert!(h.reg.is_empty());
        h.reg.check();
    }

    #[test]
    fn requests_pop_what_is_due_without_a_sweep() {
        let mut h = Harness::new(10, 0);
        for i in 0..3 {
            h.register(&format!("old{i}"), 1, secs(0.0));
        }
        assert_eq!(h.reg.len(), 3);
        h.register("new", 1, secs(10.0));
        assert_eq!(h.reg.len(), 1);
        h.reg.check();
    }

    #[test]
    fn a_clock_read_that_lost_a_race_keeps_the_queue_in_order() {
        // Two workers read the clock, and the later reading takes the
        // lock first.
        let mut h = Harness::new(10, 0);
        h.register("late", 1, secs(5.9));
        h.register("early", 1, secs(5.0));
        h.reg.check();
        // "early" lapses at 15 s but is popped with "late", at 16 s.
        assert_eq!(h.reg.state(&id("early"), secs(15.0)), None);
        assert_eq!(h.reg.sweep(secs(15.5), 100).looked, 0);
        assert_eq!(h.reg.sweep(secs(16.0), 100).lapsed, 2);
    }

    #[test]
    fn churn_does_not_grow_the_index() {
        // 1000 ids a second, each living 2 s: about 2000 held at a time.
        let mut h = Harness::new(2, 0);
        let mut n = 0;
        let mut most = 0;
        for second in 0..60 {
            for _ in 0..1000 {
                h.register(&format!("c{n}"), 1, secs(f64::from(second)));
                n += 1;
            }
            most = most.max(h.reg.index.capacity());
            assert!(h.reg.len() <= 3000, "{} held", h.reg.len());
        }
        h.reg.check();
        // Twice the held count fits in an index of capacity 4096; without
        // purges the index would hold every id ever seen.
        assert!(most <= 7168, "index grew to {most}");
        let last = format!("c{}", n - 1);
        assert!(h.reg.state(&id(&last), secs(59.5)).is_some());
    }

    #[test]
    fn quit_records_are_compacted_away() {
        let mut h = Harness::new(300, 0);
        let keep = h.register("keep", 1, secs(0.0));
        for i in 0..3 * MIN_COMPACT {
            let name = format!("q{i}");
            let t = h.register(&name, 1, secs(1.0));
            let r = h.send(
                Request::Quit {
                    id: id(&name),
                    token: t,
                },
                secs(1.0),
            );
            assert_eq!(status(&r), 200);
            assert!(h.reg.queue.len() <= MIN_COMPACT + 2);
        }
        h.reg.check();
        assert_eq!(h.reg.len(), 1);
        let r = h.bridge("keep", keep, None, secs(2.0));
        assert_eq!(peer_of(&r), None);
        h.reg.check();
    }

    #[test]
    fn an_id_registers_again_in_the_record_it_left() {
        let mut h = Harness::new(10, 1);
        let a = h.register("a", 1, secs(0.0));
        h.send(
            Request::Quit {
                id: id("a"),
                token: a,
            },
            secs(1.0),
        );
        assert!(h.reg.is_empty());
        // Quit, then back: one record, and the limit of one holds.
        let a2 = h.register("a", 2, secs(2.0));
        assert_ne!(a, a2);
        assert_eq!((h.reg.len(), h.reg.queue.len()), (1, 1));
        h.reg.check();
        // Lapsed (at 12 s) but not popped yet, then back.
        // (register panics unless answered with a REGACK.)
        h.register("a", 3, secs(12.5));
        assert_eq!(h.reg.len(), 1);
        h.reg.check();
        // It lives to 23 s, though its record was queued at 0 s.
        h.reg.sweep(secs(22.5), 100);
        h.reg.check();
        assert!(h.reg.state(&id("a"), secs(22.9)).is_some());
    }

    fn ceil(t: Duration) -> Duration {
        Duration::from_secs(t.as_secs() + u64::from(t.subsec_nanos() > 0))
    }

    /// A tiny deterministic generator, so that a failing sequence can be
    /// replayed.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    #[test]
    fn random_sequences_agree_with_a_plain_map() {
        for seed in 1..=40u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut h = Harness::new(1 + rng.below(20), 0);
            let expires = h.reg.config.expires;
            // The model: id -> (token, lapses at).
            let mut model: std::collections::HashMap<String, (Token, Duration)> =
                Default::default();
            let mut now = Duration::ZERO;
            for step in 0..3000 {
                now += Duration::from_millis(rng.below(400));
                let name = format!("id{}", rng.below(60));
                let live = model
                    .get(&name)
                    .filter(|(_, at)| now < *at)
                    .map(|(t, _)| *t);
                let token = match rng.below(3) {
                    0 => None,
                    1 => live,
                    _ => Some(Token::from_bytes([0xee; 16])),
                };
                let ctx = format!("seed {seed} step {step} {name} at {now:?}");
                match rng.below(10) {
                    0..=4 => {
                        let r = h.send(
                            Request::Register {
                                id: id(&name),
                                port: 1,
                                token,
                            },
                            now,
                        );
                        match (live, r) {
                            (Some(t), Response::RegAck { token: got, .. }) => {
                                assert_eq!(Some(t), token, "{ctx}");
                                assert_eq!(got, t, "{ctx}");
                                model.insert(name, (t, ceil(now) + expires));
                            }
                            (None, Response::RegAck { token: got, .. }) => {
                                model.insert(name, (got, ceil(now) + expires));
                            }
                            (Some(_), Response::Error(f)) => {
                                assert_eq!(f.status.code(), 409, "{ctx}");
                            }
                            (_, r) => panic!("{ctx}: {r:?}"),
                        }
                    }
                    5..=6 => {
                        let Some(t) = token else { continue };
                        let r = h.send(
                            Request::Quit {
                                id: id(&name),
                                token: t,
                            },
                            now,
                        );
                        let want = match live {
                            None => 404,
                            Some(l) if l != t => 401,
                            Some(_) => 200,
                        };
                        assert_eq!(status(&r), want, "{ctx}");
                        if want == 200 {
                            model.remove(&name);
                        }
                    }
                    7 => {
                        let Some(t) = token else { continue };
                        let r = h.bridge(&name, t, None, now);
                        let want = match live {
                            None => 404,
                            Some(l) if l != t => 401,
                            Some(_) => 200,
                        };
                        assert_eq!(status(&r), want, "{ctx}");
                        if let Response::BridgeAck {
                            peer: Some((p, _, _)),
                        } = r
                        {
                            let p = p.to_string();
                            assert!(model.get(&p).is_some_and(|(_, at)| now < *at), "{ctx}: {p}");
                        }
                    }
                    8 => {
                        h.reg.sweep(now, 1 + rng.below(8) as usize);
                    }
                    _ => {
                        for (n, (_, at)) in &model {
                            assert_eq!(h.reg.state(&id(n), now).is_some(), now < *at, "{ctx}: {n}");
                        }
                        h.reg.check();
                    }
                }
            }
            h.reg.sweep(now + expires * 2, usize::MAX);
            assert!(h.reg.is_empty(), "seed {seed}");
            h.reg.check();
        }
    }

    #[test]
    fn entries_stay_small() {
        // The memory target (256 bytes per registration with hash-table
        // overhead) rests on this.
        assert!(std::mem::size_of::<Record>() <= 88);
    }
}
