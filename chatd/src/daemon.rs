//! The daemon's core: one task that owns the session, the history and the
//! attached shells, and turns what happens into what to do.
//!
//! Every IO task (the peer listener, each link's reader, each shell, each
//! server request) reports to the core through one channel; the core feeds
//! the session, carries out its actions, and once per turn of its loop
//! commits the history, announces the new records to followers, and only
//! then flushes the frames queued for peers. That order is what makes an
//! acknowledgement mean "stored": the ack leaves after the commit.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chat_proto::ClientId;
use chat_proto::crypto::{self, Checked, CryptoError, Parties, PeerKey};
use chat_proto::frame::encode;
use chat_proto::ipc::{self, DaemonFrame, Failure, FailureKind, Record, RecordKind, Reply, State};
use chat_proto::peer::{Hello, MAX_FRAME, PeerFrame};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio::time::Instant;

use crate::history::{History, HistoryError, SEARCH_SLICE, Search};
use crate::ipc::{ClientHandle, ClientKey, Queued};
use crate::peer::{self, Decision, LinkHandle, LinkOut};
use crate::rendezvous;
use crate::session::{Action, Command, Input, LinkId, OpId, Session, Ticket};

/// How many queued events one turn of the loop takes before committing.
const BATCH: usize = 1024;

/// What to check when the history cannot be written.
const STORAGE_HINT: &str = "check that its disk has room and its directory is writable; messages are not acknowledged until they are stored";
/// How long stopping waits for the server to acknowledge our QUIT.
const QUIT_WAIT: Duration = Duration::from_secs(2);

/// What the IO tasks tell the core.
pub enum CoreEvent {
    Session(Input),
    /// A peer connected and asks to chat; `handshake` is its first
    /// handshake message.
    Incoming {
        hello: Hello,
        handshake: Vec<u8>,
        addr: SocketAddr,
        decide: oneshot::Sender<Decision>,
    },
    /// A shell attached.
    Attach {
        key: ClientKey,
        handle: ClientHandle,
    },
    /// A shell left; `reason` when it broke the protocol.
    Detach {
        key: ClientKey,
        reason: Option<String>,
    },
    /// A shell's request; the permit bounds its requests in flight.
    Request {
        key: ClientKey,
        id: u64,
        request: ipc::Request,
        permit: OwnedSemaphorePermit,
    },
}

/// Something interested in the daemon's state: systemd's STATUS= line.
pub type StateHook = Box<dyn FnMut(&ipc::Status) + Send>;

struct Client {
    handle: ClientHandle,
    /// `tail --follow` requests being served.
    follows: Vec<u64>,
    /// `wait` requests not yet satisfied, with their permits.
    waits: Vec<(u64, State, OwnedSemaphorePermit)>,
}

/// A shell's `history` or `tail` request, part way through.
struct PendingSearch {
    key: ClientKey,
    id: u64,
    search: Search,
    /// `tail --follow`: follow once the snapshot is out.
    follow: bool,
    _permit: OwnedSemaphorePermit,
}

/// The core's state.
pub struct Core {
    me: ClientId,
    session: Session,
    history: History,
    rendezvous: Arc<rendezvous::Client>,
    events: mpsc::Sender<CoreEvent>,
    links: HashMap<LinkId, LinkHandle>,
    /// Frames queued this turn that promise nothing about storage
    /// (messages, pings), per link: they leave before the commit, so our
    /// own bookkeeping is not on the message's way to the peer.
    early: HashMap<LinkId, Vec<u8>>,
    /// Frames that must wait for the commit (acks, and byes, which must
    /// not overtake the acks before them), per link.
    outgoing: HashMap<LinkId, Vec<u8>>,
    closing: Vec<LinkId>,
    /// Closed links whose writers may still be sending their last frames.
    draining: Vec<LinkHandle>,
    /// Incoming calls the session is deciding on, with their checked
    /// handshakes.
    deciders: HashMap<LinkId, (oneshot::Sender<Decision>, Checked)>,
    clients: HashMap<ClientKey, Client>,
    /// `history` and `tail` requests being answered a slice at a time, in
    /// turn.
    searches: VecDeque<PendingSearch>,
    tickets: HashMap<Ticket, (ClientKey, u64, OwnedSemaphorePermit)>,
    next_ticket: Ticket,
    /// Stored this turn, announced after the commit.
    fresh: Vec<Record>,
    /// Records of sent messages awaiting their fate, by (link, message id).
    in_flight: HashMap<(LinkId, u64), u64>,
    storage_error: Option<String>,
    state_hook: Option<StateHook>,
    last_state: Option<(State, Option<ClientId>)>,
}

