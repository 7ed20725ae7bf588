//! Busy polling: a worker that has just served a request keeps polling
//! its sockets for a short while instead of going to sleep, when that
//! pays and a core is free for it.
//!
//! On a virtual machine a worker that sleeps is slow to wake: its virtual
//! CPU halts, and the next request must have the host bring it back,
//! which costs tens of microseconds (the guest's own halt polling is off
//! on the machine of `docs/BENCHMARKS.md`). A client that sends one
//! request at a time pays that on every request. A worker that polls
//! instead sees the request within a microsecond.
//!
//! Polling costs a core, so it is bounded four ways:
//! - [`Window`]: how long a worker polls after its last request adapts to
//!   the gaps it sees between requests, as Linux's `haltpoll` governor
//!   does for a halting CPU: twice their median, up to the longest window
//!   (`--busy-poll`), and nothing when the median is longer, so a server
//!   with sparse traffic never polls.
//! - [`Spare`]: workers poll only while the machine has a core to spare
//!   (idle, or already spent on polling), read from `/proc/stat`: 0.9 of
//!   one to start, 0.6 to go on. On a busy machine polling would take the
//!   core a client or another program needs; there, where `/proc/stat`
//!   cannot be read, and in a process held to fewer cores than the
//!   machine has, no worker polls.
//! - At most one worker fewer than the process has cores polls at a time
//!   (none on one core).
//! - A polling worker the kernel keeps off its core for a millisecond
//!   (`PREEMPTED_FOR`) stops every worker's polling until a reading
//!   shows a spare core again: another thread wanted that core.
//!
//! [`Window`] and [`Spare`] are pure; [`spin`] and [`watch_spare`] drive
//! them on a worker and on the main thread.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

/// Gaps a [`Window`] remembers.
const GAPS: usize = 16;
/// Of those, how many must be within the longest window to poll at all.
const CATCH: usize = GAPS / 2;

/// How long a worker polls after a request: twice the median of the last
/// [`GAPS`] gaps between requests, up to the longest window allowed, and
/// nothing if that median is longer. Twice, as gaps vary: with two workers
/// a client's next transient connection goes to either at random, so each
/// sees gaps of one, two or more round trips; measured there, polling for
/// the median alone caught too few to gain. A worker that polls answers
/// sooner, so the gaps it sees shrink, and the window with them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    gaps: [Duration; GAPS],
    next: usize,
    now: Duration,
    max: Duration,
}

impl Window {
    /// A window that may grow to `max`. It starts at nothing: as if the
    /// gaps so far had been too long to poll for.
    pub fn new(max: Duration) -> Window {
        Window {
            gaps: [Duration::MAX; GAPS],
            next: 0,
            now: Duration::ZERO,
            max,
        }
    }

    /// How long to poll after a request.
    pub fn get(&self) -> Duration {
        self.now
    }

    /// Takes the gap between one request and the next, whether polling
    /// caught it or the worker slept through it.
    pub fn gap(&mut self, gap: Duration) {
        self.gaps[self.next] = gap;
        self.next = (self.next + 1) % GAPS;
        let mut sorted = self.gaps;
        let (_, &mut catch, _) = sorted.select_nth_unstable(CATCH - 1);
        let window = catch.saturating_mul(2);
        self.now = if catch > self.max {
            Duration::ZERO
        } else {
            window.min(self.max)
        };
    }
}

/// A reading of `/proc/stat`'s first line: the machine's CPU time, in
/// clock ticks, summed over its cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    /// Idle, waiting for I/O included.
    pub idle: u64,
    /// Everything but guests' time, which `user` already counts.
    pub total: u64,
    pub cores: u32,
}

impl CpuTimes {
    /// Reads `/proc/stat`; `None` where it cannot be read (not Linux, or
    /// hidden, as systemd's `ProcSubset=pid` does). A read of procfs never
    /// waits on a device, so an async task may make it: it takes some
    /// tens of microseconds.
    pub fn read() -> Option<CpuTimes> {
        std::fs::read_to_string("/proc/stat")
            .ok()
            .as_deref()
            .and_then(CpuTimes::parse)
    }

    /// Parses `/proc/stat`. `None` if it does not read as Linux writes it.
    pub fn parse(stat: &str) -> Option<CpuTimes> {
        let mut lines = stat.lines();
        let mut fields = lines.next()?.split_ascii_whitespace();
        if fields.next()? != "cpu" {
            return None;
        }
        // user nice system idle iowait irq softirq steal: the eight all
        // kernels since 2.6.11 write.
        let mut t = [0u64; 8];
        for v in &mut t {
            *v = fields.next()?.parse().ok()?;
        }
        let cores = lines
            .filter(|l| {
                l.strip_prefix("cpu")
                    .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
            })
            .count();
        Some(CpuTimes {
            idle: t[3].checked_add(t[4])?,
            total: t.iter().try_fold(0u64, |a, &v| a.checked_add(v))?,
            cores: u32::try_from(cores).ok().filter(|&n| n > 0)?,
        })
    }
}

