//! `chat-server`: the rendezvous server. See the library for the parts.

use clap::Parser;

use chat_server::config::Options;

fn main() -> std::process::ExitCode {
    let options = Options::parse();
    init_logging();
    let settings = match options.settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("chat-server: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match chat_server::run(settings) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chat-server: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs to stderr: with timestamps and colours in a terminal; under
/// systemd (JOURNAL_STREAM set) plain lines, as the journal adds its own
/// timestamps.
fn init_logging() {
    use std::io::IsTerminal;
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
