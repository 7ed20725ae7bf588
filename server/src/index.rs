//! The registry's index: from an id's hash to its record's position in the
//! queue.
//!
//! It exists because of cache misses. At a million registrations every
//! probe of the index misses the cache, and a general-purpose table
//! (hashbrown, which this replaces) touches two far-apart places for a
//! fresh REGISTER: the control bytes it searches, then the slot it writes,
//! in another array. Here a slot holds the hash itself, eight slots fill a
//! cache line, and a hash's probe starts at the beginning of the line the
//! hash picks. So the search that finds a fresh id absent, and the insert
//! after it, touch one line, and a REGISTER can ask for that line
//! ([`Whereabouts::prefetch`]) before it takes the registry's lock.
//! Measured in-process with `cargo run --release -p chat-server --example
//! registry` (see docs/BENCHMARKS.md).
//!
//! The index only answers "which positions may hold this hash"; the
//! registry checks the record's id. Slots are never removed one at a time:
//! the registry leaves slots of lapsed records stale and has them dropped
//! in one pass ([`Index::retain`]). That is what lets a search stop at the
//! first empty slot (linear probing without deletions).

use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;

/// Slots per 64-byte line.
const LINE: usize = 8;

/// A slot with hash 0 is empty; stored hashes have their low bit set (the
/// line is picked from the high bits, so that bit is free).
const EMPTY: u32 = 0;

/// One entry: a record's position and its id's hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Zeroable)]
pub struct Slot {
    pub hash: u32,
    pub pos: u32,
}

#[derive(Clone, Copy, bytemuck::Zeroable)]
#[repr(C, align(64))]
struct Line([Slot; LINE]);

/// A table of `n` empty lines (an empty slot is all zeros).
///
/// A large table is backed by 2 MiB pages where the system allows it,
/// asked for before its first write, when the kernel picks the pages. A
/// fresh REGISTER reads one line of the index at random, and at a million
/// registrations (a 16 MiB table) that read also missed the TLB with
/// 4 KiB pages: the CPU walked the page tables before the line could even
/// be asked for. Measured machine-wide at keep-alive 64 (`perf record
/// -a`, the samples at the index's prefetch per request served): about
/// 200 ns per REGISTER with 4 KiB pages, 130 with 2 MiB ones.
fn empty_lines(n: usize) -> Vec<Line> {
    let mut lines = Vec::with_capacity(n);
    advise_huge_pages(lines.spare_capacity_mut());
    lines.resize(n, bytemuck::Zeroable::zeroed());
    lines
}

/// The smallest table worth asking 2 MiB pages for: below it, no whole
/// huge page fits inside the table for certain.
const HUGE_PAGES_FROM: usize = 4 << 20;

