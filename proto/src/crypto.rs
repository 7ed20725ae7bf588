//! The peer link's protection: the key the server introduces two peers
//! with, the handshake that proves it, and the encrypted records that
//! carry the link's frames.
//!
//! A waiting daemon can be reached by anyone who can reach its port, and a
//! link crosses networks nobody here controls. So:
//!
//! - With a waiting peer's address the server hands the caller a
//!   [`PeerKey`]: a MAC of the caller's id under the waiting peer's client
//!   token. Only the server and the waiting peer are meant to hold that
//!   token (it crosses the network in plain HTTP, which the README's
//!   Security section weighs), so only the caller the server introduced,
//!   under that id, knows the key, and only the daemon holding the
//!   registration can check it. Each side proves itself to the other with
//!   no long-term key to manage.
//! - The handshake is Noise `NNpsk0` with that key (through `snow`): two
//!   messages, carried in the upgrade's request and its `101` answer, so a
//!   link opens in as many round trips as before. Each side adds a fresh
//!   X25519 key: a recording of the link stays unreadable to whoever learns
//!   the key or the token afterwards.
//! - After it, the link's bytes (the [`crate::frame`]s) travel in records:
//!   a big-endian `u16` length, then that many bytes of ChaCha20-Poly1305
//!   ciphertext whose nonce counts the records sent that way. A record
//!   altered, dropped, replayed or reordered fails to open, and the link
//!   is closed. (A stream cut between records is a close like any other:
//!   only a `Bye` frame ends a chat cleanly.)
//! - The first handshake message carries nothing fresh, so a replay of it
//!   passes the check; the callee takes the call only once a frame from
//!   the caller opens (chatd's session holds it as `Answering` till then).
//!
//! The server derives the key, so it could stand in the middle: the server
//! is trusted with introductions, as docs/PROTOCOL.md says.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use blake2::digest::consts::U16;
use blake2::digest::{Digest, Mac};
use blake2::{Blake2s256, Blake2sMac};
use snow::{HandshakeState, StatelessTransportState};

use crate::frame::Gathered;
use crate::{ClientId, Token};

/// The Noise protocol of the handshake and the records.
pub const NOISE: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Bytes of each handshake message: an X25519 key and an empty payload's
/// tag.
pub const HANDSHAKE_LEN: usize = 48;
/// Bytes of a record's length prefix.
pub const RECORD_PREFIX: usize = 2;
/// The largest record's ciphertext (Noise's message limit).
pub const MAX_RECORD: usize = 65535;
/// Bytes of the tag each record carries.
const TAG: usize = 16;
/// The most plaintext one record carries.
pub const MAX_PLAIN: usize = MAX_RECORD - TAG;

/// Why a handshake or a record failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// The other side does not hold the key: it was not introduced by the
    /// server as this caller, or does not hold the registration called.
    #[error("the handshake does not match the key")]
    Handshake,
    #[error("a record failed to open: altered on the way, or not from the peer")]
    Record,
    #[error("a record of {0} bytes is shorter than its tag")]
    Short(usize),
    #[error("the connection closed in the middle of a record")]
    Truncated,
    #[error("the link has sent or received all the records it may")]
    Exhausted,
    #[error("cryptography failed: {0}")]
    Internal(String),
}

/// The key the server gives a caller to prove, to the peer it was handed,
/// that the server introduced it: 128 bits, written as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PeerKey(Token);

impl PeerKey {
    /// The key for `caller` calling the holder of `token`. Deterministic,
    /// so that the server and the holder derive the same one.
    pub fn derive(token: &Token, caller: &ClientId) -> PeerKey {
        // BLAKE2s keyed with the token is a MAC: without the token, no key
        // for any id can be made, and one id's key says nothing of
        // another's.
        // BLAKE2s takes keys of 1 to 32 bytes, so a 16-byte token is
        // always one: this cannot fail.
        let mac = <Blake2sMac<U16> as Mac>::new_from_slice(token.bytes())
            .expect("a 16-byte key is a valid BLAKE2s key")
            .chain_update(b"chat-peer key\0")
            .chain_update(caller.as_str());
        let mut out = [0u8; 16];
        out.copy_from_slice(&mac.finalize().into_bytes());
        PeerKey(Token::from_bytes(out))
    }

    pub const fn from_bytes(bytes: [u8; 16]) -> PeerKey {
        PeerKey(Token::from_bytes(bytes))
    }

    /// The 32 hex digits, without allocating.
    pub(crate) fn hex(&self) -> [u8; 32] {
        self.0.to_hex()
    }

