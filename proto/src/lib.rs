//! Every message that crosses a socket in the chat system, with its encoding
//! and decoding, so that the server, the daemon, the CLI and the benchmark
//! share one definition of each.
//!
//! The crate does no IO: its codecs work on byte slices and `Vec<u8>`, and
//! the binaries drive them over whatever socket they hold. The wire formats
//! are documented in `docs/PROTOCOL.md`.
//!
//! - [`id`] and [`token`]: the validated values every message carries.
//! - [`rendezvous`]: HTTP/1.1 requests and responses between a client and
//!   `chat-server`, over TCP or one per UDP datagram.
//! - [`peer`]: the link between two daemons, an HTTP `CHAT` request
//!   upgraded to a stream of [`frame`]s, encrypted and authenticated by
//!   [`crypto`].
//! - [`ipc`]: the control socket between `chatctl` and `chatd`, also
//!   [`frame`]d; [`local`] says where that socket lives.
//! - Behind features, what two binaries share beside messages: `config`
//!   (configuration files) and `logging`.

#[cfg(feature = "config")]
pub mod config;
pub mod crypto;
pub mod frame;
pub mod id;
pub mod ipc;
#[cfg(feature = "local")]
pub mod local;
#[cfg(feature = "logging")]
pub mod logging;
pub mod peer;
pub mod rendezvous;
#[cfg(feature = "signals")]
pub mod signals;
pub mod token;

pub use id::ClientId;
pub use token::Token;
