//! What chatctl prints: short lines for people, or JSON objects, one per
//! line, for scripts (`--json`).

use std::io::Write;

use chat_proto::ipc::{Record, RecordKind, Reply, State, Status, Turn};
use serde_json::{Value, json};

/// Prints replies and records in the chosen style.
pub struct Printer {
    json: bool,
}

impl Printer {
    pub fn new(json: bool) -> Printer {
        Printer { json }
    }

    pub fn is_json(&self) -> bool {
        self.json
    }

    fn emit(&self, human: String, machine: Value) {
        let mut out = std::io::stdout().lock();
        let _ = if self.json {
            writeln!(out, "{machine}")
        } else {
            writeln!(out, "{human}")
        };
        let _ = out.flush();
    }

    pub fn reply(&self, reply: &Reply) {
        if !matches!(reply, Reply::Done) {
            self.emit(reply_text(reply), reply_json(reply));
        }
    }

    /// The answer to `quit`, saying what was left: the daemon's `before`
    /// state, read just before.
    pub fn quit(&self, reply: &Reply, before: &Status) {
        let human = quit_text(before);
        let mut machine = reply_json(reply);
        machine["was"] = json!(before.state.as_str());
        self.emit(human, machine);
    }

    /// A line of `send -` was delivered: silent for people, one object per
    /// line for scripts.
    pub fn sent_line(&self, line: usize, reply: &Reply) {
        if let (true, Reply::Sent { id, round_trip_us }) = (self.json, reply) {
            self.emit(
                String::new(),
                json!({ "delivered": true, "line": line, "id": id, "round_trip_us": round_trip_us }),
            );
        }
    }

    pub fn record(&self, r: &Record) {
        self.emit(record_text(r), record_json(r));
    }

    /// A line of `send -` that will not arrive: a JSON object on standard
    /// output for scripts, a warning on standard error for people.
    pub fn undelivered(&self, line: usize, why: &str) {
        let why = undelivered_because(why);
        if self.json {
            self.emit(
                String::new(),
                json!({ "delivered": false, "line": line, "error": why }),
            );
        } else {
            // Like `emit`: a closed pipe must not panic the thread that
            // reads the daemon's answers, or `send -` would wait forever.
            let _ = writeln!(
                std::io::stderr(),
                "chatctl: line {line} not delivered: {why}"
            );
        }
    }
}

/// What a reply says to a person (the demo prints the same).
/// Why a line was not delivered, without the "not delivered: " the
/// daemon's reason may open with, for a sentence that says it already.
pub fn undelivered_because(why: &str) -> &str {
    why.strip_prefix("not delivered: ").unwrap_or(why)
}

pub fn reply_text(reply: &Reply) -> String {
    match reply {
        Reply::Id { id } => id.to_string(),
        Reply::Status(s) => status_text(s),
        Reply::Registered { addr, expires } => format!(
            "registered as {addr} (refreshed automatically; lapses {expires} s after the server last hears from us)"
        ),
        Reply::Bridged {
            peer: Some((id, addr)),
        } => {
            format!("peer {id} at {addr}: run `chatctl chat` to start chatting")
        }
        Reply::Bridged { peer: None } => {
            "waiting for a peer: the next one to bridge will be handed this daemon".into()
        }
        Reply::Chatting { peer } => format!("chatting with {peer}"),
        Reply::Sent { round_trip_us, .. } => {
            format!(
                "delivered (round trip {:.2} ms)",
                *round_trip_us as f64 / 1000.0
            )
        }
        // True whatever the daemon was doing (quitting an idle daemon is
        // not an error); `chatctl quit` says what was left (`Printer::quit`).
        Reply::Quit => "quit: no longer chatting or registered".into(),
        Reply::Reached { state } => state.to_string(),
        Reply::Done => String::new(),
    }
}

/// What `chatctl quit` says it left, from the daemon's status before.
pub fn quit_text(before: &Status) -> String {
    match (before.state, before.peer) {
        (State::Chatting, Some(peer)) => format!("left the chat with {peer} and the server"),
        (State::Idle, _) => "nothing to quit: not chatting and not registered".to_owned(),
        _ => "left the server: no longer registered".to_owned(),
    }
}

