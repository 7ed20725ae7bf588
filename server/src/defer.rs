//! When to ask the kernel to hold new connections until they send
//! (`TCP_DEFER_ACCEPT`).
//!
//! Deferring saves a busy worker system calls: a connection reaches
//! `accept` with its request already there, so it is read at once and
//! never registered with epoll. But it costs an idle worker time. Without
//! it, the worker is woken by the client's handshake and is awake by the
//! time the request follows; with it, the worker is woken only by the
//! request, so the whole wake-up (tens of microseconds on a virtual
//! machine) comes after the request, on every request. Measured on the
//! 2-core machine of `docs/BENCHMARKS.md`: deferring gains about 15% of
//! transient connections/s at 64 clients and loses about 6% at one.
//!
//! So each worker decides from what it sees: whether its runtime ran out
//! of work (parked, in tokio's terms: waited on epoll, however briefly)
//! between one accepted connection and the next. A worker that idles
//! before nearly every connection is waiting for clients, and does not
//! defer; one that mostly finds the next connection queued is busy, and
//! defers. A moving average with a gap between the two thresholds keeps
//! a load near the boundary from switching the option on every
//! connection.

/// What the policy decides from one accepted connection.
#[derive(Debug)]
pub struct Policy {
    /// Moving average of "idled before this connection", in 1/`ONE`.
    idled: u32,
    deferring: bool,
}

/// The average's unit.
const ONE: u32 = 1024;
/// Each connection moves the average by 1/`WEIGHT` of the difference.
const WEIGHT: u32 = 16;
/// Start deferring below this share of connections the worker idled
/// before. The shares measured (transient connections, 2 workers) were,
/// not deferring: 100% at one client, 73% at 4, 49% at 16, 41% at 64;
/// deferring: 100%, 68%, 40%, 28%. Deferring is a loss only at one
/// client, where the share is the same either way, so the worker
/// switches back.
const START_BELOW: u32 = ONE * 80 / 100;
/// Stop deferring above this share.
const STOP_ABOVE: u32 = ONE * 94 / 100;

impl Default for Policy {
    /// An idle worker: not deferring.
    fn default() -> Policy {
        Policy {
            idled: ONE,
            deferring: false,
        }
    }
}

impl Policy {
    /// Whether connections are being deferred.
    pub fn deferring(&self) -> bool {
        self.deferring
    }

    /// Takes one accepted connection, and whether the worker idled since
    /// the one before. Returns the new setting when it changes.
    pub fn accepted(&mut self, idled: bool) -> Option<bool> {
        let sample = if idled { ONE } else { 0 };
        // The average stays within 0..=ONE, so neither side overflows.
        self.idled = self.idled - self.idled / WEIGHT + sample / WEIGHT;
        let want = if self.deferring {
            self.idled <= STOP_ABOVE
        } else {
            self.idled < START_BELOW
        };
        (want != self.deferring).then(|| {
            self.deferring = want;
            want
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `n` connections; returns every change of setting.
    fn feed(p: &mut Policy, n: usize, mut idled: impl FnMut(usize) -> bool) -> Vec<bool> {
        (0..n).filter_map(|i| p.accepted(idled(i))).collect()
    }

    #[test]
    fn an_idle_worker_never_defers() {
        let mut p = Policy::default();
        assert!(feed(&mut p, 10_000, |_| true).is_empty());
        assert!(!p.deferring());
    }

    #[test]
    fn a_busy_worker_defers_soon_and_stays() {
        let mut p = Policy::default();
        let changes = feed(&mut p, 100, |i| i % 4 == 0);
        assert_eq!(changes, vec![true]);
        assert!(p.deferring());
        assert!(feed(&mut p, 10_000, |i| i % 4 == 0).is_empty());
    }

    #[test]
    fn a_worker_going_idle_stops_deferring() {
        let mut p = Policy::default();
        feed(&mut p, 200, |_| false);
        assert!(p.deferring());
        // One connection after an idle spell is not enough ...
        assert_eq!(p.accepted(true), None);
        // ... a run of them is.
        assert_eq!(feed(&mut p, 200, |_| true), vec![false]);
    }

    #[test]
    fn a_load_between_the_thresholds_does_not_flap() {
        // 7 of 8 connections woke the worker: between the two thresholds.
        for start in [Policy::default(), {
            let mut busy = Policy::default();
            feed(&mut busy, 200, |_| false);
            busy
        }] {
            let mut p = start;
            let was = p.deferring();
            let changes = feed(&mut p, 100_000, |i| i % 8 != 0);
            assert!(changes.len() <= 1, "{changes:?}");
            if was {
                assert!(changes.is_empty(), "a deferring worker keeps deferring");
            }
        }
    }

    #[test]
    fn the_average_stays_in_range() {
        let mut p = Policy::default();
        for i in 0..100_000u32 {
            p.accepted(i.wrapping_mul(2_654_435_761) % 3 == 0);
            assert!(p.idled <= ONE);
        }
    }
}