    /// The 32 bytes Noise wants as its pre-shared key.
    fn psk(&self) -> [u8; 32] {
        Blake2s256::new()
            .chain_update(b"chat-peer psk\0")
            .chain_update(self.0.bytes())
            .finalize()
            .into()
    }
}

impl FromStr for PeerKey {
    type Err = crate::token::TokenError;
    fn from_str(s: &str) -> Result<PeerKey, Self::Err> {
        s.parse().map(PeerKey)
    }
}

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A secret: never printed into a log by accident.
        f.write_str("PeerKey(..)")
    }
}

/// Who calls whom, bound into the handshake: a call meant for one id
/// cannot be answered by another, nor its `Chat-Turns` changed on the way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parties {
    pub caller: ClientId,
    pub callee: ClientId,
    pub turns: bool,
}

impl Parties {
    fn prologue(&self) -> Vec<u8> {
        let mut p = b"chat-peer/2\0".to_vec();
        p.extend_from_slice(self.caller.as_str().as_bytes());
        p.push(0);
        p.extend_from_slice(self.callee.as_str().as_bytes());
        p.push(0);
        p.push(u8::from(self.turns));
        p
    }

    fn builder<'a>(
        &self,
        psk: &'a [u8; 32],
        prologue: &'a [u8],
    ) -> Result<snow::Builder<'a>, CryptoError> {
        let params = NOISE.parse().map_err(internal)?;
        snow::Builder::new(params)
            .psk(0, psk)
            .and_then(|b| b.prologue(prologue))
            .map_err(internal)
    }
}

fn internal(e: snow::Error) -> CryptoError {
    CryptoError::Internal(e.to_string())
}

/// The caller's half-done handshake.
pub struct Calling(HandshakeState);

impl Calling {
    /// Starts a call: the handshake's first message, to send with the
    /// upgrade request.
    pub fn start(key: &PeerKey, parties: &Parties) -> Result<(Calling, Vec<u8>), CryptoError> {
        let (psk, prologue) = (key.psk(), parties.prologue());
        let mut state = parties
            .builder(&psk, &prologue)?
            .build_initiator()
            .map_err(internal)?;
        let mut first = vec![0u8; HANDSHAKE_LEN];
        let n = state.write_message(&[], &mut first).map_err(internal)?;
        first.truncate(n);
        Ok((Calling(state), first))
    }

    /// Ends it with the callee's answer: fails unless the callee holds the
    /// key.
    pub fn finish(mut self, answer: &[u8]) -> Result<Link, CryptoError> {
        let mut payload = [0u8; HANDSHAKE_LEN];
        self.0
            .read_message(answer, &mut payload)
            .map_err(|_| CryptoError::Handshake)?;
        Link::from_handshake(self.0)
    }
}

impl fmt::Debug for Calling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Calling(..)")
    }
}

/// The callee's side, first half: checks the caller's first message
/// against `key`. That costs hashing only, so callers without the key are
/// turned away cheaply; the X25519 work is left to [`Checked::answer`],
/// for a call the callee takes.
pub fn check(key: &PeerKey, parties: &Parties, call: &[u8]) -> Result<Checked, CryptoError> {
    let (psk, prologue) = (key.psk(), parties.prologue());
    let mut state = parties
        .builder(&psk, &prologue)?
        .build_responder()
        .map_err(internal)?;
    let mut payload = [0u8; HANDSHAKE_LEN];
    state
        .read_message(call, &mut payload)
        .map_err(|_| CryptoError::Handshake)?;
    Ok(Checked(state))
}

/// A caller's first message that passed [`check`].
pub struct Checked(HandshakeState);

impl Checked {
    /// Takes the call: the open link, and the answer to send with `101`.
    pub fn answer(mut self) -> Result<(Link, Vec<u8>), CryptoError> {
        let mut reply = vec![0u8; HANDSHAKE_LEN];
        let n = self.0.write_message(&[], &mut reply).map_err(internal)?;
        reply.truncate(n);
        Ok((Link::from_handshake(self.0)?, reply))
    }
}

impl fmt::Debug for Checked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Checked(..)")
    }
}

/// Both halves of the callee's side at once.
pub fn answer(
    key: &PeerKey,
    parties: &Parties,
    call: &[u8],
) -> Result<(Link, Vec<u8>), CryptoError> {
    check(key, parties, call)?.answer()
}

/// An open link's keys, to split between its writer and its reader.
pub struct Link(Arc<StatelessTransportState>);

impl Link {
    fn from_handshake(state: HandshakeState) -> Result<Link, CryptoError> {
        state
            .into_stateless_transport_mode()
            .map(|s| Link(Arc::new(s)))
            .map_err(internal)
    }