fn reply_json(reply: &Reply) -> Value {
    match reply {
        Reply::Id { id } => json!({ "id": id }),
        Reply::Status(s) => status_json(s),
        Reply::Registered { addr, expires } => {
            json!({ "registered": true, "addr": addr.to_string(), "expires": expires })
        }
        Reply::Bridged {
            peer: Some((id, addr)),
        } => {
            json!({ "peer": id, "peer_addr": addr.to_string(), "waiting": false })
        }
        Reply::Bridged { peer: None } => json!({ "peer": null, "waiting": true }),
        Reply::Chatting { peer } => json!({ "chatting": peer }),
        Reply::Sent { id, round_trip_us } => {
            json!({ "delivered": true, "id": id, "round_trip_us": round_trip_us })
        }
        Reply::Quit => json!({ "quit": true }),
        Reply::Reached { state } => json!({ "state": state.as_str() }),
        Reply::Done => json!({}),
    }
}

pub fn record_text(r: &Record) -> String {
    let when = local_time(r.time_ms, "%Y-%m-%d %H:%M:%S");
    match &r.kind {
        RecordKind::Message {
            from,
            to,
            text,
            delivered,
            ..
        } => {
            let text = printable(text);
            let lost = if *delivered == Some(false) {
                "  (not delivered)"
            } else {
                ""
            };
            format!("{when}  {from} → {to}: {text}{lost}")
        }
        RecordKind::State {
            state,
            peer: Some(p),
        } => format!("{when}  [{state} with {p}]"),
        RecordKind::State { state, peer: None } => format!("{when}  [{state}]"),
        RecordKind::Notice { text } => format!("{when}  * {}", printable(text)),
    }
}

pub fn record_json(r: &Record) -> Value {
    let time = rfc3339(r.time_ms);
    match &r.kind {
        RecordKind::Message {
            from,
            to,
            text,
            outgoing,
            delivered,
        } => json!({
            "type": "message", "seq": r.seq, "time": time, "from": from, "to": to, "text": text,
            "direction": if *outgoing { "out" } else { "in" },
            "delivered": delivered,
        }),
        RecordKind::State { state, peer } => json!({
            "type": "state", "seq": r.seq, "time": time, "state": state.as_str(), "peer": peer,
        }),
        RecordKind::Notice { text } => json!({
            "type": "notice", "seq": r.seq, "time": time, "text": text,
        }),
    }
}

fn status_text(s: &Status) -> String {
    let mut lines = vec![format!("id:     {}", s.id), format!("state:  {}", s.state)];
    if let Some(p) = s.peer {
        lines.push(format!("peer:   {p}"));
    }
    lines.push(format!("server: {}", s.server));
    if let Some(a) = s.addr {
        lines.push(format!("addr:   {a} (as the server sees us)"));
    }
    lines.push(format!("port:   {}", s.port));
    if let Some(t) = s.turn {
        lines.push(format!(
            "turn:   {}",
            match t {
                Turn::Mine => "yours",
                Turn::Peers => "the peer's",
            }
        ));
    }
    lines.join("\n")
}

fn status_json(s: &Status) -> Value {
    json!({
        "id": s.id,
        "state": s.state.as_str(),
        "peer": s.peer,
        "server": s.server,
        "port": s.port,
        "addr": s.addr.map(|a| a.to_string()),
        "turn": s.turn.map(|t| match t { Turn::Mine => "mine", Turn::Peers => "peer" }),
    })
}

/// Text from another daemon, made safe for a terminal: control characters
/// (escape sequences, carriage returns, newlines that would forge a line)
/// are shown escaped, as `\u{1b}`.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// RFC 3339, UTC, millisecond precision.
pub fn rfc3339(ms: i64) -> String {
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(t) => format!("{t:.3}"),
        Err(_) => ms.to_string(),
    }
}

/// Local wall-clock time, for people, in strftime `format`.
pub fn local_time(ms: i64, format: &str) -> String {
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(t) => t
            .to_zoned(jiff::tz::TimeZone::system())
            .strftime(format)
            .to_string(),
        Err(_) => ms.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_text_cannot_drive_the_terminal() {
        assert_eq!(printable("plain"), "plain");
        assert_eq!(printable("a\u{1b}[2Jb\nc"), "a\\u{1b}[2Jb\\nc");
    }

    #[test]
    fn json_messages_have_the_documented_fields() {
        let r = Record {
            seq: 3,
            time_ms: 1_700_000_000_123,
            kind: RecordKind::Message {
                from: "a".parse().unwrap(),
                to: "b".parse().unwrap(),
                text: "hi".into(),
                outgoing: true,
                delivered: Some(false),
            },
        };
        let v = record_json(&r);
        assert_eq!(v["type"], "message");
        assert_eq!(v["from"], "a");
        assert_eq!(v["to"], "b");
        assert_eq!(v["text"], "hi");
        assert_eq!(v["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["delivered"], false);
        assert!(record_text(&r).ends_with("a → b: hi  (not delivered)"));
    }
}
