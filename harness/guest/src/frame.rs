//! The data channel of `vloop-harness exec`: a byte stream from the guest agent to the host
//! over a virtio-serial port, cut into frames. It carries the command's stdout and stderr as
//! they come and the files copied out after it; the structured results stay on their own
//! serial port. A frame is a tag byte, a payload length (u32, little-endian) and the payload;
//! [`Tag::End`] closes the stream, so the host knows that nothing was lost in flight.
//!
//! The decoder is pure (bytes in, frames out) and trusts nothing: an unknown tag, an
//! oversized length or a header that does not parse is an error, never a panic.

use serde::{Deserialize, Serialize};

/// Bytes before each payload: the tag and the length.
pub const HEADER_LEN: usize = 5;
/// The largest payload a decoder accepts.
pub const MAX_PAYLOAD: u32 = 1 << 20;
/// The largest payload the agent sends.
pub const CHUNK: usize = 64 * 1024;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Tag {
    /// The stream is complete (no payload).
    End = 0,
    /// Bytes the command wrote to stdout.
    Stdout = 1,
    /// Bytes the command wrote to stderr (or the agent about the command).
    Stderr = 2,
    /// A [`FileHeader`] as JSON: the entry whose content follows.
    FileStart = 3,
    /// Content of the file last started.
    FileData = 4,
}

impl Tag {
    fn from_byte(b: u8) -> Option<Tag> {
        Some(match b {
            0 => Tag::End,
            1 => Tag::Stdout,
            2 => Tag::Stderr,
            3 => Tag::FileStart,
            4 => Tag::FileData,
            _ => return None,
        })
    }
}

/// What kind of entry a [`FileHeader`] describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// A regular file; `size` bytes of [`Tag::FileData`] follow.
    File,
    /// A directory.
    Dir,
    /// A symbolic link to `target`.
    Symlink,
}

/// One entry of a copied-out item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileHeader {
    /// Which copy-out item (its index in [`crate::Step::CopyOut`]'s paths).
    pub item: u32,
    /// Path below the item, `/`-separated; empty for the item itself.
    pub path: String,
    /// File, directory or symlink.
    pub kind: FileKind,
    /// Permission bits.
    pub mode: u32,
    /// Content length of a file (0 otherwise).
    pub size: u64,
    /// Target of a symlink (empty otherwise).
    #[serde(default)]
    pub target: String,
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// [`Tag::End`].
    End,
    /// [`Tag::Stdout`].
    Stdout(Vec<u8>),
    /// [`Tag::Stderr`].
    Stderr(Vec<u8>),
    /// [`Tag::FileStart`].
    FileStart(FileHeader),
    /// [`Tag::FileData`].
    FileData(Vec<u8>),
}

/// Errors of decoding the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A tag byte that names no frame.
    #[error("data channel: unknown frame tag {0}")]
    UnknownTag(u8),
    /// A payload longer than [`MAX_PAYLOAD`].
    #[error("data channel: frame of {0} bytes is over the limit of {MAX_PAYLOAD}")]
    TooLong(u32),
    /// A file header that is not valid JSON of a [`FileHeader`].
    #[error("data channel: bad file header: {0}")]
    BadHeader(String),
}

/// The header of a frame with `len` bytes of payload.
pub fn header(tag: Tag, len: u32) -> [u8; HEADER_LEN] {
    let l = len.to_le_bytes();
    [tag as u8, l[0], l[1], l[2], l[3]]
}

/// A whole frame: header and payload (which must be at most [`MAX_PAYLOAD`] bytes).
pub fn encode(tag: Tag, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
    v.extend_from_slice(&header(tag, len));
    v.extend_from_slice(payload);
    v
}

/// The [`Tag::FileStart`] frame of `h`.
pub fn encode_file_start(h: &FileHeader) -> Vec<u8> {
    encode(
        Tag::FileStart,
        serde_json::to_string(h).unwrap_or_default().as_bytes(),
    )
}

/// A streaming decoder: feed bytes as they arrive, take frames as they complete.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
}

impl Decoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes received that are not part of a complete frame yet.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete frame, if one is there.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        let rest = &self.buf[self.start..];
        let Some(head) = rest.get(..HEADER_LEN) else {
            return Ok(None);
        };
        let tag = Tag::from_byte(head[0]).ok_or(FrameError::UnknownTag(head[0]))?;
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLong(len));
        }
        // len <= MAX_PAYLOAD, so this cannot overflow.
        let end = HEADER_LEN + len as usize;
        let Some(payload) = rest.get(HEADER_LEN..end) else {
            return Ok(None);
        };
        let payload = payload.to_vec();
        self.start += end;
        if self.start > 1 << 20 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        Ok(Some(match tag {
            Tag::End => Frame::End,
            Tag::Stdout => Frame::Stdout(payload),
            Tag::Stderr => Frame::Stderr(payload),
            Tag::FileData => Frame::FileData(payload),
            Tag::FileStart => Frame::FileStart(
                serde_json::from_slice(&payload)
                    .map_err(|e| FrameError::BadHeader(e.to_string()))?,
            ),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_of(path: &str) -> FileHeader {
        FileHeader {
            item: 1,
            path: path.into(),
            kind: FileKind::File,
            mode: 0o644,
            size: 3,
            target: String::new(),
        }
    }

    #[test]
    fn frames_survive_any_split_of_the_stream() {
        let mut stream = encode(Tag::Stdout, b"hello\n");
        stream.extend(encode(Tag::Stderr, b""));
        stream.extend(encode_file_start(&header_of("a/b")));
        stream.extend(encode(Tag::FileData, &[0, 255, 10]));
        stream.extend(encode(Tag::End, &[]));
        let want = vec![
            Frame::Stdout(b"hello\n".to_vec()),
            Frame::Stderr(Vec::new()),
            Frame::FileStart(header_of("a/b")),
            Frame::FileData(vec![0, 255, 10]),
            Frame::End,
        ];
        for step in [1, 2, 3, 7, stream.len()] {
            let mut d = Decoder::new();
            let mut got = Vec::new();
            for chunk in stream.chunks(step) {
                d.push(chunk);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got, want, "chunks of {step}");
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn hostile_input_is_an_error_not_a_panic() {
        let mut d = Decoder::new();
        d.push(&[9, 0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(FrameError::UnknownTag(9)));
        let mut d = Decoder::new();
        d.push(&header(Tag::Stdout, u32::MAX));
        assert_eq!(d.next_frame(), Err(FrameError::TooLong(u32::MAX)));
        let mut d = Decoder::new();
        d.push(&encode(Tag::FileStart, b"{not json"));
        assert!(matches!(d.next_frame(), Err(FrameError::BadHeader(_))));
        let mut d = Decoder::new();
        d.push(&header(Tag::Stdout, 10));
        d.push(b"short");
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.pending(), 10);
    }
}