    /// The writer's half and the reader's.
    pub fn split(self) -> (Sealer, Opener) {
        (
            Sealer {
                state: Arc::clone(&self.0),
                nonce: 0,
            },
            Opener {
                state: self.0,
                nonce: 0,
                gathered: Gathered::default(),
            },
        )
    }
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Link(..)")
    }
}

/// Turns the bytes one side writes into records.
pub struct Sealer {
    state: Arc<StatelessTransportState>,
    nonce: u64,
}

impl Sealer {
    /// Appends `plain` to `out` as records. On error `out` is left as it
    /// was.
    pub fn seal(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), CryptoError> {
        let start = out.len();
        for chunk in plain.chunks(MAX_PLAIN) {
            if self.nonce == u64::MAX {
                out.truncate(start);
                return Err(CryptoError::Exhausted);
            }
            let len = chunk.len() + TAG;
            out.extend_from_slice(&(len as u16).to_be_bytes());
            let at = out.len();
            out.resize(at + len, 0);
            if let Err(e) = self.state.write_message(self.nonce, chunk, &mut out[at..]) {
                out.truncate(start);
                return Err(internal(e));
            }
            self.nonce += 1;
        }
        Ok(())
    }
}

/// Gathers the records the other side wrote and opens them, in order.
pub struct Opener {
    state: Arc<StatelessTransportState>,
    nonce: u64,
    gathered: Gathered,
}

