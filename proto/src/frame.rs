//! Length-prefixed postcard frames: the framing of the control socket and
//! of the peer link after its HTTP upgrade.
//!
//! Each frame is a little-endian `u32` byte count followed by that many
//! bytes of a postcard-encoded value. The length prefix is what lets a
//! reader know a message ended (local sockets have no message boundaries,
//! and `interprocess` adds none), and it is checked against a maximum
//! before any byte of the body is buffered, so a hostile peer cannot make a
//! reader allocate more than that.
//!
//! The codec does no IO: [`Decoder`] is fed whatever bytes arrived and
//! yields whole frames; [`encode`] appends a frame to a buffer.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Bytes of the length prefix.
pub const PREFIX: usize = 4;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {size} bytes is larger than the limit of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("undecodable frame: {0}")]
    Malformed(#[from] postcard::Error),
    #[error("frame holds {0} bytes after its value")]
    Trailing(usize),
    #[error("connection closed in the middle of a frame")]
    Truncated,
}

/// Appends `value` as one frame to `out`. On error `out` is left as it
/// was, so frames queued before it are kept.
pub fn encode<T: Serialize>(value: &T, max: usize, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; PREFIX]);
    if let Err(e) = postcard::to_extend(value, Append(out)) {
        out.truncate(start);
        return Err(e.into());
    }
    let size = out.len() - start - PREFIX;
    if size > max {
        out.truncate(start);
        return Err(FrameError::TooLarge { size, max });
    }
    out[start..start + PREFIX].copy_from_slice(&(size as u32).to_le_bytes());
    Ok(())
}

/// Lets postcard append to a borrowed buffer.
struct Append<'a>(&'a mut Vec<u8>);

impl Extend<u8> for Append<'_> {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, bytes: I) {
        self.0.extend(bytes);
    }
}

/// Bytes gathered from a stream, the front of which has been consumed:
/// what a reader of length-prefixed units ([`Decoder`]'s frames, the
/// peer link's records) keeps between reads.
#[derive(Debug, Default)]
pub(crate) struct Gathered {
    buf: Vec<u8>,
    start: usize,
}

impl Gathered {
    pub(crate) fn with_capacity(n: usize) -> Gathered {
        Gathered {
            buf: Vec::with_capacity(n),
            start: 0,
        }
    }

    /// Room to read into: the caller reads into this `Vec`'s spare
    /// capacity or appends to it.
    pub(crate) fn buffer(&mut self) -> &mut Vec<u8> {
        // Reclaim the consumed front before growing.
        if self.start > 0 && (self.start == self.buf.len() || self.start > self.buf.capacity() / 2)
        {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        &mut self.buf
    }

    /// What has arrived and is not consumed.
    pub(crate) fn unread(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    pub(crate) fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.buf.len());
    }
}

/// Gathers bytes and yields whole frames.
#[derive(Debug)]
pub struct Decoder {
    gathered: Gathered,
    max: usize,
}

impl Decoder {
    /// A decoder refusing frames larger than `max` bytes.
    pub fn new(max: usize) -> Decoder {
        Decoder {
            gathered: Gathered::with_capacity(4096),
            max,
        }
    }

    /// Room to read into: the caller reads into this `Vec`'s spare
    /// capacity or appends to it.
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        self.gathered.buffer()
    }

    /// Adds bytes that arrived.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buffer().extend_from_slice(bytes);
    }

    /// The next whole frame, if one has arrived. An error means the stream
    /// is unusable: the connection should be closed.
    pub fn decode<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        let avail = self.gathered.unread();
        if avail.len() < PREFIX {
            return Ok(None);
        }
        let mut prefix = [0u8; PREFIX];
        prefix.copy_from_slice(&avail[..PREFIX]);
        let size = u32::from_le_bytes(prefix) as usize;
        if size > self.max {
            return Err(FrameError::TooLarge {
                size,
                max: self.max,
            });
        }
        if avail.len() < PREFIX + size {
            return Ok(None);
        }
        let body = &avail[PREFIX..PREFIX + size];
        let (value, rest) = postcard::take_from_bytes(body)?;
        if !rest.is_empty() {
            return Err(FrameError::Trailing(rest.len()));
        }
        self.gathered.consume(PREFIX + size);
        Ok(Some(value))
    }

    /// Whether bytes of an unfinished frame are buffered (at end of stream,
    /// that is a truncated frame rather than a clean close).
    fn has_partial(&self) -> bool {
        !self.gathered.unread().is_empty()
    }

    /// Called at end of stream: a clean close, or `Truncated` when it cut
    /// a frame short.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.has_partial() {
            Err(FrameError::Truncated)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    enum Msg {
        Hello(String),
        Number(u64),
    }

    #[test]
    fn round_trip_byte_by_byte() {
        let mut wire = Vec::new();
        encode(&Msg::Hello("hi".into()), 100, &mut wire).unwrap();
        encode(&Msg::Number(7), 100, &mut wire).unwrap();
        let mut d = Decoder::new(100);
        let mut got = Vec::new();
        for b in wire {
            d.extend(&[b]);
            while let Some(m) = d.decode::<Msg>().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, vec![Msg::Hello("hi".into()), Msg::Number(7)]);
        assert!(!d.has_partial());
        assert!(d.finish().is_ok());
    }

    #[test]
    fn oversized_frames_are_refused_before_buffering() {
        let mut d = Decoder::new(10);
        d.extend(&1000u32.to_le_bytes());
        assert!(matches!(
            d.decode::<Msg>(),
            Err(FrameError::TooLarge {
                size: 1000,
                max: 10
            })
        ));
        let mut out = vec![1, 2, 3];
        assert!(encode(&Msg::Hello("x".repeat(20)), 10, &mut out).is_err());
        assert_eq!(
            out,
            vec![1, 2, 3],
            "a refused frame leaves the buffer as it was"
        );
    }

    #[test]
    fn a_value_that_cannot_be_encoded_leaves_the_buffer_as_it_was() {
        struct Unencodable;
        impl Serialize for Unencodable {
            fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
                Err(serde::ser::Error::custom("no"))
            }
        }
        let mut out = Vec::new();
        encode(&Msg::Number(7), 100, &mut out).unwrap();
        let before = out.clone();
        assert!(matches!(
            encode(&Unencodable, 100, &mut out),
            Err(FrameError::Malformed(_))
        ));
        assert_eq!(out, before);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut d = Decoder::new(100);
        d.extend(&[3, 0, 0, 0, 0xff, 0xff, 0xff]);
        assert!(matches!(d.decode::<Msg>(), Err(FrameError::Malformed(_))));
        // A value followed by bytes the frame's length counts in.
        let mut d = Decoder::new(100);
        d.extend(&[5, 0, 0, 0, 1, 7, 0xde, 0xad, 0xbe]);
        assert!(matches!(d.decode::<Msg>(), Err(FrameError::Trailing(3))));
        let mut d = Decoder::new(100);
        d.extend(&[2, 0]);
        assert!(d.decode::<Msg>().unwrap().is_none());
        assert!(d.has_partial());
        assert!(matches!(d.finish(), Err(FrameError::Truncated)));
    }
}
