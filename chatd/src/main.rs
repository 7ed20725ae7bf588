//! `chatd`: the chat daemon, one per identity. See the library for the parts.

use std::process::ExitCode;

use chatd::config::Options;
use clap::Parser;

fn main() -> ExitCode {
    let options = Options::parse();
    init_logging();
    let settings = match options.settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("chatd: {e}");
            // A setting missing or wrong is a usage error, as clap's are.
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chatd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(chatd::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chatd: {e:#}");
            ExitCode::FAILURE
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
