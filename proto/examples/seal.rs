//! What the peer link's encryption costs in-process: a handshake, and
//! sealing and opening one short record (a 90-byte frame, about what a
//! chat message or its ack takes), with the ChaCha20 and Poly1305 code
//! this build selects (see `.cargo/config.toml`).
//!
//! `cargo run --release -p chat-proto --example seal`

use std::time::Instant;

use chat_proto::crypto::{Calling, Parties, PeerKey, answer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let key = PeerKey::from_bytes([1; 16]);
    let parties = Parties {
        caller: "alice".parse()?,
        callee: "bob".parse()?,
        turns: false,
    };
    let rounds = 200;
    let started = Instant::now();
    let mut link = None;
    for _ in 0..rounds {
        let (calling, first) = Calling::start(&key, &parties)?;
        let (callee, reply) = answer(&key, &parties, &first)?;
        link = Some((calling.finish(&reply)?, callee));
    }
    println!("handshake, both sides: {:?}", started.elapsed() / rounds);
    let Some((caller, callee)) = link else {
        return Ok(());
    };
    let (mut sealer, _) = caller.split();
    let (_, mut opener) = callee.split();
    let frame = [7u8; 90];
    let (mut wire, mut plain) = (Vec::new(), Vec::new());
    let n = 200_000;
    let started = Instant::now();
    for _ in 0..n {
        wire.clear();
        sealer.seal(&frame, &mut wire)?;
        opener.extend(&wire);
        plain.clear();
        opener.open(&mut plain)?;
    }
    println!("seal and open 90 bytes: {:?}", started.elapsed() / n);
    Ok(())
}