/// Asks the kernel to back `memory` (not yet written) with transparent
/// huge pages. Only a hint: where they are off or unavailable the memory
/// stays on 4 KiB pages and nothing else changes.
#[cfg(target_os = "linux")]
fn advise_huge_pages<T>(memory: &mut [std::mem::MaybeUninit<T>]) {
    const PAGE: usize = 4096;
    let bytes = std::mem::size_of_val(memory);
    if bytes < HUGE_PAGES_FROM {
        return;
    }
    // Rounded inward to whole pages, so the advice covers nothing but
    // this table; the kernel then uses a huge page for each aligned 2 MiB
    // inside it.
    let start = memory.as_mut_ptr().cast::<u8>();
    let skip = start.addr().next_multiple_of(PAGE) - start.addr();
    let len = (bytes - skip) / PAGE * PAGE;
    // SAFETY: `[start + skip, start + skip + len)` lies within `memory`,
    // which this function borrows exclusively, and is page-aligned as
    // madvise requires. MADV_HUGEPAGE changes neither the mapping nor its
    // contents, only which physical pages will back it, so no reference
    // anywhere can observe it. Its result is ignored on purpose: a kernel
    // without transparent huge pages refuses it, and 4 KiB pages are
    // what we had.
    unsafe {
        libc::madvise(start.add(skip).cast(), len, libc::MADV_HUGEPAGE);
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge_pages<T>(_memory: &mut [std::mem::MaybeUninit<T>]) {}

/// Asks the CPU to start loading the line at `line`. A prefetch is only
/// a hint: it reads nothing the program sees and never faults, even at an
/// address that is no longer (or never was) mapped.
pub(crate) fn prefetch<T>(line: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `_mm_prefetch` is `unsafe` only as an intrinsic; it does not
    // dereference `line` as far as the program is concerned (see above),
    // so any address is sound. The SSE it needs is part of x86_64.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = line;
}

/// Where an index's line table is, readable without the registry's lock,
/// so that a REGISTER can ask for its index line before it queues for the
/// lock (see [`crate::registry::Lookahead`]). The registry publishes after
/// every call that may have moved the table. A reader may see the table
/// as it was a moment ago, even one since freed: its prefetch is then
/// wasted, never wrong, as a prefetch reads nothing. Every REGISTER reads
/// the word and hardly any writes it, so it has a cache line to itself,
/// which no neighbour's write takes from the reading worker.
#[derive(Debug, Default)]
pub struct Whereabouts(CachePadded<AtomicUsize>);

impl Whereabouts {
    /// Records where `index`'s table is now.
    pub fn publish(&self, index: &Index) {
        let now = index.whereabouts();
        // Relaxed: the word is one value, read only to aim a prefetch, and
        // no other memory is published through it.
        if self.0.load(Ordering::Relaxed) != now {
            self.0.store(now, Ordering::Relaxed);
        }
    }

    /// Asks the CPU to start loading `hash`'s first line, in the table as
    /// last published, so that a search soon after does not wait for memory.
    pub fn prefetch(&self, hash: u32) {
        if let Some(line) = self.line(hash) {
            prefetch(line);
        }
    }

    /// The address of `hash`'s first line in the table last published.
    /// Built from an address alone and never dereferenced: only a prefetch
    /// sees it.
    fn line(&self, hash: u32) -> Option<*const Line> {
        let word = self.0.load(Ordering::Relaxed);
        if word == 0 {
            return None;
        }
        let table = std::ptr::without_provenance::<Line>(word & !63);
        Some(table.wrapping_add(line_of(hash, 1u64 << (word & 63))))
    }
}

/// The line `hash`'s probe starts at, in a table of `lines` lines: picked
/// by the hash's high bits.
fn line_of(hash: u32, lines: u64) -> usize {
    ((u64::from(hash) * lines) >> 32) as usize
}

/// Hash → positions, at most half full.
pub struct Index {
    /// A power of two of them, at least one.
    lines: Vec<Line>,
    len: usize,
}

fn stored(hash: u32) -> u32 {
    hash | 1
}

impl Index {
    /// An index that holds `entries` before it grows.
    pub fn with_capacity(entries: usize) -> Index {
        Index {
            lines: empty_lines(lines_for(entries)),
            len: 0,
        }
    }

    /// Slots in use, stale ones included.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entries held before the next insert grows the index: half its
    /// slots, which keeps most searches within one line.
    pub fn capacity(&self) -> usize {
        self.lines.len() * LINE / 2
    }

    /// The first slot of `hash`'s probe: the start of a line picked by the
    /// hash's high bits.
    fn home(&self, hash: u32) -> usize {
        line_of(hash, self.lines.len() as u64) * LINE
    }

    fn slot(&self, i: usize) -> Slot {
        self.lines[i / LINE].0[i % LINE]
    }

    fn slot_mut(&mut self, i: usize) -> &mut Slot {
        &mut self.lines[i / LINE].0[i % LINE]
    }

    /// Where the line table is now, for [`Whereabouts::publish`]: its
    /// address and log2 of its length in one word. The table is 64-byte
    /// aligned, so the address's low 6 bits are free, and the length is a
    /// power of two below 2⁶³.
    fn whereabouts(&self) -> usize {
        debug_assert!(self.lines.len().is_power_of_two());
        self.lines.as_ptr().addr() | self.lines.len().trailing_zeros() as usize
    }

    /// The slots holding `hash` (stored form), in probe order: the run of
    /// full slots from its home, filtered.
    fn probe(&self, hash: u32) -> impl Iterator<Item = usize> + '_ {
        let mask = self.lines.len() * LINE - 1;
        let home = self.home(hash);
        (0..=mask)
            .map(move |k| (home + k) & mask)
            .take_while(|&i| self.slot(i).hash != EMPTY)
            .filter(move |&i| self.slot(i).hash == hash)
    }

    /// Positions stored under `hash`, in probe order, until `pick` accepts
    /// one; that one is returned.
    pub fn find(&self, hash: u32, mut pick: impl FnMut(u32) -> bool) -> Option<u32> {
        self.probe(stored(hash))
            .map(|i| self.slot(i).pos)
            .find(|&pos| pick(pos))
    }

    /// Moves the entry (`hash`, `from`) to position `to`; false if there
    /// is no such entry.
    pub fn repoint(&mut self, hash: u32, from: u32, to: u32) -> bool {
        let found = self.probe(stored(hash)).find(|&i| self.slot(i).pos == from);
        if let Some(i) = found {
            self.slot_mut(i).pos = to;
        }
        found.is_some()
    }

    /// Adds an entry, growing the index first if it is at capacity. The
    /// caller makes sure no entry for the same record exists.
    pub fn insert(&mut self, hash: u32, pos: u32) {
        if self.len >= self.capacity() {
            self.rebuild(lines_for(self.len + 1), |_| true);
        }
        self.put(Slot {
            hash: stored(hash),
            pos,
        });
        self.len += 1;
    }

    /// Writes `slot` (hash already stored form) into the first empty slot
    /// of its probe; the index has room.
    fn put(&mut self, slot: Slot) {
        let mask = self.lines.len() * LINE - 1;
        let mut i = self.home(slot.hash);
        while self.slot(i).hash != EMPTY {
            i = (i + 1) & mask;
        }
        *self.slot_mut(i) = slot;
    }

    /// Keeps only the entries `keep` accepts, in one pass, in place.
    /// (`keep` sees hashes with their low bit set.)
    ///
    /// The pass starts just after an empty slot, so it meets every run of
    /// full slots from its start. Each kept entry is taken out and put
    /// back: it lands at the first empty slot of its probe, which is where
    /// it was or earlier (into a gap a dropped entry left), so every
    /// search still finds it before an empty slot.
    pub fn retain(&mut self, mut keep: impl FnMut(Slot) -> bool) {
        let slots = self.lines.len() * LINE;
        // Half full at most, so there is an empty slot.
        let Some(start) = (0..slots).find(|&i| self.slot(i).hash == EMPTY) else {
            return;
        };
        for k in 1..=slots {
            let i = (start + k) & (slots - 1);
            let s = self.slot(i);
            if s.hash == EMPTY {
                continue;
            }
            *self.slot_mut(i) = Slot {
                hash: EMPTY,
                pos: 0,
            };
            if keep(s) {
                self.put(s);
            } else {
                self.len -= 1;
            }
        }
    }

    pub fn clear(&mut self) {
        self.lines = empty_lines(self.lines.len());
        self.len = 0;
    }

    /// Gives back memory down to what the larger of `entries` and the
    /// entries kept need; entries `keep` rejects are dropped on the way.
    pub fn shrink_to(&mut self, entries: usize, mut keep: impl FnMut(Slot) -> bool) {
        let lines = lines_for(entries);
        if lines >= self.lines.len() {
            return;
        }
        // Count first: a shrink below what is kept stops at what it needs.
        let kept = self.slots().filter(|s| keep(*s)).count();
        let lines = lines.max(lines_for(kept));
        if lines < self.lines.len() {
            self.rebuild(lines, keep);
        }
    }

    /// Moves the kept entries into a fresh table of `lines` lines. The old
    /// table is read in order, and entries land near the same fraction of
    /// the new one, so both are walked more or less sequentially.
    fn rebuild(&mut self, lines: usize, mut keep: impl FnMut(Slot) -> bool) {
        let old = std::mem::replace(
            self,
            Index {
                lines: empty_lines(lines),
                len: 0,
            },
        );
        for s in old.slots().filter(|s| keep(*s)) {
            self.put(s);
            self.len += 1;
        }
    }

    /// Every entry, in table order (hashes in stored form).
    pub fn slots(&self) -> impl Iterator<Item = Slot> + '_ {
        self.lines
            .iter()
            .flat_map(|l| l.0)
            .filter(|s| s.hash != EMPTY)
    }
}

