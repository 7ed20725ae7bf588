//! The history: every message sent and received and every state change,
//! in SQLite, so nothing is lost because no shell was attached, nor across
//! a restart.
//!
//! The database lives in the daemon's data directory, in WAL mode with
//! `synchronous=NORMAL`: a commit is a write to the log, not an fsync, and
//! a crash of the daemon (not of the machine) loses nothing committed.
//! Writes are grouped: the daemon opens a transaction, stores all the
//! records one turn of its loop produced, and commits before it sends the
//! acknowledgements that promise those records are stored.

use std::path::Path;

use chat_proto::ClientId;
use chat_proto::Token;
use chat_proto::ipc::{Record, RecordKind, State};
use rusqlite::{Connection, OptionalExtension, params};

/// Why the history failed.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error(
        "history {path} is locked by another process, most likely another chatd (one data directory per daemon): stop it, or pass another --data-dir"
    )]
    InUse { path: String },
    #[error("history database {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("history database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// The records asked for would take more than the bytes allowed; the
    /// reading stopped there rather than load them all.
    #[error("the records asked for are over {max_bytes} bytes")]
    OverBudget { max_bytes: usize },
}

/// The open history of one daemon.
///
/// One table, no secondary index: every message costs one b-tree insert,
/// which is what lets a link carry 100,000 stored messages a second.
/// Searches scan newest first, which is fast enough for the histories a
/// person keeps; the daemon's id is not repeated in every row (a data
/// directory belongs to one id).
pub struct History {
    conn: Connection,
    me: ClientId,
    in_tx: bool,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS records (
    seq      INTEGER PRIMARY KEY,
    time_ms  INTEGER NOT NULL,
    kind     TEXT    NOT NULL, -- 'message', 'state' or 'notice'
    peer     TEXT,
    outgoing INTEGER,
    state    TEXT,
    text     TEXT,
    delivered INTEGER -- messages sent: 1 stored by the peer, 0 lost, NULL not known yet
);
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

impl History {
    /// Opens (creating if needed) the history at `path`.
    pub fn open(path: &Path, me: ClientId) -> Result<History, HistoryError> {
        let open_err = |source| HistoryError::Open {
            path: path.display().to_string(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        // rusqlite waits 5 s on a busy database by default. Until the lock
        // is ours, a wait is futile against another daemon (it keeps its
        // lock for life) and need only outlast a reader's moment: say "in
        // use" quickly.
        conn.busy_timeout(std::time::Duration::from_millis(250))
            .map_err(open_err)?;
        let in_use = |e: rusqlite::Error| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                HistoryError::InUse {
                    path: path.display().to_string(),
                }
            }
            _ => open_err(e),
        };
        // The daemon owns its history: an exclusive lock, taken once,
        // spares every commit its file-lock calls (six fcntl() a message
        // otherwise) and keeps a second daemon from sharing the directory.
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
            .map_err(in_use)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(in_use)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(in_use)?;
        conn.execute_batch(SCHEMA).map_err(in_use)?;
        // Histories written before delivery was recorded lack the column.
        let has_delivered: bool = conn
            .query_row(
                "SELECT COUNT(*) FROM pragma_table_info('records') WHERE name = 'delivered'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(open_err)?
            > 0;
        if !has_delivered {
            conn.execute_batch("ALTER TABLE records ADD COLUMN delivered INTEGER")
                .map_err(open_err)?;
        }
        // A write now takes the exclusive lock and keeps it, so a second
        // daemon on this directory fails here rather than later.
        conn.execute(
            "INSERT INTO settings (key, value) VALUES ('opened', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [std::process::id().to_string()],
        )
        .map_err(in_use)?;
        // Another process reading the file (a backup, sqlite3) may hold a
        // lock for a moment; wait rather than fail.
        conn.busy_timeout(std::time::Duration::from_secs(1))
            .map_err(open_err)?;
        Ok(History {
            conn,
            me,
            in_tx: false,
        })
    }

    /// An in-memory history, for tests.
    #[cfg(test)]
    pub fn in_memory(me: ClientId) -> History {
        let conn = Connection::open_in_memory().expect("in-memory sqlite");
        conn.execute_batch(SCHEMA).expect("schema");
        History {
            conn,
            me,
            in_tx: false,
        }
    }

    /// Starts grouping writes (a no-op if a group is open).
    pub fn begin(&mut self) -> Result<(), HistoryError> {
        if !self.in_tx {
            self.conn.prepare_cached("BEGIN")?.execute([])?;
            self.in_tx = true;
        }
        Ok(())
    }

    /// Makes the grouped writes durable.
    pub fn commit(&mut self) -> Result<(), HistoryError> {
        if self.in_tx {
            self.in_tx = false;
            let result = self
                .conn
                .prepare_cached("COMMIT")
                .and_then(|mut c| c.execute([]));
            if result.is_err() && !self.conn.is_autocommit() {
                // A failed COMMIT may leave the transaction open; end it, so
                // the next turn can store again (what it held is lost, and
                // the daemon tells the peers so).
                let _ = self.conn.execute_batch("ROLLBACK");
            }
            result?;
        }
        Ok(())
    }

    /// The database file, for messages.
    pub fn path(&self) -> &str {
        self.conn.path().unwrap_or("the history database")
    }

    /// Stores a record; returns it with its place and time.
    pub fn append(&mut self, time_ms: i64, kind: RecordKind) -> Result<Record, HistoryError> {
        let mut stmt = self.conn.prepare_cached(
            "INSERT INTO records (time_ms, kind, peer, outgoing, state, text, delivered)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        match &kind {
            RecordKind::Message {
                from,
                to,
                text,
                outgoing,
                delivered,
            } => {
                let peer = if *outgoing { to } else { from };
                stmt.execute(params![
                    time_ms,
                    "message",
                    peer.as_str(),
                    *outgoing,
                    None::<&str>,
                    text,
                    delivered
                ])?;
            }
            RecordKind::State { state, peer } => {
                stmt.execute(params![
                    time_ms,
                    "state",
                    peer.map(|p| p.to_string()),
                    None::<bool>,
                    state.as_str(),
                    None::<&str>,
                    None::<bool>
                ])?;
            }
            RecordKind::Notice { text } => {
                stmt.execute(params![
                    time_ms,
                    "notice",
                    None::<&str>,
                    None::<bool>,
                    None::<&str>,
                    text,
                    None::<bool>
                ])?;
            }
        }
        let seq = self.conn.last_insert_rowid() as u64;
        Ok(Record { seq, time_ms, kind })
    }

    /// Marks as not delivered the messages an earlier run sent and never
    /// heard back about (it stopped, or crashed, with them in flight);
    /// returns how many. Left unknown they would read as delivered.
    pub fn settle_unconfirmed(&mut self) -> Result<usize, HistoryError> {
        Ok(self.conn.execute(
            "UPDATE records SET delivered = 0
             WHERE kind = 'message' AND outgoing = 1 AND delivered IS NULL",
            [],
        )?)
    }

    /// Notes whether the message sent as record `seq` reached the peer.
    pub fn set_delivered(&mut self, seq: u64, delivered: bool) -> Result<(), HistoryError> {
        self.begin()?;
        self.conn
            .prepare_cached("UPDATE records SET delivered = ?2 WHERE seq = ?1")?
            .execute(params![seq as i64, delivered])?;
        Ok(())
    }

    /// The last `n` records, oldest first, if they fit in `max_bytes` (as
    /// [`crate::ipc::record_bytes`] counts them). In one go, for tests: the
    /// daemon runs [`Search::last`] a slice at a time instead.
    #[cfg(test)]
    pub fn last(&self, n: u32, max_bytes: usize) -> Result<Vec<Record>, HistoryError> {
        let mut search = Search::last(self, n)?;
        while !search.step(self, SEARCH_SLICE, max_bytes)? {}
        Ok(search.into_records())
    }

    /// Messages matching the filters, oldest first; at most `limit` (the
    /// newest ones), if they fit in `max_bytes`. In one go, for tests: the
    /// daemon runs a [`Search`] a slice at a time instead.
    #[cfg(test)]
    pub fn search(
        &self,
        peer: Option<ClientId>,
        grep: Option<&str>,
        limit: u32,
        max_bytes: usize,
    ) -> Result<Vec<Record>, HistoryError> {
        let mut search = Search::new(self, peer, grep, limit)?;
        while !search.step(self, SEARCH_SLICE, max_bytes)? {}
        Ok(search.into_records())
    }

    /// Records from seq `from` on, oldest first, at most `limit`.
    pub fn since(&self, from: u64, limit: u32) -> Result<Vec<Record>, HistoryError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT seq, time_ms, kind, peer, outgoing, state, text, delivered FROM records
             WHERE seq >= ?1 ORDER BY seq LIMIT ?2",
        )?;
        let me = self.me;
        let rows = stmt.query_map(params![from as i64, limit], |r| row_to_record(r, me))?;
        let mut out = Vec::new();
        for row in rows {
            // Rows of a newer version are skipped, as everywhere.
            if let Some(record) = row? {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// One past the newest record's seq.
    fn end(&self) -> Result<u64, HistoryError> {
        let max: i64 =
            self.conn
                .query_row("SELECT COALESCE(MAX(seq), 0) FROM records", [], |r| {
                    r.get(0)
                })?;
        Ok(max as u64 + 1)
    }

    /// The token saved for `server`, if any.
    pub fn token(&self, server: &str) -> Result<Option<Token>, HistoryError> {
        let key = format!("token {} {server}", self.me);
        let value: Option<String> = self
            .conn
            .query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(value.and_then(|v| v.parse().ok()))
    }

    /// Saves the token the server gave us.
    pub fn save_token(&mut self, server: &str, token: Token) -> Result<(), HistoryError> {
        let key = format!("token {} {server}", self.me);
        self.conn.execute(
            "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![key, token.to_string()],
        )?;
        Ok(())
    }
}

/// Records a search slice looks at: about a millisecond of SQLite's time
/// (a grep over a million messages takes about 0.2 s), so that a search
/// through a long history never holds the daemon's one thread for long.
pub const SEARCH_SLICE: u64 = 5_000;

/// A search of the history, run a slice of records at a time from the
/// newest back, so that the daemon serves its peers between slices. It
/// looks at the history as it was when it began.
pub struct Search {
    /// Messages only (`history`), or every record (`tail`).
    messages_only: bool,
    peer: Option<String>,
    pattern: Option<String>,
    limit: u32,
    /// One past the newest record it looks at: the history's end when it
    /// began.
    end: u64,
    /// Records below this seq are still to be looked at.
    below: u64,
    /// What matched so far, newest first.
    found: Vec<Record>,
    bytes: usize,
}

impl Search {
    pub fn new(
        history: &History,
        peer: Option<ClientId>,
        grep: Option<&str>,
        limit: u32,
    ) -> Result<Search, HistoryError> {
        let pattern = grep.map(|g| {
            format!(
                "%{}%",
                g.replace('\\', "\\\\")
                    .replace('%', "\\%")
                    .replace('_', "\\_")
            )
        });
        Search::start(history, true, peer.map(|p| p.to_string()), pattern, limit)
    }

    /// The last `n` records of every kind (`tail -n`): what there was up
    /// to now, however many are stored while it runs.
    pub fn last(history: &History, n: u32) -> Result<Search, HistoryError> {
        Search::start(history, false, None, None, n)
    }

    fn start(
        history: &History,
        messages_only: bool,
        peer: Option<String>,
        pattern: Option<String>,
        limit: u32,
    ) -> Result<Search, HistoryError> {
        let end = history.end()?;
        Ok(Search {
            messages_only,
            peer,
            pattern,
            limit,
            end,
            below: end,
            found: Vec::new(),
            bytes: 0,
        })
    }

    /// Looks at the next `rows` records; returns whether the search is
    /// done. Fails once what matched is over `max_bytes`.
    pub fn step(
        &mut self,
        history: &History,
        rows: u64,
        max_bytes: usize,
    ) -> Result<bool, HistoryError> {
        let floor = self.below.saturating_sub(rows.max(1));
        let want = self.limit.saturating_sub(self.found.len() as u32);
        let mut stmt = history.conn.prepare_cached(
            "SELECT seq, time_ms, kind, peer, outgoing, state, text, delivered FROM records
             WHERE seq < ?4 AND seq >= ?5
               AND (?6 = 0 OR kind = 'message')
               AND (?1 IS NULL OR peer = ?1)
               AND (?2 IS NULL OR text LIKE ?2 ESCAPE '\\')
             ORDER BY seq DESC LIMIT ?3",
        )?;
        let me = history.me;
        let rows = stmt.query_map(
            params![
                self.peer,
                self.pattern,
                want,
                self.below as i64,
                floor as i64,
                self.messages_only
            ],
            |r| Ok((r.get::<_, i64>(0)?, row_to_record(r, me)?)),
        )?;
        let (mut read, mut last) = (0u32, self.below);
        for row in rows {
            let (seq, record) = row?;
            (read, last) = (read + 1, seq as u64);
            // Rows of a newer version are skipped, but count as read.
            let Some(record) = record else { continue };
            self.bytes += crate::ipc::record_bytes(&record);
            if self.bytes > max_bytes {
                return Err(HistoryError::OverBudget { max_bytes });
            }
            self.found.push(record);
        }
        if self.found.len() >= self.limit as usize {
            return Ok(true);
        }
        // Stopped by the LIMIT before the floor (skipped rows took places
        // in it): go on from the last row read, not from the floor.
        self.below = if read > 0 && read == want {
            last
        } else {
            floor
        };
        Ok(self.below == 0)
    }

    /// One past the newest record it looks at.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Bytes of what matched so far (as [`crate::ipc::record_bytes`]
    /// counts them).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// What matched, oldest first.
    pub fn into_records(mut self) -> Vec<Record> {
        self.found.reverse();
        self.found
    }
}

/// A row as a record; `None` for rows this version does not understand
/// (written by a newer one), which are skipped rather than fatal. Text that
/// is not UTF-8 (the file was edited by hand) is shown with U+FFFD rather
/// than failing the whole answer; a read error fails it.
fn row_to_record(row: &rusqlite::Row<'_>, me: ClientId) -> rusqlite::Result<Option<Record>> {
    let seq: i64 = row.get(0)?;
    let time_ms: i64 = row.get(1)?;
    let kind: String = row.get(2)?;
    let peer: Option<String> = row.get(3)?;
    let outgoing: Option<bool> = row.get(4)?;
    let state: Option<String> = row.get(5)?;
    let text: Option<String> = match row.get_ref(6)? {
        rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
            Some(String::from_utf8_lossy(t).into_owned())
        }
        _ => None,
    };
    let delivered: Option<bool> = row.get(7)?;
    let id = |s: &str| s.parse::<ClientId>().ok();
    let kind = match kind.as_str() {
        "message" => {
            let Some(peer) = peer.as_deref().and_then(id) else {
                return Ok(None);
            };
            let outgoing = outgoing.unwrap_or(false);
            let (from, to) = if outgoing { (me, peer) } else { (peer, me) };
            RecordKind::Message {
                from,
                to,
                text: text.unwrap_or_default(),
                outgoing,
                delivered,
            }
        }
        "state" => {
            let Some(state) = state.and_then(|s| s.parse::<State>().ok()) else {
                return Ok(None);
            };
            RecordKind::State {
                state,
                peer: peer.as_deref().and_then(id),
            }
        }
        "notice" => RecordKind::Notice {
            text: text.unwrap_or_default(),
        },
        _ => return Ok(None),
    };
    Ok(Some(Record {
        seq: seq as u64,
        time_ms,
        kind,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ClientId {
        s.parse().unwrap()
    }

    fn msg(from: &str, to: &str, text: &str, outgoing: bool) -> RecordKind {
        RecordKind::Message {
            from: id(from),
            to: id(to),
            text: text.into(),
            outgoing,
            delivered: None,
        }
    }

    #[test]
    fn a_tail_read_in_slices_is_the_last_records_and_since_the_rest() {
        let mut h = History::in_memory(id("me"));
        h.begin().unwrap();
        let mut all = Vec::new();
        for i in 0..2_000 {
            let kind = match i % 3 {
                0 => msg("me", "bob", &format!("m{i}"), true),
                1 => RecordKind::Notice {
                    text: format!("n{i}"),
                },
                _ => RecordKind::State {
                    state: State::Chatting,
                    peer: Some(id("bob")),
                },
            };
            all.push(h.append(i, kind).unwrap());
        }
        h.commit().unwrap();
        for (n, slice) in [
            (0, 7),
            (1, 7),
            (999, 7),
            (1_000, 1),
            (2_000, 333),
            (5_000, 64),
        ] {
            let mut search = Search::last(&h, n).unwrap();
            while !search.step(&h, slice, usize::MAX).unwrap() {}
            let end = search.end();
            let want = &all[all.len().saturating_sub(n as usize)..];
            assert_eq!(search.into_records(), want, "n={n} slice={slice}");
            assert_eq!(end, all[all.len() - 1].seq + 1);
        }
        assert_eq!(h.since(all[1_990].seq, 100).unwrap(), &all[1_990..]);
        assert_eq!(h.since(all[10].seq, 3).unwrap(), &all[10..13]);
        assert!(h.since(all[1_999].seq + 1, 100).unwrap().is_empty());
    }

    #[test]
    fn append_then_read_in_order() {
        let mut h = History::in_memory(id("me"));
        h.begin().unwrap();
        let a = h.append(1, msg("me", "bob", "hi bob", true)).unwrap();
        let b = h
            .append(
                2,
                RecordKind::State {
                    state: State::Chatting,
                    peer: Some(id("bob")),
                },
            )
            .unwrap();
        let c = h.append(3, msg("bob", "me", "hi", false)).unwrap();
        h.commit().unwrap();
        assert!(a.seq < b.seq && b.seq < c.seq);
        assert_eq!(h.last(2, usize::MAX).unwrap(), vec![b.clone(), c.clone()]);
        assert_eq!(h.last(100, usize::MAX).unwrap(), vec![a, b, c]);
    }

    #[test]
    fn a_row_that_is_not_utf8_is_shown_not_dropped() {
        let mut h = History::in_memory(id("me"));
        h.append(1, msg("bob", "me", "before", false)).unwrap();
        h.conn
            .execute(
                "INSERT INTO records (time_ms, kind, peer, outgoing, text) VALUES (2, 'message', 'bob', 0, CAST(X'66FF6F' AS TEXT))",
                [],
            )
            .unwrap();
        let texts: Vec<String> = h
            .last(10, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|r| match r.kind {
                RecordKind::Message { text, .. } => text,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(texts, vec!["before".to_owned(), "f\u{fffd}o".to_owned()]);
    }

    #[test]
    fn reading_stops_at_the_byte_budget() {
        let mut h = History::in_memory(id("me"));
        for i in 0..10 {
            h.append(i, msg("bob", "me", &"x".repeat(1000), false))
                .unwrap();
        }
        h.commit().unwrap();
        let one = crate::ipc::record_bytes(&h.last(1, usize::MAX).unwrap()[0]);
        assert_eq!(h.last(10, 10 * one).unwrap().len(), 10);
        assert!(matches!(
            h.last(10, 10 * one - 1),
            Err(HistoryError::OverBudget { .. })
        ));
        assert!(matches!(
            h.search(None, Some("x"), 10, one),
            Err(HistoryError::OverBudget { .. })
        ));
    }

    /// Whether each of the last `n` messages was delivered, oldest first.
    fn delivered(h: &History, n: u32) -> Vec<Option<bool>> {
        h.last(n, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|r| match r.kind {
                RecordKind::Message { delivered, .. } => delivered,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn delivery_is_noted_on_the_message() {
        let mut h = History::in_memory(id("me"));
        let sent = h
            .append(1, msg("me", "bob", "did it arrive?", true))
            .unwrap();
        let lost = h.append(2, msg("me", "bob", "and this?", true)).unwrap();
        h.set_delivered(sent.seq, true).unwrap();
        h.set_delivered(lost.seq, false).unwrap();
        h.commit().unwrap();
        assert_eq!(delivered(&h, 2), vec![Some(true), Some(false)]);
    }

    #[test]
    fn what_an_earlier_run_never_heard_back_about_is_settled_as_not_delivered() {
        let mut h = History::in_memory(id("me"));
        let confirmed = h.append(1, msg("me", "bob", "got it", true)).unwrap();
        h.append(2, msg("me", "bob", "in flight at a crash", true))
            .unwrap();
        h.append(3, msg("bob", "me", "incoming", false)).unwrap();
        h.set_delivered(confirmed.seq, true).unwrap();
        h.commit().unwrap();
        assert_eq!(h.settle_unconfirmed().unwrap(), 1);
        assert_eq!(delivered(&h, 3), vec![Some(true), Some(false), None]);
        assert_eq!(h.settle_unconfirmed().unwrap(), 0);
    }

    #[test]
    fn a_search_in_small_slices_finds_what_one_pass_finds() {
        let mut h = History::in_memory(id("me"));
        for i in 0..50 {
            let kind = match i % 5 {
                0 => RecordKind::Notice {
                    text: format!("note {i}"),
                },
                1 | 2 => msg("me", "bob", &format!("to bob {i}"), true),
                _ => msg("carol", "me", &format!("from carol {i}"), false),
            };
            h.append(i, kind).unwrap();
        }
        let seqs = |rs: &[Record]| rs.iter().map(|r| r.seq).collect::<Vec<_>>();
        for (peer, grep, limit) in [
            (None, None, 100),
            (None, None, 7),
            (Some(id("bob")), None, 100),
            (Some(id("carol")), Some("1"), 4),
            (None, Some("nothing like it"), 10),
        ] {
            let whole = h.search(peer, grep, limit, usize::MAX).unwrap();
            let mut s = Search::new(&h, peer, grep, limit).unwrap();
            let mut steps = 0;
            while !s.step(&h, 3, usize::MAX).unwrap() {
                steps += 1;
            }
            assert_eq!(
                seqs(&s.into_records()),
                seqs(&whole),
                "{peer:?} {grep:?} {limit}"
            );
            // It went slice by slice, stopping early once it had enough.
            assert!((1..=17).contains(&steps), "{steps}");
        }
        // Rows this version cannot read take places in a slice's LIMIT;
        // the search goes on from the last row read, not past the rest.
        let newest_valid: Vec<u64> = h
            .search(None, None, 3, usize::MAX)
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect();
        for t in 100..105 {
            h.conn
                .execute(
                    "INSERT INTO records (time_ms, kind, peer, outgoing, text) VALUES (?1, 'message', 'not an id!', 0, 'x')",
                    [t],
                )
                .unwrap();
        }
        let mut s = Search::new(&h, None, None, 3).unwrap();
        while !s.step(&h, 10, usize::MAX).unwrap() {}
        assert_eq!(seqs(&s.into_records()), newest_valid);
        // Messages stored after a search began are not in it.
        let mut s = Search::new(&h, None, None, 100).unwrap();
        h.append(99, msg("me", "bob", "late", true)).unwrap();
        while !s.step(&h, 10, usize::MAX).unwrap() {}
        assert!(s.into_records().iter().all(|r| r.seq <= 50));
    }

    #[test]
    fn search_by_peer_and_text_with_wildcards_escaped() {
        let mut h = History::in_memory(id("me"));
        h.append(1, msg("me", "bob", "100% sure", true)).unwrap();
        h.append(2, msg("carol", "me", "1005 sure", false)).unwrap();
        h.append(3, msg("bob", "me", "under_score", false)).unwrap();
        h.append(
            4,
            RecordKind::Notice {
                text: "100% notice".into(),
            },
        )
        .unwrap();
        let texts = |rs: Vec<Record>| -> Vec<String> {
            rs.into_iter()
                .map(|r| match r.kind {
                    RecordKind::Message { text, .. } => text,
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        assert_eq!(
            texts(h.search(None, Some("100%"), 10, usize::MAX).unwrap()),
            vec!["100% sure"]
        );
        assert_eq!(
            texts(h.search(Some(id("bob")), None, 10, usize::MAX).unwrap()),
            vec!["100% sure", "under_score"]
        );
        assert_eq!(
            texts(h.search(None, Some("r_s"), 10, usize::MAX).unwrap()),
            vec!["under_score"]
        );
        assert_eq!(
            texts(h.search(None, None, 1, usize::MAX).unwrap()),
            vec!["under_score"]
        );
    }

    #[test]
    fn tokens_per_server() {
        let mut h = History::in_memory(id("me"));
        assert!(h.token("a:1").unwrap().is_none());
        let t = Token::from_bytes([3; 16]);
        h.save_token("a:1", t).unwrap();
        h.save_token("a:1", t).unwrap();
        assert_eq!(h.token("a:1").unwrap(), Some(t));
        assert!(h.token("b:1").unwrap().is_none());
    }

    #[test]
    fn survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.db");
        {
            let mut h = History::open(&path, id("me")).unwrap();
            h.append(1, msg("me", "bob", "kept", true)).unwrap();
        }
        let h = History::open(&path, id("me")).unwrap();
        assert_eq!(h.last(10, usize::MAX).unwrap().len(), 1);
    }
}