/// Whether the machine has a core to spare for polling, from successive
/// readings of its CPU time and of the time the workers spent polling.
#[derive(Debug)]
pub struct Spare {
    /// The cores this process may run on.
    cores: u32,
    last: Option<CpuTimes>,
    allowed: bool,
}

/// Cores to spare before polling starts, and below which it stops: apart,
/// so a load near the line does not switch it at every reading.
const ALLOW_FROM: f64 = 0.9;
const STOP_BELOW: f64 = 0.6;

impl Spare {
    /// For a process that may run on `cores` cores. `/proc/stat` counts
    /// the whole machine's: where the process is held to fewer (a CPU
    /// quota, a cpuset, an affinity mask), another core's idle time is not
    /// its to take, and polling would spend its quota instead; there it
    /// never polls.
    pub fn new(cores: usize) -> Spare {
        Spare {
            cores: u32::try_from(cores).unwrap_or(u32::MAX),
            last: None,
            allowed: false,
        }
    }

    /// Forgets the last reading and the decision: the machine may be
    /// another after a rest. The next reading starts the next interval.
    pub fn rest(&mut self) {
        self.last = None;
        self.allowed = false;
    }

    /// Takes a reading, the time workers polled since the last one over
    /// the wall time since then, and whether a polling worker was
    /// preempted meanwhile; returns whether they may poll.
    pub fn reading(
        &mut self,
        now: CpuTimes,
        polled: Duration,
        elapsed: Duration,
        preempted: bool,
    ) -> bool {
        let last = self.last.replace(now);
        if now.cores != self.cores {
            self.allowed = false;
            return false;
        }
        if preempted {
            // Another thread wanted the polling core: that says more than
            // idle time read over a tenth of a second.
            self.allowed = false;
            return false;
        }
        let Some(last) = last else {
            return self.allowed;
        };
        let total = now.total.saturating_sub(last.total);
        if total == 0 || elapsed.is_zero() || now.cores != last.cores {
            // Too soon to tell, or the machine changed: keep the decision.
            return self.allowed;
        }
        let idle = now.idle.saturating_sub(last.idle) as f64 / total as f64 * f64::from(now.cores);
        let spare = idle + polled.as_secs_f64() / elapsed.as_secs_f64();
        self.allowed = if self.allowed {
            spare >= STOP_BELOW
        } else {
            spare >= ALLOW_FROM
        };
        self.allowed
    }
}

/// What the workers and the watcher of the machine share.
#[derive(Debug)]
pub struct Shared {
    /// The longest window; zero turns polling off.
    max: Duration,
    /// Whether the machine has a core to spare, from [`watch_spare`].
    allowed: watch::Sender<bool>,
    polling: AtomicUsize,
    cores: usize,
    most_polling: usize,
    /// Nanoseconds spent polling, by all workers, since start.
    polled_ns: AtomicU64,
    /// A polling worker was preempted since the last reading.
    preempted: AtomicBool,
    /// Workers whose requests come close enough together to poll for:
    /// while there are none, the watcher of the machine rests.
    wanting: AtomicUsize,
    wanted: Notify,
}

impl Shared {
    /// For this process: `max` is `--busy-poll`, `cores` the cores it may
    /// use. Polling is off, and the log says why, where the machine has
    /// more cores than that (a CPU quota, a cpuset: another core's idle
    /// time is not this process's to take, and polling would spend its
    /// quota) or `/proc/stat` cannot tell.
    pub fn for_this_process(max: Duration, cores: usize) -> Shared {
        if max.is_zero() || !cfg!(target_os = "linux") {
            return Shared::new(max, cores);
        }
        match CpuTimes::read().map(|t| t.cores) {
            Some(m) if usize::try_from(m).is_ok_and(|m| m == cores) => Shared::new(max, cores),
            Some(m) => {
                tracing::info!(
                    "busy polling off: this process may use {cores} of the machine's {m} cores \
                     (a CPU quota, cpuset or affinity mask), and polling would spend them; \
                     --busy-poll 0 says so quietly"
                );
                Shared::new(Duration::ZERO, cores)
            }
            None => {
                tracing::info!(
                    "busy polling off: /proc/stat cannot be read, so a spare core cannot be told; \
                     a sandbox may hide it (systemd's ProcSubset=pid does)"
                );
                Shared::new(Duration::ZERO, cores)
            }
        }
    }

    /// `max` is `--busy-poll`; `cores` the cores this process may use.
    pub fn new(max: Duration, cores: usize) -> Shared {
        Shared {
            max,
            allowed: watch::Sender::new(false),
            polling: AtomicUsize::new(0),
            cores,
            most_polling: cores.saturating_sub(1),
            polled_ns: AtomicU64::new(0),
            preempted: AtomicBool::new(false),
            wanting: AtomicUsize::new(0),
            wanted: Notify::new(),
        }
    }