/// Lines (a power of two) for `entries` at half load.
fn lines_for(entries: usize) -> usize {
    (entries * 2).div_ceil(LINE).next_power_of_two().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_table_is_zeroed_memory() {
        // What `empty_lines` rests on: an empty slot is all zeros.
        let zero: Slot = bytemuck::Zeroable::zeroed();
        assert_eq!(zero.hash, EMPTY);
        let ix = Index::with_capacity(1000);
        assert!(ix.slots().next().is_none());
        assert_eq!(ix.find(0, |_| true), None);
    }

    /// The VmFlags of the mapping that holds `addr`, from /proc/self/smaps.
    #[cfg(target_os = "linux")]
    fn vm_flags(addr: usize) -> Option<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((a, b)) = range.split_once('-')
                && let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
            {
                inside = (a..b).contains(&addr);
            } else if inside && let Some(flags) = line.strip_prefix("VmFlags:") {
                return Some(flags.trim().to_owned());
            }
        }
        None
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_large_table_asks_for_huge_pages() {
        // `hg` is MADV_HUGEPAGE in proc(5). A kernel without transparent
        // huge pages refuses the advice; there is nothing to check then.
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            return;
        }
        let large = Index::with_capacity(2 << 20);
        let bytes = large.lines.len() * std::mem::size_of::<Line>();
        assert!(bytes >= 2 * HUGE_PAGES_FROM, "{bytes} bytes");
        let middle = large.lines.as_ptr().addr() + bytes / 2;
        let flags = vm_flags(middle).expect("the table is mapped");
        assert!(flags.split(' ').any(|f| f == "hg"), "VmFlags: {flags}");
        assert!(large.slots().next().is_none(), "and it is empty");
    }

    #[test]
    fn whereabouts_aim_at_the_line_a_search_reads_first() {
        let mut ix = Index::with_capacity(0);
        let at = Whereabouts::default();
        assert_eq!(at.line(7), None, "nothing published yet");
        let hashes = [0, 1, 0x8000_0000, u32::MAX, 2_654_435_761];
        // Through growth: the table moves and its length changes.
        for pos in 0..5000u32 {
            ix.insert(pos.wrapping_mul(2_654_435_761), pos);
            if pos % 1000 == 0 {
                at.publish(&ix);
                for h in hashes {
                    let first: *const Line = &ix.lines[ix.home(h) / LINE];
                    assert_eq!(
                        at.line(h),
                        Some(first),
                        "hash {h:#x}, {} lines",
                        ix.lines.len()
                    );
                }
            }
        }
    }

    #[test]
    fn a_line_is_a_cache_line() {
        assert_eq!(std::mem::size_of::<Line>(), 64);
        assert_eq!(std::mem::align_of::<Line>(), 64);
    }

    #[test]
    fn finds_what_was_inserted_and_nothing_else() {
        let mut ix = Index::with_capacity(0);
        for pos in 0..10_000u32 {
            ix.insert(pos.wrapping_mul(2_654_435_761), pos);
        }
        assert_eq!(ix.len(), 10_000);
        assert!(ix.capacity() >= 10_000);
        for pos in 0..10_000u32 {
            let h = pos.wrapping_mul(2_654_435_761);
            assert_eq!(ix.find(h, |p| p == pos), Some(pos));
        }
        assert_eq!(ix.find(12345, |_| true), None);
    }

    #[test]
    fn colliding_hashes_are_told_apart_by_the_caller() {
        let mut ix = Index::with_capacity(4);
        // The same line for all, and the same stored hash for 6 and 7.
        for (h, pos) in [(6, 1), (7, 2), (6, 3), (0, 4)] {
            ix.insert(h, pos);
        }
        let mut seen = Vec::new();
        assert_eq!(
            ix.find(7, |p| {
                seen.push(p);
                false
            }),
            None
        );
        assert_eq!(seen, [1, 2, 3]);
        assert_eq!(ix.find(6, |p| p == 3), Some(3));
        assert_eq!(ix.find(0, |p| p == 4), Some(4));
    }

    #[test]
    fn a_full_line_overflows_into_the_next_and_wraps() {
        // One line only at first: hashes that all pick the last line of a
        // grown table wrap to the first.
        let mut ix = Index::with_capacity(64);
        let lines = ix.lines.len() as u64;
        let last = (((lines - 1) << 32) / lines) as u32 + 1;
        for pos in 0..20 {
            ix.insert(last, pos);
        }
        for pos in 0..20 {
            assert_eq!(ix.find(last, |p| p == pos), Some(pos));
        }
        assert!(ix.lines[0].0.iter().any(|s| s.hash != EMPTY));
    }

    #[test]
    fn repoint_moves_one_entry() {
        let mut ix = Index::with_capacity(8);
        ix.insert(42, 1);
        ix.insert(42, 2);
        assert!(ix.repoint(42, 2, 9));
        assert!(!ix.repoint(42, 2, 9));
        assert!(!ix.repoint(44, 1, 9));
        let mut all: Vec<u32> = Vec::new();
        ix.find(42, |p| {
            all.push(p);
            false
        });
        assert_eq!(all, [1, 9]);
    }

    #[test]
    fn random_inserts_and_retains_agree_with_a_list() {
        // Few lines, and hashes from a small set, so that runs of full
        // slots are long and wrap around the end.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut ix = Index::with_capacity(0);
        let mut all: Vec<(u32, u32)> = Vec::new();
        for pos in 0..3000u32 {
            let hash = (next() % 40) as u32 * 0x0690_0000;
            ix.insert(hash, pos);
            all.push((hash, pos));
            if next() % 100 == 0 {
                let cut = (next() % 7) as u32;
                ix.retain(|s| s.pos % 7 != cut);
                all.retain(|&(_, p)| p % 7 != cut);
            }
            if next() % 50 == 0 {
                for &(hash, pos) in &all {
                    assert_eq!(ix.find(hash, |p| p == pos), Some(pos), "{hash} {pos}");
                }
            }
        }
        assert_eq!(ix.len(), all.len());
        let mut held: Vec<u32> = ix.slots().map(|s| s.pos).collect();
        held.sort_unstable();
        let mut want: Vec<u32> = all.iter().map(|&(_, p)| p).collect();
        want.sort_unstable();
        assert_eq!(held, want);
    }

    #[test]
    fn retain_and_shrink_keep_what_they_are_told() {
        let mut ix = Index::with_capacity(0);
        for pos in 0..4096u32 {
            ix.insert(pos.wrapping_mul(0x9e37_79b9), pos);
        }
        let big = ix.capacity();
        ix.retain(|s| s.pos % 2 == 0);
        assert_eq!(ix.len(), 2048);
        assert_eq!(ix.capacity(), big);
        ix.shrink_to(100, |s| s.pos < 100);
        assert_eq!(ix.len(), 50);
        assert!(ix.capacity() < big && ix.capacity() >= 50);
        for pos in 0..4096u32 {
            let found = ix.find(pos.wrapping_mul(0x9e37_79b9), |p| p == pos);
            assert_eq!(found.is_some(), pos < 100 && pos % 2 == 0, "{pos}");
        }
        // A shrink below what is held stops at what the held need.
        ix.shrink_to(1, |_| true);
        assert_eq!(ix.len(), 50);
        assert_eq!(ix.capacity(), Index::with_capacity(50).capacity());
        assert!(ix.capacity() >= 50);
        ix.clear();
        assert!(ix.is_empty());
        assert_eq!(ix.find(0, |_| true), None);
    }
}
