//! `chat-server`: the rendezvous server. See the library for the parts.

use clap::Parser;

use chat_server::config::Options;

fn main() -> std::process::ExitCode {
    let options = Options::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match chat_server::run(options) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chat-server: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