    /// Whether polling can ever happen: asked for, cores for it, and a
    /// `/proc/stat` to tell when one is spare (Linux).
    pub fn enabled(&self) -> bool {
        !self.max.is_zero() && self.most_polling > 0 && cfg!(target_os = "linux")
    }

    /// Takes a polling place, if the machine has a core to spare and a
    /// place is free; it is given back when dropped.
    fn start(&self) -> Option<Place<'_>> {
        let taken = *self.allowed.borrow()
            && self
                .polling
                .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                    (n < self.most_polling).then_some(n + 1)
                })
                .is_ok();
        // `then`, not `then_some`: a guard built for a refusal would be
        // dropped at once and give back a place never taken.
        taken.then(|| Place {
            shared: self,
            polled: Duration::ZERO,
        })
    }

    fn want(&self, wants: bool) {
        if !wants {
            self.wanting.fetch_sub(1, Ordering::AcqRel);
        } else if self.wanting.fetch_add(1, Ordering::AcqRel) == 0 {
            // A permit if the watcher is not waiting yet: never lost.
            self.wanted.notify_one();
        }
    }

    /// A polling worker was preempted: no worker polls until the machine
    /// has a core to spare again.
    fn preempted(&self) {
        self.preempted.store(true, Ordering::Relaxed);
        self.allowed.send_replace(false);
    }

    /// Counts time spent polling: turns that found no request.
    fn polled(&self, polled: Duration) {
        let ns = u64::try_from(polled.as_nanos()).unwrap_or(u64::MAX);
        self.polled_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

thread_local! {
    /// Requests this worker served since its poller last looked.
    static SERVED: Cell<u64> = const { Cell::new(0) };
    /// The poller, when it sleeps until the next request.
    static ASLEEP: Cell<Option<Waker>> = const { Cell::new(None) };
}

/// Marks a request served on this worker: the clock its poller's window
/// runs from. A few nanoseconds: no clock is read here.
pub fn served() {
    SERVED.with(|s| s.set(s.get().wrapping_add(1)));
    ASLEEP.with(|w| {
        if let Some(w) = w.take() {
            w.wake();
        }
    });
}

fn take_served() -> bool {
    SERVED.with(|s| s.replace(0)) != 0
}

/// One worker's poller: a task on the worker's runtime that, while it
/// polls, yields at once whenever it runs. tokio's current-thread runtime
/// then asks epoll for events without waiting (one `epoll_wait` with a
/// zero timeout per turn) instead of sleeping in it.
pub async fn spin(shared: &Shared) {
    let mut allowed = shared.allowed.subscribe();
    let mut poller = Poller {
        shared,
        window: Window::new(shared.max),
        last: None,
        wants: false,
    };
    loop {
        // Asleep until a request is served.
        let request = std::future::poll_fn(|cx| {
            if take_served() {
                return Poll::Ready(());
            }
            ASLEEP.with(|w| w.set(Some(cx.waker().clone())));
            Poll::Pending
        });
        if !poller.wants {
            request.await;
        } else if tokio::time::timeout(GIVE_UP_AFTER, request).await.is_err() {
            // The requests stopped: no more wanting to poll for them.
            poller.forget();
            continue;
        }
        let now = Instant::now();
        poller.request(now);
        if !poller.wants {
            continue;
        }
        if !*allowed.borrow_and_update() {
            // A busy machine: requests do not wake the poller while it
            // waits for a spare core, for a while.
            match tokio::time::timeout(GIVE_UP_AFTER, allowed.wait_for(|&a| a)).await {
                // The gap spent waiting says nothing of the load.
                Ok(Ok(_)) => poller.last = None,
                Ok(Err(_)) => return,
                // Perhaps the load is gone too: learn it again, and let
                // the watcher of the machine rest meanwhile.
                Err(_) => poller.forget(),
            }
            continue;
        }
        if let Some(place) = shared.start() {
            poller.poll(place, &mut allowed, now).await;
        }
    }
}

/// A worker's poller between requests: the window its gaps make, its last
/// request, and whether it has told [`Shared`] it wants to poll.
struct Poller<'a> {
    shared: &'a Shared,
    window: Window,
    last: Option<Instant>,
    wants: bool,
}

