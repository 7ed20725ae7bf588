//! `chat-server`: the rendezvous server. See the library for the parts.

use clap::Parser;

use chat_server::config::Options;

fn main() -> std::process::ExitCode {
    let options = Options::parse();
    chat_proto::logging::init();
    let settings = match options.settings() {
        Ok(s) => s,
        // Exit status 2, as for a bad flag: the configuration is wrong, and
        // the unit does not restart on it (RestartPreventExitStatus=2).
        Err(e) => {
            eprintln!("chat-server: {e}");
            return std::process::ExitCode::from(2);
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