impl Opener {
    /// Room to read into: the caller appends to this `Vec`.
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        let buf = self.gathered.buffer();
        // At most one record waits unopened, so this bounds the buffer.
        buf.reserve(16 * 1024);
        buf
    }

    pub fn extend(&mut self, bytes: &[u8]) {
        self.buffer().extend_from_slice(bytes);
    }

    /// Opens every whole record gathered, appending its bytes to `plain`.
    /// An error is final: the link cannot be trusted after it.
    pub fn open(&mut self, plain: &mut Vec<u8>) -> Result<(), CryptoError> {
        loop {
            let rest = self.gathered.unread();
            let Some(prefix) = rest.first_chunk::<RECORD_PREFIX>() else {
                return Ok(());
            };
            let len = usize::from(u16::from_be_bytes(*prefix));
            if len < TAG {
                return Err(CryptoError::Short(len));
            }
            let Some(record) = rest.get(RECORD_PREFIX..RECORD_PREFIX + len) else {
                return Ok(());
            };
            if self.nonce == u64::MAX {
                return Err(CryptoError::Exhausted);
            }
            let at = plain.len();
            plain.resize(at + len - TAG, 0);
            match self
                .state
                .read_message(self.nonce, record, &mut plain[at..])
            {
                Ok(n) => plain.truncate(at + n),
                Err(_) => {
                    plain.truncate(at);
                    return Err(CryptoError::Record);
                }
            }
            self.nonce += 1;
            self.gathered.consume(RECORD_PREFIX + len);
        }
    }

    /// At the end of the stream: an error if a record was cut off.
    pub fn finish(&self) -> Result<(), CryptoError> {
        if !self.gathered.unread().is_empty() {
            return Err(CryptoError::Truncated);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ClientId {
        s.parse().unwrap()
    }

    fn parties() -> Parties {
        Parties {
            caller: id("alice"),
            callee: id("bob"),
            turns: false,
        }
    }

    fn open_link(key: &PeerKey) -> ((Sealer, Opener), (Sealer, Opener)) {
        let (calling, first) = Calling::start(key, &parties()).unwrap();
        assert_eq!(first.len(), HANDSHAKE_LEN);
        let (callee, reply) = answer(key, &parties(), &first).unwrap();
        assert_eq!(reply.len(), HANDSHAKE_LEN);
        (calling.finish(&reply).unwrap().split(), callee.split())
    }

    #[test]
    fn keys_depend_on_the_token_and_the_caller() {
        let t = Token::from_bytes([7; 16]);
        let k = PeerKey::derive(&t, &id("alice"));
        assert_eq!(k, PeerKey::derive(&t, &id("alice")), "deterministic");
        assert_ne!(k, PeerKey::derive(&t, &id("alicf")));
        assert_ne!(
            k,
            PeerKey::derive(&Token::from_bytes([8; 16]), &id("alice"))
        );
        assert_eq!(k.to_string().parse::<PeerKey>(), Ok(k));
        assert_eq!(k.to_string().len(), 32);
        assert_eq!(format!("{k:?}"), "PeerKey(..)");
        // Pinned, as other clients derive it too: the value docs/PROTOCOL.md's
        // Python line gives.
        assert_eq!(k.to_string(), "8b90af5603f466e57221490b377199f7");
    }

    #[test]
    fn records_carry_bytes_both_ways_split_anyhow() {
        let key = PeerKey::from_bytes([1; 16]);
        let ((mut a_out, mut a_in), (mut b_out, mut b_in)) = open_link(&key);
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let mut wire = Vec::new();
        a_out.seal(b"hello", &mut wire).unwrap();
        a_out.seal(&big, &mut wire).unwrap();
        a_out.seal(b"", &mut wire).unwrap();
        // Fed a byte at a time, then the rest: records open as they complete.
        let mut plain = Vec::new();
        for b in &wire[..100] {
            b_in.extend(&[*b]);
            b_in.open(&mut plain).unwrap();
        }
        assert!(b_in.finish().is_err(), "a record is cut off");
        b_in.extend(&wire[100..]);
        b_in.open(&mut plain).unwrap();
        b_in.finish().unwrap();
        assert_eq!(&plain[..5], b"hello");
        assert_eq!(&plain[5..], &big[..]);
        // And the other way, with its own nonces.
        let mut back = Vec::new();
        b_out.seal(b"hi", &mut back).unwrap();
        let mut got = Vec::new();
        a_in.extend(&back);
        a_in.open(&mut got).unwrap();
        assert_eq!(got, b"hi");
    }

    #[test]
    fn altered_replayed_or_reordered_records_do_not_open() {
        let key = PeerKey::from_bytes([2; 16]);
        let mut records = Vec::new();
        {
            let ((mut out, _), _) = open_link(&key);
            for text in [&b"one"[..], b"two"] {
                let mut r = Vec::new();
                out.seal(text, &mut r).unwrap();
                records.push(r);
            }
        }
        // A new link, and "one" and "two" sealed on it.
        let fresh = || {
            let ((mut out, _), (_, inn)) = open_link(&key);
            let mut wire = Vec::new();
            for text in [&b"one"[..], b"two"] {
                out.seal(text, &mut wire).unwrap();
            }
            (wire, inn)
        };
        // Another link's records: its keys are fresh.
        let (_, mut inn) = fresh();
        inn.extend(&records[0]);
        assert_eq!(inn.open(&mut Vec::new()), Err(CryptoError::Record));
        // A flipped bit.
        let (mut wire, mut inn) = fresh();
        wire[5] ^= 1;
        inn.extend(&wire);
        assert_eq!(inn.open(&mut Vec::new()), Err(CryptoError::Record));
        // Reordered, and replayed.
        let (wire, mut inn) = fresh();
        let second = &wire[wire.len() / 2..];
        inn.extend(second);
        assert_eq!(inn.open(&mut Vec::new()), Err(CryptoError::Record));
        let (wire, mut inn) = fresh();
        let first = &wire[..wire.len() / 2];
        inn.extend(first);
        inn.extend(first);
        let mut plain = Vec::new();
        assert_eq!(inn.open(&mut plain), Err(CryptoError::Record));
        assert_eq!(plain, b"one", "the first opened, its replay did not");
        // Shorter than a tag.
        let (_, mut inn) = fresh();
        inn.extend(&[0, 3, 1, 2, 3]);
        assert_eq!(inn.open(&mut Vec::new()), Err(CryptoError::Short(3)));
    }

    #[test]
    fn a_wrong_key_or_party_fails_the_handshake_on_both_sides() {
        let key = PeerKey::from_bytes([3; 16]);
        let other = PeerKey::from_bytes([4; 16]);
        let (_, first) = Calling::start(&key, &parties()).unwrap();
        // The callee's key differs: it refuses the call.
        assert!(matches!(
            answer(&other, &parties(), &first),
            Err(CryptoError::Handshake)
        ));
        // The caller named another callee, or another turn-taking.
        for p in [
            Parties {
                callee: id("carol"),
                ..parties()
            },
            Parties {
                turns: true,
                ..parties()
            },
        ] {
            assert!(matches!(
                answer(&key, &p, &first),
                Err(CryptoError::Handshake)
            ));
        }
        // An answer made with another key fails at the caller.
        let (calling, _) = Calling::start(&key, &parties()).unwrap();
        let (_, first_other) = Calling::start(&other, &parties()).unwrap();
        let (_, reply) = answer(&other, &parties(), &first_other).unwrap();
        assert!(matches!(
            calling.finish(&reply),
            Err(CryptoError::Handshake)
        ));
        // Garbage of any length.
        for junk in [&[][..], &[0u8; 47], &[0u8; 48], &[0xffu8; 200]] {
            assert!(answer(&key, &parties(), junk).is_err());
            let (calling, _) = Calling::start(&key, &parties()).unwrap();
            assert!(calling.finish(junk).is_err());
        }
    }
}
