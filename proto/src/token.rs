//! Client tokens: the secret that proves a request comes from the client
//! that registered an id.
//!
//! A token is 128 random bits from the operating system, written as 32 hex
//! digits on the wire. Comparison takes the same time whatever the input, so
//! that response timing does not leak how many leading digits a guess got
//! right.

use std::fmt;
use std::str::FromStr;

/// A 128-bit secret.
#[derive(Clone, Copy)]
pub struct Token([u8; 16]);

/// Why a string is not a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a token is 32 hex digits")]
pub struct TokenError;

impl Token {
    /// A fresh token from the operating system's random source.
    pub fn random() -> Result<Token, getrandom::Error> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes)?;
        Ok(Token(bytes))
    }

    /// A token with these exact bits (for tests and for tokens read back
    /// from storage).
    pub const fn from_bytes(bytes: [u8; 16]) -> Token {
        Token(bytes)
    }

    /// The secret's bits, for deriving keys from it ([`crate::crypto`]).
    pub(crate) fn bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// The 32 lower-case hex digits, without allocating.
    pub fn to_hex(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        write_hex(&self.0, &mut out);
        out
    }

    /// Parses 32 hex digits, either case.
    pub fn from_hex(s: &[u8]) -> Result<Token, TokenError> {
        let mut bytes = [0u8; 16];
        read_hex(s, &mut bytes).ok_or(TokenError)?;
        Ok(Token(bytes))
    }
}

/// `bytes` as lower-case hex into `out`, two digits a byte.
fn write_hex(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
}

/// Hex of either case into `out`, which it must fill exactly.
fn read_hex(s: &[u8], out: &mut [u8]) -> Option<()> {
    if s.len() != 2 * out.len() {
        return None;
    }
    for (b, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *b = hex_value(pair[0])? << 4 | hex_value(pair[1])?;
    }
    Some(())
}

/// Lower-case hex of any bytes (the peer link's handshake messages).
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; 2 * bytes.len()];
    write_hex(bytes, &mut out);
    // Hex digits are ASCII.
    String::from_utf8(out).unwrap_or_default()
}

/// Hex of either case as bytes; `None` if it is not hex.
pub(crate) fn from_hex(s: &str) -> Option<Vec<u8>> {
    let mut out = vec![0u8; s.len() / 2];
    read_hex(s.as_bytes(), &mut out)?;
    Some(out)
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl PartialEq for Token {
    fn eq(&self, other: &Token) -> bool {
        // Constant time: fold every byte difference before deciding.
        let diff = self
            .0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }
}

impl Eq for Token {}

impl FromStr for Token {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Token, TokenError> {
        Token::from_hex(s.as_bytes())
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = self.to_hex();
        // to_hex writes ASCII digits only.
        f.write_str(std::str::from_utf8(&hex).unwrap_or_default())
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print a secret into a log by accident.
        f.write_str("Token(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_either_case() {
        let t = Token::from_bytes([0xab; 16]);
        assert_eq!(t.to_string(), "ab".repeat(16));
        assert_eq!("AB".repeat(16).parse::<Token>(), Ok(t));
        assert_eq!(t.to_string().parse::<Token>(), Ok(t));
    }

    #[test]
    fn rejects_wrong_length_and_digits() {
        assert_eq!("ab".repeat(15).parse::<Token>(), Err(TokenError));
        assert_eq!("ab".repeat(17).parse::<Token>(), Err(TokenError));
        assert_eq!(
            format!("{}zz", "ab".repeat(15)).parse::<Token>(),
            Err(TokenError)
        );
    }

    #[test]
    fn random_tokens_differ_and_debug_hides_them() {
        let a = Token::random().unwrap();
        let b = Token::random().unwrap();
        assert_ne!(a, b);
        assert_eq!(format!("{a:?}"), "Token(..)");
    }

    #[test]
    fn any_bytes_to_hex_and_back() {
        assert_eq!(to_hex(&[0, 0xab, 0x10]), "00ab10");
        assert_eq!(from_hex("00AB10"), Some(vec![0, 0xab, 0x10]));
        assert_eq!(from_hex("0"), None);
        assert_eq!(from_hex("zz"), None);
        assert_eq!(from_hex("é0"), None);
    }
}
