//! `chatd`: the chat daemon, one per identity. See the library for the parts.

use std::process::ExitCode;

use chatd::config::Options;
use clap::Parser;

fn main() -> ExitCode {
    let options = Options::parse();
    chat_proto::logging::init();
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
