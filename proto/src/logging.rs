//! How the long-running binaries (chat-server, chatd) log, in one place so
//! that the two read alike in a terminal and in the journal.

use std::io::IsTerminal;

/// Logs to stderr at `info` unless `RUST_LOG` says otherwise: with
/// timestamps and colours in a terminal; under systemd (`JOURNAL_STREAM`
/// set) plain lines, as the journal adds its own timestamps.
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder
            .without_time()
            .with_ansi(false)
            .with_target(false)
            .init();
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).init();
    }
}