impl Poller<'_> {
    /// A request noticed at `at`: its gap to the last one, and whether the
    /// window now says to poll.
    fn request(&mut self, at: Instant) {
        if let Some(last) = self.last {
            self.window.gap(at - last);
        }
        self.last = Some(at);
        self.want(!self.window.get().is_zero());
    }

    /// Forgets the gaps, to learn the load again, and stops wanting to
    /// poll meanwhile.
    fn forget(&mut self) {
        self.window = Window::new(self.shared.max);
        self.last = None;
        self.want(false);
    }

    fn want(&mut self, wants: bool) {
        if wants != self.wants {
            self.wants = wants;
            self.shared.want(wants);
        }
    }

    /// Polls from `from`, a request just served, in `place`, until the
    /// window passes without a request, the decision to poll changes, or
    /// another thread keeps this one off its core; then gives the place
    /// back.
    async fn poll(
        &mut self,
        mut place: Place<'_>,
        allowed: &mut watch::Receiver<bool>,
        from: Instant,
    ) {
        let mut ran = thread_cpu_time();
        let mut switches = Recent::new(from, context_switches());
        let mut turned = from;
        loop {
            tokio::task::yield_now().await;
            let now = Instant::now();
            let turn = now - std::mem::replace(&mut turned, now);
            let cpu = thread_cpu_time();
            // Off the core, not merely busy serving: another thread held
            // it. One that ran for a moment and slept again (a kernel
            // thread, the client) is gone within a millisecond; one the
            // scheduler gives a share of the core holds it longer, and
            // wants it.
            let off_core = match (ran, cpu) {
                (Some(before), Some(after)) => turn.saturating_sub(after.saturating_sub(before)),
                _ => Duration::ZERO,
            };
            ran = cpu;
            if switches.turn(now, off_core > PREEMPTED_FOR, context_switches) {
                self.shared.preempted();
                break;
            }
            if take_served() {
                self.request(now);
            } else {
                place.polled += turn - off_core;
                if self.last.is_none_or(|last| now - last > self.window.get()) {
                    // The gap is told when the request that ends it comes.
                    break;
                }
            }
            if place.polled >= FLUSH_POLLED {
                // Told as it goes: a long poll must not read as busy time
                // to the watcher of the machine and then land at once.
                self.shared.polled(std::mem::take(&mut place.polled));
            }
            if allowed.has_changed().unwrap_or(true) {
                break;
            }
        }
    }
}

/// A poller whose task ends (its worker shutting down) stops wanting to
/// poll, so the watcher of the machine may rest again.
impl Drop for Poller<'_> {
    fn drop(&mut self) {
        self.want(false);
    }
}

/// A polling place [`Shared::start`] gave, and the time polled in it not
/// yet told (turns that found no request): both given back however
/// polling ends, by the poller's task being dropped mid-poll included, so
/// that no place stays taken for good.
struct Place<'a> {
    shared: &'a Shared,
    polled: Duration,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.shared.polling.fetch_sub(1, Ordering::AcqRel);
        self.shared.polled(self.polled);
    }
}

/// How long a worker that would poll waits for a spare core, or for its
/// next request, before it stops wanting to.
const GIVE_UP_AFTER: Duration = Duration::from_secs(1);

/// How long a polling worker may be kept off its core before it takes
/// that as a sign the core is wanted. A thread the scheduler puts first
/// for a share of the core holds it for a millisecond or more; what runs
/// for a moment and sleeps again (a kernel thread, the other worker, the
/// client) is gone within one. With 200 us, pollers were stopped several
/// times a second at one transient client, which gained 8% over nginx
/// rather than 12% (PROBE; REGISTER alike).
const PREEMPTED_FOR: Duration = Duration::from_millis(1);

/// How old a poller's count of its switches may grow before it counts
/// again: the switches a long turn is judged by are those since then.
const RECOUNT_AFTER: Duration = Duration::from_millis(1);

/// How much polling time a poller gathers before it tells the watcher.
const FLUSH_POLLED: Duration = Duration::from_millis(1);

/// The CPU time this thread has had, to the nanosecond: what a poller
/// compares with the wall time of a turn to tell time it was kept off its
/// core. (`getrusage` would not do: its times move in scheduler ticks,
/// 4 ms here, and a reviewer's measurement caught 33 of 250 preemptions
/// with them, against 250 with this clock.) `None` where it cannot be
/// read.
#[cfg(target_os = "linux")]
fn thread_cpu_time() -> Option<Duration> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable `timespec` for the call to fill,
    // and stays one whatever the call does with it.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) } == 0;
    let secs = u64::try_from(now.tv_sec).ok()?;
    let nanos = u32::try_from(now.tv_nsec).ok()?;
    ok.then(|| Duration::new(secs, 0).saturating_add(Duration::from_nanos(u64::from(nanos))))
}

/// How often this thread has left its core: taken off it for another
/// thread (`ru_nivcsw`), and gone to sleep of its own accord (`ru_nvcsw`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Switches {
    involuntary: libc::c_long,
    voluntary: libc::c_long,
}

/// Whether a long turn between two counts was another thread's: the
/// kernel took this one off its core meanwhile, and it did not sleep of
/// its own accord (on a lock, say, or a write to a full pipe), which would
/// make the turn long by itself with a switch of another thread's beside
/// it counting for nothing. Never where switches cannot be counted.
/// The price: a poller that also sleeps often, on a lock much fought over,
/// may have a preemption in the same turn taken for its own sleep; a
/// reviewer's model with a mutex contended at every turn caught a hog on
/// the poller's core after 0.4 to 2.9 s rather than 50 ms. The registry's
/// lock is held for well under a microsecond a request.
fn kept_off(before: Option<Switches>, after: Option<Switches>) -> bool {
    match (before, after) {
        (Some(b), Some(a)) => a.involuntary != b.involuntary && a.voluntary == b.voluntary,
        _ => false,
    }
}

