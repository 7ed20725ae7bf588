//! Recent UDP responses, so that a retransmitted request is answered again
//! without being executed twice.
//!
//! A UDP client resends a request whose response it did not get; executing
//! it again would turn a lost REGACK into a REGNACK (the id is now held
//! under the token the client never saw). Responses are kept per
//! (source address, `Request-Id`) for a fixed time, longer than a client
//! retransmits, with the method they answered: as in SIP, a request of
//! another method under the same id is no retransmission. Every entry
//! lives equally long, so insertion order is expiry order and a queue is
//! the whole index. Memory is bounded too: past the cap, the oldest
//! entries go first.

use std::collections::VecDeque;
use std::hash::RandomState;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chat_proto::rendezvous::Method;
use hashbrown::{Equivalent, HashMap};

/// The map and the queue share one allocation of the id.
type Key = (SocketAddr, Arc<str>);

/// A key as a request carries it, to look up without allocating. It hashes
/// as a [`Key`] does: field by field, the id as a `str`.
#[derive(Hash)]
struct Lookup<'a>(SocketAddr, &'a str);

impl Equivalent<Key> for Lookup<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        self.0 == key.0 && self.1 == &*key.1
    }
}

/// A response kept, and the method of the request it answered (`None`:
/// not one of ours).
#[derive(Debug, PartialEq, Eq)]
pub struct Kept {
    pub method: Option<Method>,
    pub response: Vec<u8>,
}

/// Responses by (source, Request-Id), for `ttl`.
pub struct ReplayCache {
    ttl: Duration,
    max_bytes: usize,
    bytes: usize,
    /// Each response with the stamp of its queue entry.
    map: HashMap<Key, (u64, Kept), RandomState>,
    /// Expiry order. A key inserted twice has two queue entries; only the
    /// one whose stamp matches the map removes it.
    order: VecDeque<(Duration, u64, Key)>,
    next_stamp: u64,
}

impl ReplayCache {
    /// `max_bytes` bounds the responses and keys held.
    pub fn new(ttl: Duration, max_bytes: usize) -> ReplayCache {
        ReplayCache {
            ttl,
            max_bytes,
            bytes: 0,
            map: HashMap::with_hasher(RandomState::new()),
            order: VecDeque::new(),
            next_stamp: 0,
        }
    }

    /// The response already sent under this id, if still held.
    pub fn get(&mut self, source: SocketAddr, request_id: &str, now: Duration) -> Option<&Kept> {
        self.expire(now);
        self.map.get(&Lookup(source, request_id)).map(|(_, k)| k)
    }

    /// Remembers the response sent for this request, of `method`.
    pub fn insert(
        &mut self,
        source: SocketAddr,
        request_id: &str,
        method: Option<Method>,
        response: Vec<u8>,
        now: Duration,
    ) {
        self.expire(now);
        let key: Key = (source, Arc::from(request_id));
        let cost = Self::map_cost(&key, &response) + Self::queue_cost(&key);
        if cost > self.max_bytes {
            return;
        }
        while self.bytes + cost > self.max_bytes && self.pop_oldest() {}
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        let kept = Kept { method, response };
        if let Some((_, old)) = self.map.insert(key.clone(), (stamp, kept)) {
            // Same key again (a client reusing an id): the newer response
            // replaces the older, whose queue entry then expires harmlessly.
            self.bytes -= Self::map_cost(&key, &old.response);
        }
        self.bytes += cost;
        self.order.push_back((now + self.ttl, stamp, key));
    }

    /// Responses kept (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }

    // Byte costs include a fixed allowance for the table and queue slots,
    // so that many tiny entries are bounded as well as a few large ones.
    fn map_cost(key: &Key, response: &[u8]) -> usize {
        response.len() + key.1.len() + 64
    }

    fn queue_cost(key: &Key) -> usize {
        key.1.len() + 64
    }

    fn expire(&mut self, now: Duration) {
        while self
            .order
            .front()
            .is_some_and(|(deadline, _, _)| *deadline <= now)
        {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) -> bool {
        let Some((_, stamp, key)) = self.order.pop_front() else {
            return false;
        };
        self.bytes -= Self::queue_cost(&key);
        if self.map.get(&key).is_some_and(|(s, _)| *s == stamp)
            && let Some((_, old)) = self.map.remove(&key)
        {
            self.bytes -= Self::map_cost(&key, &old.response);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// The response kept under `id`, as bytes.
    fn kept<'c>(
        c: &'c mut ReplayCache,
        from: SocketAddr,
        id: &str,
        now: Duration,
    ) -> Option<&'c [u8]> {
        c.get(from, id, now).map(|k| k.response.as_slice())
    }

    #[test]
    fn answers_within_ttl_and_forgets_after() {
        let mut c = ReplayCache::new(s(30), 1 << 20);
        c.insert(addr(1), "r1", None, b"resp".to_vec(), s(0));
        assert_eq!(kept(&mut c, addr(1), "r1", s(29)), Some(&b"resp"[..]));
        assert_eq!(kept(&mut c, addr(1), "r1", s(30)), None);
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn keys_are_per_source_and_id() {
        let mut c = ReplayCache::new(s(30), 1 << 20);
        c.insert(addr(1), "r1", None, b"a".to_vec(), s(0));
        assert_eq!(kept(&mut c, addr(2), "r1", s(1)), None);
        assert_eq!(kept(&mut c, addr(1), "r2", s(1)), None);
    }

    #[test]
    fn byte_cap_evicts_oldest_first() {
        // Each entry costs 8 + 2 + 64 in the map and 2 + 64 in the queue.
        let mut c = ReplayCache::new(s(30), 2 * 140 + 10);
        c.insert(addr(1), "r1", None, vec![0; 8], s(0));
        c.insert(addr(1), "r2", None, vec![0; 8], s(1));
        c.insert(addr(1), "r3", None, vec![0; 8], s(2));
        assert_eq!(kept(&mut c, addr(1), "r1", s(2)), None);
        assert!(kept(&mut c, addr(1), "r2", s(2)).is_some());
        assert!(kept(&mut c, addr(1), "r3", s(2)).is_some());
        // Larger than the whole cap: not kept, nothing evicted.
        c.insert(addr(1), "big", None, vec![0; 300], s(3));
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn reused_id_keeps_the_newest_response_for_its_full_ttl() {
        let mut c = ReplayCache::new(s(30), 1 << 20);
        c.insert(addr(1), "r", None, b"old".to_vec(), s(0));
        c.insert(addr(1), "r", None, b"new".to_vec(), s(20));
        assert_eq!(kept(&mut c, addr(1), "r", s(31)), Some(&b"new"[..]));
        assert_eq!(kept(&mut c, addr(1), "r", s(50)), None);
        assert_eq!(c.bytes, 0);
    }
}