impl Core {
    pub fn new(
        me: ClientId,
        session: Session,
        history: History,
        rendezvous: rendezvous::Client,
        events: mpsc::Sender<CoreEvent>,
        state_hook: Option<StateHook>,
    ) -> Core {
        Core {
            me,
            session,
            history,
            rendezvous: Arc::new(rendezvous),
            events,
            links: HashMap::new(),
            early: HashMap::new(),
            outgoing: HashMap::new(),
            closing: Vec::new(),
            draining: Vec::new(),
            deciders: HashMap::new(),
            clients: HashMap::new(),
            searches: VecDeque::new(),
            tickets: HashMap::new(),
            next_ticket: 1,
            fresh: Vec::new(),
            in_flight: HashMap::new(),
            storage_error: None,
            state_hook,
            last_state: None,
        }
    }

    /// See [`Session::started`].
    pub fn started(&mut self, unconfirmed: usize) {
        self.session.started(unconfirmed);
    }

    /// Registers as soon as the loop runs (`chatd --register`); the outcome
    /// is logged, as no shell asked.
    pub fn register_at_start(&mut self) {
        self.session.register_automatically();
    }

    /// Runs until `stop` resolves, then leaves the peer and the server.
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<CoreEvent>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        self.report_state();
        // What the session wants done before any event (--register).
        self.execute();
        self.flush();
        loop {
            let wake = self.session.poll_timeout().map(Instant::from_std);
            // Events before the timer: after a stall (a long history
            // read), the pings that came meanwhile must be taken in before
            // the timer decides the peer went silent. The timer is checked
            // after every turn, so a flood of events cannot starve it; and
            // a stop comes first of all.
            tokio::select! {
                biased;
                () = &mut stop => break,
                event = rx.recv() => {
                    let Some(event) = event else { break };
                    self.event(event);
                    for _ in 0..BATCH {
                        match rx.try_recv() {
                            Ok(event) => self.event(event),
                            Err(_) => break,
                        }
                    }
                }
                // Handled below, with the timer that falls due in a batch.
                () = sleep_until(wake) => {}
                // Nothing else to do: a slice of a history read, then
                // the other tasks' turn (the link readers and the shells
                // run on this thread too, and a branch that is always
                // ready would otherwise never let them).
                () = std::future::ready(()), if !self.searches.is_empty() => {
                    self.step_search();
                    tokio::task::yield_now().await;
                }
            }
            let now = std::time::Instant::now();
            if self.session.poll_timeout().is_some_and(|t| t <= now) {
                self.session.handle_timeout(now);
                self.execute();
            }
            if self.send_early() {
                // Let the link writers put those frames on the wire while
                // we commit.
                tokio::task::yield_now().await;
            }
            self.flush();
        }
        self.stop(&mut rx).await;
    }

    async fn stop(&mut self, rx: &mut mpsc::Receiver<CoreEvent>) {
        self.session
            .handle(Input::Shutdown, std::time::Instant::now());
        let mut pending = self.execute();
        self.flush();
        // Wait (bounded) for the answers to what shutting down asked the
        // server (its QUITACK), still serving events so they are taken in;
        // an answer to an earlier request does not count. Then let the link
        // writers finish.
        let deadline = Instant::now() + QUIT_WAIT;
        while !pending.is_empty() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(CoreEvent::Session(input @ Input::ServerReply { op, .. }))) => {
                    pending.retain(|&p| p != op);
                    self.session.handle(input, std::time::Instant::now());
                    self.execute();
                    self.flush();
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        for (_, handle) in self.links.drain() {
            let _ = handle.out.send(LinkOut::Close);
            self.draining.push(handle);
        }
        let writers = self
            .draining
            .drain(..)
            .map(|h| async move { h.out.closed().await });
        let _ = tokio::time::timeout(Duration::from_secs(1), futures_join_all(writers)).await;
    }

    fn event(&mut self, event: CoreEvent) {
        let now = std::time::Instant::now();
        match event {
            CoreEvent::Session(input) => {
                if let Input::LinkClosed { link, .. } | Input::LinkFailed { link, .. } = &input {
                    self.links.remove(link);
                    self.outgoing.remove(link);
                    self.early.remove(link);
                }
                self.session.handle(input, now);
            }
            CoreEvent::Incoming {
                hello,
                handshake,
                addr,
                decide,
            } => {
                match self.check_call(&hello, &handshake) {
                    Ok(checked) => {
                        // Logged once checked: a claimed id is anyone's to
                        // make up, and a flood of them must not fill the
                        // log.
                        tracing::info!(peer = %hello.id, %addr, "peer asks to chat");
                        let link = self.session.next_link();
                        self.deciders.insert(link, (decide, checked));
                        self.session.handle(Input::Incoming { link, hello }, now);
                    }
                    Err((status, reason)) => {
                        tracing::debug!(claimed = %hello.id, %addr, status, "call refused before it was looked at: {reason}");
                        let _ = decide.send(Decision::Refuse { status, reason });
                    }
                }
            }
            CoreEvent::Attach { key, handle } => {
                self.clients.insert(
                    key,
                    Client {
                        handle,
                        follows: Vec::new(),
                        waits: Vec::new(),
                    },
                );
            }
            CoreEvent::Detach { key, reason } => {
                if let (Some(reason), Some(c)) = (reason, self.clients.get(&key)) {
                    let _ = c
                        .handle
                        .queue
                        .send(Queued::answer(DaemonFrame::Dropped { reason }));
                }
                self.clients.remove(&key);
            }
            CoreEvent::Request {
                key,
                id,
                request,
                permit,
            } => self.request(key, id, request, permit, now),
        }
        self.execute();
    }

    fn request(
        &mut self,
        key: ClientKey,
        id: u64,
        request: ipc::Request,
        permit: OwnedSemaphorePermit,
        now: std::time::Instant,
    ) {
        let command = match request {
            ipc::Request::Id => return self.reply(key, id, Ok(Reply::Id { id: self.me }), permit),
            ipc::Request::Status => {
                let status = Ok(Reply::Status(self.session.status()));
                return self.reply(key, id, status, permit);
            }
            ipc::Request::Register => Command::Register,
            ipc::Request::Bridge { peer } => Command::Bridge { peer },
            ipc::Request::Chat => Command::Chat,
            ipc::Request::Send { text } => Command::Send { text },
            ipc::Request::Quit => Command::Quit,
            ipc::Request::Tail { last, .. } | ipc::Request::History { limit: last, .. }
                if last > crate::ipc::MAX_RECORDS =>
            {
                let message = format!(
                    "at most {} records per request: ask for fewer (-n, --limit)",
                    crate::ipc::MAX_RECORDS
                );
                let invalid = Err(Failure::new(FailureKind::Invalid, message));
                return self.reply(key, id, invalid, permit);
            }
            // Both run between events, a slice at a time (see
            // `step_search`): reading a long history must not keep this
            // thread from the peer link. The flush first commits this
            // turn, so that a shell is never shown a record a failed
            // commit then takes back.
            ipc::Request::Tail { last, follow } => {
                self.flush();
                let search = Search::last(&self.history, last);
                return self.start_search(key, id, search, follow, permit);
            }
            ipc::Request::History { peer, grep, limit } => {
                self.flush();
                let search = Search::new(&self.history, peer, grep.as_deref(), limit);
                return self.start_search(key, id, search, false, permit);
            }
            ipc::Request::Wait { state } => {
                if self.session.state() == state {
                    return self.reply(key, id, Ok(Reply::Reached { state }), permit);
                }
                if let Some(c) = self.clients.get_mut(&key) {
                    c.waits.push((id, state, permit));
                }
                return;
            }
        };
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.tickets.insert(ticket, (key, id, permit));
        self.session.handle(Input::Command { ticket, command }, now);
    }

    /// Queues the records a request asked for; false (with an error sent
    /// to the shell) when reading them failed or too many bytes of answers
    /// already wait for it.
    fn serve_records(
        &mut self,
        key: ClientKey,
        id: u64,
        records: Result<Vec<Record>, crate::history::HistoryError>,
    ) -> bool {
        let too_much = || {
            let message = format!(
                "too much history waiting to be read ({} MiB): read the answers already asked for, or ask for fewer",
                crate::ipc::MAX_ANSWER_BYTES >> 20
            );
            Err(Failure::new(FailureKind::Invalid, message))
        };
        let records = match records {
            Ok(r) => r,
            Err(crate::history::HistoryError::OverBudget { .. }) => {
                self.answer(key, id, too_much());
                return false;
            }
            Err(e) => {
                self.answer(
                    key,
                    id,
                    Err(Failure::new(FailureKind::Storage, e.to_string())),
                );
                return false;
            }
        };
        let Some(c) = self.clients.get(&key) else {
            return false;
        };
        let bytes: usize = records.iter().map(crate::ipc::record_bytes).sum();
        let waiting = c.handle.answer_bytes.fetch_add(bytes, Ordering::AcqRel);
        if waiting + bytes > crate::ipc::MAX_ANSWER_BYTES {
            c.handle.answer_bytes.fetch_sub(bytes, Ordering::AcqRel);
            self.answer(key, id, too_much());
            return false;
        }
        // Counted above in one go; each frame carries its share for the
        // writer to give back.
        for record in records {
            let frame = Queued::answer(DaemonFrame::Record { id, record });
            if !self.push_queued(key, frame) {
                return false;
            }
        }
        true
    }

    fn start_search(
        &mut self,
        key: ClientKey,
        id: u64,
        search: Result<Search, HistoryError>,
        follow: bool,
        permit: OwnedSemaphorePermit,
    ) {
        match search {
            Ok(search) => self.searches.push_back(PendingSearch {
                key,
                id,
                search,
                follow,
                _permit: permit,
            }),
            Err(e) => {
                self.serve_records(key, id, Err(e));
            }
        }
    }

    /// Runs one slice of the first pending search, then puts it last, so
    /// that shells searching at once take turns; answers it when done
    /// (for `tail --follow`, by sending what was stored meanwhile and
    /// following from there).
    fn step_search(&mut self) {
        let Some(mut pending) = self.searches.pop_front() else {
            return;
        };
        let (key, id) = (pending.key, pending.id);
        if !self.clients.contains_key(&key) {
            return; // the shell left: drop its search
        }
        // The shell's other searches in progress count against its room
        // too, or each could gather a whole budget's worth.
        let others: usize = (self.searches.iter())
            .filter(|p| p.key == key)
            .map(|p| p.search.bytes())
            .sum();
        let room = self.answer_room(key).saturating_sub(others);
        let end = pending.search.end();
        let done = match pending.search.step(&self.history, SEARCH_SLICE, room) {
            Ok(false) => return self.searches.push_back(pending),
            Ok(true) => self.serve_records(key, id, Ok(pending.search.into_records())),
            Err(e) => self.serve_records(key, id, Err(e)),
        };
        if !done {
            return; // failed, and the shell was told why
        }
        if !pending.follow {
            return self.answer(key, id, Ok(Reply::Done));
        }
        self.catch_up_and_follow(key, id, end);
    }

    /// Sends a `tail --follow` whose snapshot ended before seq `end` what
    /// was stored from there on, then follows live: every record once, in
    /// order. What came meanwhile is read back from the history rather
    /// than held in memory, and only as much as a follower may be behind.
    ///
    /// It runs between turns (from `step_search`), after the turn's flush:
    /// everything from `end` on is committed and announced already, so
    /// what it reads here is not announced again.
    fn catch_up_and_follow(&mut self, key: ClientKey, id: u64, end: u64) {
        let queue = crate::ipc::QUEUE;
        let since = match self.history.since(end, queue as u32 + 1) {
            Ok(records) if records.len() > queue => {
                let message = format!(
                    "more than {queue} records were stored while the history was read: ask for fewer (-n), or follow without history (-n 0)"
                );
                return self.answer(key, id, Err(Failure::new(FailureKind::Invalid, message)));
            }
            Ok(records) => records,
            Err(e) => {
                self.serve_records(key, id, Err(e));
                return;
            }
        };
        for record in since {
            if !self.push_live(key, DaemonFrame::Record { id, record }) {
                return;
            }
        }
        if let Some(c) = self.clients.get_mut(&key) {
            c.follows.push(id);
        }
    }

    /// Bytes of answers shell `key` may still be sent before it reads
    /// some: history is read no further than this.
    fn answer_room(&self, key: ClientKey) -> usize {
        self.clients.get(&key).map_or(0, |c| {
            crate::ipc::MAX_ANSWER_BYTES
                .saturating_sub(c.handle.answer_bytes.load(Ordering::Acquire))
        })
    }

    /// Answers a request whose permit a search holds (and gives back).
    fn answer(&mut self, key: ClientKey, id: u64, result: Result<Reply, Failure>) {
        self.push_queued(key, Queued::answer(DaemonFrame::Reply { id, result }));
    }

    /// Answers a request, its permit given back once the answer is
    /// written (see [`Queued::permit`]).
    fn reply(
        &mut self,
        key: ClientKey,
        id: u64,
        result: Result<Reply, Failure>,
        permit: OwnedSemaphorePermit,
    ) {
        let frame = DaemonFrame::Reply { id, result };
        self.push_queued(key, Queued::reply(frame, permit));
    }

    fn push_queued(&mut self, key: ClientKey, frame: Queued) -> bool {
        match self.clients.get(&key) {
            Some(c) if c.handle.queue.send(frame).is_ok() => true,
            Some(_) => {
                self.clients.remove(&key);
                false
            }
            None => false,
        }
    }

    /// Queues a live record for a follower; one that has let too many pile
    /// up is dropped (its writer says so), so it cannot hold the daemon up
    /// or make it hoard memory.
    fn push_live(&mut self, key: ClientKey, frame: DaemonFrame) -> bool {
        let Some(c) = self.clients.get(&key) else {
            return false;
        };
        if c.handle.live.fetch_add(1, Ordering::AcqRel) >= crate::ipc::QUEUE {
            tracing::info!(key, "dropping a shell that fell behind");
            c.handle.lagged.store(true, Ordering::Release);
            self.clients.remove(&key);
            return false;
        }
        if c.handle.queue.send(Queued::live(frame)).is_err() {
            self.clients.remove(&key);
            return false;
        }
        true
    }

    /// Checks an incoming call's handshake message against the key the
    /// server gives a caller it introduces to us: only then is the call
    /// the session's to decide, so a caller that cannot prove who it is
    /// learns nothing of our state and changes none of it. (A handshake
    /// replayed from one seen on the network passes; the session holds
    /// such a call as unconfirmed until the caller's first frame, which a
    /// replayer cannot make.) Returns the checked handshake, or the
    /// refusal.
    fn check_call(&self, hello: &Hello, handshake: &[u8]) -> Result<Checked, (u16, String)> {
        let (me, caller) = (self.me, hello.id);
        let Some(token) = self.session.token() else {
            return Err((
                403,
                format!("{me} is not registered with a server, so it is not waiting for a chat"),
            ));
        };
        let parties = Parties {
            caller,
            callee: me,
            turns: hello.turns,
        };
        crypto::check(&PeerKey::derive(&token, &caller), &parties, handshake).map_err(|e| match e {
            CryptoError::Handshake => (
                401,
                format!(
                    "{me} cannot verify that the server introduced you to it as {caller}: the key does not match its registration"
                ),
            ),
            other => (500, format!("{me} cannot check the call: {other}")),
        })
    }

    /// Takes the call on `link`: makes the handshake's answer and hands
    /// the connection its keys and queue. False if the connection has
    /// gone, or no answer could be made.
    fn accept(
        &self,
        link: LinkId,
        decide: oneshot::Sender<Decision>,
        checked: Checked,
        out: peer::LinkQueue,
    ) -> bool {
        match checked.answer() {
            Ok((keys, handshake)) => decide
                .send(Decision::Accept {
                    link,
                    me: self.me,
                    out,
                    handshake,
                    keys,
                })
                .is_ok(),
            Err(e) => {
                let reason = format!("{} cannot answer the call: {e}", self.me);
                tracing::error!("{reason}");
                let _ = decide.send(Decision::Refuse {
                    status: 500,
                    reason,
                });
                false
            }
        }
    }

    /// Carries out the session's actions; returns the server requests it
    /// started.
    fn execute(&mut self) -> Vec<OpId> {
        let mut started = Vec::new();
        while let Some(action) = self.session.poll_action() {
            match action {
                Action::Server { op, request } => {
                    started.push(op);
                    let client = Arc::clone(&self.rendezvous);
                    let events = self.events.clone();
                    tokio::spawn(async move {
                        let result = client.request(&request).await;
                        if let Err(e) = &result {
                            tracing::debug!("{} failed: {e}", request.method());
                        }
                        let _ = events
                            .send(CoreEvent::Session(Input::ServerReply { op, result }))
                            .await;
                    });
                }
                Action::Connect {
                    link,
                    addr,
                    hello,
                    peer,
                    key,
                } => {
                    tracing::info!(%addr, "connecting to peer");
                    let (handle, queue) = peer::queue();
                    self.links.insert(link, handle);
                    let source = self.rendezvous.source();
                    let events = self.events.clone();
                    let to = peer::Callee {
                        addr,
                        id: peer,
                        key,
                    };
                    tokio::spawn(peer::connect(link, to, source, hello, events, queue));
                }
                Action::Accept { link } => {
                    let (handle, queue) = peer::queue();
                    self.links.insert(link, handle);
                    let accepted = match self.deciders.remove(&link) {
                        Some((decide, checked)) => self.accept(link, decide, checked, queue),
                        None => false,
                    };
                    if !accepted {
                        // The connection gave up waiting, or the answer
                        // could not be made: the session drops the call it
                        // just took.
                        self.links.remove(&link);
                        self.session.handle(
                            Input::LinkClosed {
                                link,
                                reason: "the peer's connection was gone before the chat began"
                                    .into(),
                            },
                            std::time::Instant::now(),
                        );
                    }
                }
                Action::Refuse {
                    link,
                    status,
                    reason,
                } => {
                    if let Some((d, ..)) = self.deciders.remove(&link) {
                        let _ = d.send(Decision::Refuse { status, reason });
                    }
                }
                Action::Send { link, mut frame } => {
                    if let PeerFrame::Message { sent_ms, .. } = &mut frame {
                        *sent_ms = now_ms();
                    }
                    let buf = match frame {
                        PeerFrame::Message { .. } | PeerFrame::Ping => {
                            self.early.entry(link).or_default()
                        }
                        PeerFrame::Ack { .. } | PeerFrame::Bye => {
                            self.outgoing.entry(link).or_default()
                        }
                    };
                    if let Err(e) = encode(&frame, MAX_FRAME, buf) {
                        tracing::error!("cannot encode a frame for the peer: {e}");
                    }
                }
                Action::Close { link } => self.closing.push(link),
                Action::Record(kind) => {
                    self.store(kind);
                }
                Action::Outgoing { link, id, record } => {
                    if let Some(seq) = self.store(record) {
                        self.in_flight.insert((link, id), seq);
                    }
                }
                Action::Delivery {
                    link,
                    id,
                    delivered,
                } => {
                    if let Some(seq) = self.in_flight.remove(&(link, id))
                        && let Err(e) = self.history.set_delivered(seq, delivered)
                    {
                        self.storage_failed("record a delivery", &e);
                    }
                }
                Action::Reply { ticket, result } => match self.tickets.remove(&ticket) {
                    Some((key, id, permit)) => self.reply(key, id, result, permit),
                    // Asked by the daemon itself (--register, or a call
                    // it makes on rejoining the pool).
                    None => match result {
                        Ok(Reply::Registered { addr, expires }) => {
                            tracing::info!("registered as {addr}, for {expires} s at a time")
                        }
                        Ok(Reply::Chatting { peer }) => tracing::info!("chatting with {peer}"),
                        Ok(r) => tracing::debug!("{r:?}"),
                        Err(f) => tracing::warn!("{}", f.message),
                    },
                },
                Action::SaveToken(token) => {
                    if let Err(e) = self.history.save_token(self.rendezvous.server(), token) {
                        // Not a message: nothing to withhold. The daemon
                        // registers anew (with a new token) next start.
                        tracing::error!(
                            "cannot save the client token in {}: {e}; {STORAGE_HINT}",
                            self.history.path()
                        );
                    }
                }
            }
        }
        started
    }

    /// Appends to the open transaction; returns the record's seq.
    fn store(&mut self, kind: RecordKind) -> Option<u64> {
        let result = self
            .history
            .begin()
            .and_then(|()| self.history.append(now_ms(), kind));
        match result {
            Ok(record) => {
                let seq = record.seq;
                self.fresh.push(record);
                Some(seq)
            }
            Err(e) => {
                self.storage_failed("store a record", &e);
                None
            }
        }
    }

    /// A write to the history failed: said with what to check, and kept
    /// so that the turn's acknowledgements are withheld.
    fn storage_failed(&mut self, doing: &str, e: &HistoryError) {
        tracing::error!(
            "cannot {doing} in {}: {e}; {STORAGE_HINT}",
            self.history.path()
        );
        self.storage_error.get_or_insert(e.to_string());
    }

    /// Hands the frames that need no commit to their links' writers;
    /// returns whether there were any.
    fn send_early(&mut self) -> bool {
        let mut any = false;
        for (link, bytes) in self.early.drain() {
            if let Some(handle) = self.links.get(&link) {
                any = true;
                let _ = handle.out.send(LinkOut::Data(bytes));
            }
        }
        any
    }

    /// The end of a turn: commit, announce, then let frames out.
    fn flush(&mut self) {
        self.send_early();
        if let Err(e) = self.history.commit() {
            self.storage_failed("commit", &e);
            // Rolled back: nothing of this turn is stored, so none of it
            // is announced.
            self.fresh.clear();
        }
        if let Some(err) = self.storage_error.take() {
            // What failed to store may not be acknowledged: drop what was
            // queued for peers and close the links, so senders are told
            // their messages were not delivered rather than left believing
            // they were. (Records that were stored are still announced.)
            self.outgoing.clear();
            self.early.clear();
            let links: Vec<LinkId> = self.links.keys().copied().collect();
            for link in links {
                self.session.handle(
                    Input::LinkClosed {
                        link,
                        reason: format!("this daemon could not store messages: {err}"),
                    },
                    std::time::Instant::now(),
                );
                self.closing.push(link);
            }
            let before = self.fresh.len();
            self.execute();
            if let Err(e) = self.history.commit() {
                tracing::error!(
                    "cannot commit in {}: {e}; {STORAGE_HINT}",
                    self.history.path()
                );
                // The notices of this failure were not stored either.
                self.fresh.truncate(before);
            }
        }
        let fresh = std::mem::take(&mut self.fresh);
        if !fresh.is_empty() {
            let keys: Vec<ClientKey> = self.clients.keys().copied().collect();
            for key in keys {
                let follows = match self.clients.get(&key) {
                    Some(c) if !c.follows.is_empty() => c.follows.clone(),
                    _ => continue,
                };
                'records: for record in &fresh {
                    for &id in &follows {
                        if !self.push_live(
                            key,
                            DaemonFrame::Record {
                                id,
                                record: record.clone(),
                            },
                        ) {
                            break 'records;
                        }
                    }
                }
            }
            self.report_state();
        }
        for (link, bytes) in self.outgoing.drain() {
            if bytes.is_empty() {
                continue;
            }
            match self.links.get(&link) {
                Some(handle) => {
                    let _ = handle.out.send(LinkOut::Data(bytes));
                }
                None => tracing::debug!(link, "frames for a link that is gone"),
            }
        }
        for link in self.closing.drain(..) {
            if let Some(handle) = self.links.remove(&link) {
                let _ = handle.out.send(LinkOut::Close);
                self.draining.push(handle);
            }
        }
        self.draining.retain(|h| !h.out.is_closed());
    }

    /// Answers `wait`s and tells the state hook, when the state changed.
    fn report_state(&mut self) {
        let status = self.session.status();
        let now = (status.state, status.peer);
        if self.last_state == Some(now) {
            return;
        }
        self.last_state = Some(now);
        match status.peer {
            Some(peer) => tracing::info!(state = %status.state, %peer, "state"),
            None => tracing::info!(state = %status.state, "state"),
        }
        if let Some(hook) = &mut self.state_hook {
            hook(&status);
        }
        let keys: Vec<ClientKey> = self.clients.keys().copied().collect();
        for key in keys {
            let reached = match self.clients.get_mut(&key) {
                Some(c) => {
                    let (hit, keep): (Vec<_>, Vec<_>) =
                        c.waits.drain(..).partition(|(_, s, _)| *s == status.state);
                    c.waits = keep;
                    hit
                }
                None => continue,
            };
            for (id, state, permit) in reached {
                self.reply(key, id, Ok(Reply::Reached { state }), permit);
            }
        }
    }
}

/// Awaits every future (a handful of link writers at most).
async fn futures_join_all<F: std::future::Future<Output = ()>>(futures: impl Iterator<Item = F>) {
    for f in futures {
        f.await;
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The wall clock, for record and message times.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