/// A poller's count of its switches, kept recent: a long turn is judged
/// by the switches since a count at most [`RECOUNT_AFTER`] old, so that a
/// switch long past cannot vouch for a turn of now. Counting is a system
/// call: made after a long turn, and once the count has aged, never at
/// every turn.
struct Recent {
    at: Instant,
    switches: Option<Switches>,
}

impl Recent {
    fn new(at: Instant, switches: Option<Switches>) -> Recent {
        Recent { at, switches }
    }

    /// A turn that ended at `now`, `long` if the thread was off its core
    /// for longer than [`PREEMPTED_FOR`]: whether another thread held the
    /// core meanwhile. `count` counts the switches now.
    fn turn(&mut self, now: Instant, long: bool, count: impl FnOnce() -> Option<Switches>) -> bool {
        if !long && now - self.at <= RECOUNT_AFTER {
            return false;
        }
        let before = std::mem::replace(self, Recent::new(now, count()));
        long && kept_off(before.switches, self.switches)
    }
}

/// How often the kernel has switched this thread out, as
/// [`Switches`]: the proof that a long turn was another thread's.
#[cfg(target_os = "linux")]
fn context_switches() -> Option<Switches> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is a valid, writable `rusage` for the call to fill;
    // zeroed memory is a valid `rusage` too (integers and `timeval`s), so
    // it may be read whatever the call did.
    let ok = unsafe { libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()) } == 0;
    // SAFETY: as above: zeroed, or filled by the kernel.
    let usage = ok.then(|| unsafe { usage.assume_init() })?;
    Some(Switches {
        involuntary: usage.ru_nivcsw,
        voluntary: usage.ru_nvcsw,
    })
}

// Elsewhere no worker polls (see `Shared::enabled`).
#[cfg(not(target_os = "linux"))]
fn thread_cpu_time() -> Option<Duration> {
    None
}

#[cfg(not(target_os = "linux"))]
fn context_switches() -> Option<Switches> {
    None
}

/// How often the main thread reads `/proc/stat`, while some worker wants
/// to poll.
pub const WATCH_EVERY: Duration = Duration::from_millis(100);

/// Reads the machine's idle time every [`WATCH_EVERY`] and tells the
/// workers whether they may poll; rests, reading nothing, while no worker
/// wants to. Never ends.
pub async fn watch_spare(shared: &Shared) {
    let mut spare = Spare::new(shared.cores);
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = (Instant::now(), 0u64);
    loop {
        if shared.wanting.load(Ordering::Acquire) == 0 {
            // No worker would poll: an idle server reads nothing, and
            // decides afresh when one would.
            spare.rest();
            tell(shared, || false);
            shared.wanted.notified().await;
            tick.reset();
        }
        tick.tick().await;
        let times = CpuTimes::read();
        let now = (Instant::now(), shared.polled_ns.load(Ordering::Relaxed));
        let polled = Duration::from_nanos(now.1.saturating_sub(last.1));
        let elapsed = now.0 - last.0;
        last = now;
        tell(shared, || shared.decide(&mut spare, times, polled, elapsed));
    }
}

impl Shared {
    /// Whether workers may poll, from a reading of the machine (`None`
    /// where it could not be read) and the polling since the last. A
    /// preemption is told to `spare` with the first reading that tells
    /// anything: one that fails says no for now, and must not take the
    /// preemption with it, or the next reading would keep polling on at
    /// the lower line, as if none had happened.
    fn decide(
        &self,
        spare: &mut Spare,
        times: Option<CpuTimes>,
        polled: Duration,
        elapsed: Duration,
    ) -> bool {
        let Some(times) = times else {
            return false;
        };
        let preempted = self.preempted.swap(false, Ordering::Relaxed);
        spare.reading(times, polled, elapsed, preempted)
    }
}

/// Sets whether workers may poll to what `decide` says. `decide` runs
/// under the channel's lock, so that a poller preempted meanwhile is not
/// overruled: it sets its flag, then takes the lock to say no.
fn tell(shared: &Shared, decide: impl FnOnce() -> bool) {
    let mut allowed = false;
    let changed = shared.allowed.send_if_modified(|now| {
        allowed = decide();
        std::mem::replace(now, allowed) != allowed
    });
    if changed {
        tracing::debug!(allowed, "busy polling");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Arc;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// Fills `w` with gaps of `gap`.
    fn fill(w: &mut Window, gap: Duration) {
        for _ in 0..GAPS {
            w.gap(gap);
        }
    }

    #[test]
    fn the_window_is_twice_the_median_gap() {
        let mut w = Window::new(us(200));
        assert_eq!(w.get(), Duration::ZERO);
        // One client sending a request at a time: gaps of about 90 us
        // while the worker sleeps.
        for _ in 0..CATCH - 1 {
            w.gap(us(90));
        }
        assert_eq!(w.get(), Duration::ZERO, "too few gaps seen yet");
        w.gap(us(90));
        assert_eq!(w.get(), us(180));
        // Polling answers sooner, so the gaps shrink, and the window.
        fill(&mut w, us(30));
        assert_eq!(w.get(), us(60));
        // Slow gaps, fewer than half, change nothing.
        for i in 0..GAPS {
            w.gap(if i % 3 == 0 { us(5000) } else { us(30) });
        }
        assert_eq!(w.get(), us(60));
    }

    #[test]
    fn the_window_stops_at_the_longest() {
        let mut w = Window::new(us(200));
        fill(&mut w, us(180));
        assert_eq!(w.get(), us(200));
        // A longest window shorter than any gap seen is kept to too.
        let mut w = Window::new(us(10));
        fill(&mut w, us(9));
        assert_eq!(w.get(), us(10));
    }

    #[test]
    fn sparse_requests_are_not_polled_for() {
        let mut w = Window::new(us(200));
        fill(&mut w, us(50));
        assert!(w.get() > Duration::ZERO);
        // More than half the gaps long: polling would mostly be waste.
        for i in 0..GAPS {
            w.gap(if i <= GAPS / 2 {
                Duration::from_millis(3)
            } else {
                us(50)
            });
        }
        assert_eq!(w.get(), Duration::ZERO);
        fill(&mut w, Duration::from_secs(1));
        assert_eq!(w.get(), Duration::ZERO);
    }

    #[test]
    fn a_window_of_nothing_never_grows() {
        let mut w = Window::new(Duration::ZERO);
        for gap in [0, 1, 25, 1000].repeat(GAPS) {
            w.gap(us(gap));
            assert_eq!(w.get(), Duration::ZERO);
        }
    }

    const STAT: &str = "cpu  100 5 50 1000 20 1 2 3 7 0\n\
                        cpu0 50 2 25 500 10 1 1 2 3 0\n\
                        cpu1 50 3 25 500 10 0 1 1 4 0\n\
                        intr 12345\nctxt 678\n";

    #[test]
    fn proc_stat_reads_as_linux_writes_it() {
        assert_eq!(
            CpuTimes::parse(STAT),
            Some(CpuTimes {
                idle: 1020,
                total: 1181,
                cores: 2
            })
        );
    }

    #[test]
    fn anything_else_is_no_reading() {
        for bad in [
            "",
            "cpu0 1 2 3 4 5 6 7 8\n",
            "cpu 1 2 3 4 5 6 7\ncpu0 1 2 3 4 5 6 7 8\n",
            "cpu 1 2 3 x 5 6 7 8\ncpu0 1 2 3 4 5 6 7 8\n",
            "cpu 1 2 3 4 5 6 7 8\nintr 5\n",
            "cpu 18446744073709551615 2 3 4 5 6 7 8\ncpu0 1\n",
        ] {
            assert_eq!(CpuTimes::parse(bad), None, "{bad:?}");
        }
    }

    /// Between two readings of a [`Spare`].
    const TICK: Duration = Duration::from_millis(100);

    /// A [`Spare`] for `cores` cores that has taken its first reading, of
    /// a machine just started: that only starts an interval.
    fn spare(cores: usize) -> Spare {
        let mut s = Spare::new(cores);
        assert!(!s.reading(times(0, 0), Duration::ZERO, TICK, false));
        s
    }

    fn times(idle: u64, total: u64) -> CpuTimes {
        CpuTimes {
            idle,
            total,
            cores: 2,
        }
    }

    #[test]
    fn polling_starts_with_a_core_to_spare_and_stops_without_one() {
        let mut s = spare(2);
        // Two cores, 1.5 of them idle.
        assert!(s.reading(times(15, 20), Duration::ZERO, TICK, false));
        // Polling takes one whole core; half of the other is idle: the
        // polled core counts as spare.
        assert!(s.reading(times(20, 40), TICK, TICK, false));
        // A busy machine: polling got a fifth of a core, nothing idle.
        assert!(!s.reading(times(20, 60), TICK / 5, TICK, false));
        // 0.8 of a core idle is below the start.
        assert!(!s.reading(times(28, 80), Duration::ZERO, TICK, false));
    }

    #[test]
    fn a_load_near_the_line_does_not_switch_at_every_reading() {
        let mut s = spare(2);
        assert!(s.reading(times(10, 20), Duration::ZERO, TICK, false));
        // 0.7 core spare: below the start but above the stop.
        assert!(s.reading(times(17, 40), Duration::ZERO, TICK, false));
        assert!(!s.reading(times(22, 60), Duration::ZERO, TICK, false));
        assert!(!s.reading(times(29, 80), Duration::ZERO, TICK, false));
    }

    #[test]
    fn a_preempted_poller_stops_polling_until_a_core_is_spare() {
        let mut s = spare(2);
        assert!(s.reading(times(20, 20), Duration::ZERO, TICK, false));
        assert!(!s.reading(times(40, 40), Duration::ZERO, TICK, true));
        // 0.8 of a core spare would have kept it going, but does not
        // start it again.
        assert!(!s.reading(times(48, 60), Duration::ZERO, TICK, false));
        assert!(s.reading(times(58, 80), Duration::ZERO, TICK, false));
    }

    /// A count of a thread's switches: involuntary, then voluntary.
    fn count(involuntary: libc::c_long, voluntary: libc::c_long) -> Option<Switches> {
        Some(Switches {
            involuntary,
            voluntary,
        })
    }

    #[test]
    fn a_long_turn_is_another_threads_only_if_this_one_did_not_sleep() {
        assert!(kept_off(count(3, 7), count(4, 7)), "taken off its core");
        assert!(!kept_off(count(3, 7), count(3, 7)), "never left it");
        // Slept of its own accord (a lock, a blocking write): that alone
        // makes a turn long, whatever switch of another's came with it.
        assert!(!kept_off(count(3, 7), count(4, 8)));
        assert!(!kept_off(count(3, 7), count(3, 8)));
        assert!(!kept_off(None, count(4, 7)));
        assert!(!kept_off(count(3, 7), None));
    }

    #[test]
    fn a_long_turn_is_judged_by_a_recent_count() {
        let t0 = Instant::now();
        let ms = |n: f64| t0 + Duration::from_secs_f64(n / 1000.0);
        let mut recent = Recent::new(t0, count(0, 0));
        // Short turns on a young count: nothing counted.
        assert!(!recent.turn(ms(0.5), false, || panic!("counted too soon")));
        // An involuntary switch came and went; the count ages and is made
        // again, with it.
        assert!(!recent.turn(ms(1.5), false, || count(1, 0)));
        // A long turn with no switch since: not another thread's, though
        // one happened since the poll began.
        assert!(!recent.turn(ms(2.0), true, || count(1, 0)));
        // One switched out, and no sleep of its own: another thread's.
        assert!(recent.turn(ms(2.5), true, || count(2, 0)));
        // Counted again after it: the next long turn starts from there.
        assert!(!recent.turn(ms(2.6), true, || count(2, 1)));
    }

    /// The counts the kernel keeps tell a sleep apart: a poller's thread
    /// that blocks for longer than a preemption is not taken as one.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_thread_that_sleeps_is_not_kept_off_its_core() {
        let before = context_switches();
        std::thread::sleep(PREEMPTED_FOR * 3);
        let after = context_switches();
        let (Some(b), Some(a)) = (before, after) else {
            panic!("getrusage(RUSAGE_THREAD) failed");
        };
        assert!(
            a.voluntary > b.voluntary,
            "a sleep not counted: {b:?} {a:?}"
        );
        assert!(!kept_off(before, after));
    }

    #[test]
    fn a_failed_reading_keeps_a_preemption_for_the_next() {
        let shared = Shared::new(us(200), 2);
        let mut s = spare(2);
        assert!(shared.decide(&mut s, Some(times(20, 20)), Duration::ZERO, TICK));
        shared.preempted();
        assert!(!shared.decide(&mut s, None, Duration::ZERO, TICK));
        // 0.7 of a core spare: enough to go on, not to start again after
        // a preemption.
        assert!(!shared.decide(&mut s, Some(times(27, 40)), Duration::ZERO, TICK));
        assert!(!shared.preempted.load(Ordering::Relaxed), "told once");
        // 1.8 cores spare.
        assert!(shared.decide(&mut s, Some(times(45, 60)), Duration::ZERO, TICK));
    }

    #[test]
    fn a_reading_that_tells_nothing_keeps_the_decision() {
        let mut s = spare(2);
        assert!(s.reading(times(20, 20), Duration::ZERO, TICK, false));
        // No tick passed; the clock went nowhere.
        assert!(s.reading(times(20, 20), Duration::ZERO, TICK, false));
        assert!(s.reading(times(20, 40), Duration::ZERO, Duration::ZERO, false));
    }

    #[test]
    fn a_process_held_to_fewer_cores_than_the_machine_never_polls() {
        let mut s = spare(1);
        // Two cores, both idle: but only one is this process's.
        assert!(!s.reading(times(20, 20), Duration::ZERO, TICK, false));
    }

    #[test]
    fn a_rest_forgets_the_decision() {
        let mut s = spare(2);
        assert!(s.reading(times(20, 20), Duration::ZERO, TICK, false));
        s.rest();
        // The first reading after a rest only starts the interval.
        assert!(!s.reading(times(1000, 1000), Duration::ZERO, TICK, false));
        assert!(s.reading(times(1020, 1020), Duration::ZERO, TICK, false));
    }

    /// Runs `test` on a current-thread runtime like a worker's, with
    /// tokio's clock paused: it jumps to the next timer whenever every
    /// task waits, so a second's timeout costs no second.
    fn on_a_worker(test: impl std::future::Future<Output = ()>) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap()
            .block_on(test);
    }

    /// A worker's poller on two cores, and what it shares, polling for a
    /// second at most: longer than any gap here comes near, however slow
    /// the machine running the test.
    fn poller() -> (Arc<Shared>, tokio::task::JoinHandle<()>) {
        let shared = Arc::new(Shared::new(Duration::from_secs(1), 2));
        let spinning = Arc::clone(&shared);
        (shared, tokio::spawn(async move { spin(&spinning).await }))
    }

    /// Serves `n` requests back to back; true if the poller was polling
    /// after any of them.
    async fn requests(shared: &Shared, n: usize) -> bool {
        let mut polled = false;
        for _ in 0..n {
            served();
            // The poller runs, and if it polls, yields back at once.
            tokio::task::yield_now().await;
            polled |= shared.polling.load(Ordering::Relaxed) == 1;
        }
        polled
    }

    /// Waits for the poller to stop polling, failing after 10 s of real
    /// time: while it polls it never lets the paused clock move on, so a
    /// poller that never stops would hang a test that only slept.
    async fn stops_polling(shared: &Shared) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while shared.polling.load(Ordering::Relaxed) != 0 {
            assert!(Instant::now() < deadline, "never stopped polling");
            tokio::task::yield_now().await;
        }
    }

    #[test]
    fn a_poller_polls_while_requests_come_and_rests_when_they_stop() {
        on_a_worker(async {
            let (shared, poller) = poller();
            shared.allowed.send_replace(true);
            assert!(requests(&shared, GAPS * 4).await, "never polled");
            assert_eq!(shared.wanting.load(Ordering::Relaxed), 1);
            // The requests stop: within its window the poller sleeps ...
            stops_polling(&shared).await;
            // ... and within a second it no longer wants to poll.
            tokio::time::sleep(GIVE_UP_AFTER * 2).await;
            assert_eq!(shared.polling.load(Ordering::Relaxed), 0);
            assert_eq!(shared.wanting.load(Ordering::Relaxed), 0);
            poller.abort();
        });
    }

    #[test]
    fn a_poller_refused_a_core_gives_up_wanting_one() {
        on_a_worker(async {
            let (shared, poller) = poller();
            assert!(!requests(&shared, GAPS * 4).await, "polled unallowed");
            assert_eq!(shared.wanting.load(Ordering::Relaxed), 1);
            tokio::time::sleep(GIVE_UP_AFTER * 2).await;
            assert_eq!(shared.wanting.load(Ordering::Relaxed), 0);
            // Allowed now: the next requests are polled for again.
            shared.allowed.send_replace(true);
            assert!(requests(&shared, GAPS * 4).await, "never polled");
            poller.abort();
        });
    }

    /// A worker shutting down drops its poller wherever it is: mid-poll,
    /// its place and its wanting are given back all the same.
    #[test]
    fn a_poller_dropped_mid_poll_gives_its_place_back() {
        on_a_worker(async {
            let (shared, poller) = poller();
            shared.allowed.send_replace(true);
            let deadline = Instant::now() + Duration::from_secs(10);
            // Requests until one leaves the poller polling.
            while !requests(&shared, 1).await {
                assert!(Instant::now() < deadline, "never polled");
            }
            assert_eq!(shared.wanting.load(Ordering::Relaxed), 1);
            poller.abort();
            // The abort takes effect at the task's next poll.
            while !poller.is_finished() {
                tokio::task::yield_now().await;
            }
            assert_eq!(shared.polling.load(Ordering::Relaxed), 0, "place kept");
            assert_eq!(shared.wanting.load(Ordering::Relaxed), 0, "still wants");
        });
    }

    #[test]
    fn places_to_poll_are_one_fewer_than_the_cores() {
        let shared = Shared::new(us(200), 3);
        shared.allowed.send_replace(true);
        let mut first = shared.start().expect("a first place");
        let second = shared.start().expect("a second place");
        // Refusals, however many, give back nothing they did not take.
        for _ in 0..3 {
            assert!(shared.start().is_none());
            assert_eq!(shared.polling.load(Ordering::Relaxed), 2);
        }
        first.polled = us(10);
        drop(first);
        let third = shared.start().expect("the place given back");
        assert!(shared.start().is_none());
        assert_eq!(shared.polled_ns.load(Ordering::Relaxed), 10_000);
        drop((second, third));
        assert_eq!(shared.polling.load(Ordering::Relaxed), 0);
        let one_core = Shared::new(us(200), 1);
        assert!(!one_core.enabled());
        let off = Shared::new(Duration::ZERO, 8);
        assert!(!off.enabled());
        let unread = Shared::new(us(200), 3);
        assert!(unread.start().is_none(), "not before a reading allows it");
        assert_eq!(unread.polling.load(Ordering::Relaxed), 0);
        unread.allowed.send_replace(true);
        assert!(unread.start().is_some(), "a refusal spoilt the count");
    }
}
