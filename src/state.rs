//! State framing: how the application's state bytes cross from one generation to the next.
//!
//! The same format travels through a pipe (fork/exec handover) and sits in a memfd (systemd's
//! file descriptor store):
//!
//! ```text
//! header   "SHFLSTA1"  version: u32  generation: u64
//! chunk    len: u32 (1..=16 MiB)  crc32(payload): u32  payload        (repeated)
//! commit   0: u32  total length: u64  crc32(all payload): u32  "SHFLEND1"
//! ```
//!
//! All integers are big-endian. A state is **committed** only by its final record: a writer
//! killed in the middle leaves no commit record, and the reader reports a torn state instead of
//! returning the bytes. A chunk's bytes are handed to the application only after its checksum
//! matched; a stored state (memfd) is verified whole before the first byte is handed out.

use std::io::{self, Read, Seek, SeekFrom};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

const MAGIC: &[u8; 8] = b"SHFLSTA1";
const COMMIT_MAGIC: &[u8; 8] = b"SHFLEND1";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 8;
/// Payload bytes per chunk written.
const CHUNK: usize = 1024 * 1024;
/// Largest chunk accepted when reading (anything larger is not ours).
const MAX_CHUNK: usize = 16 * 1024 * 1024;

/// A state that could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// Reading the state failed.
    #[error("cannot read the state: {0}")]
    Io(#[from] io::Error),
    /// The bytes are not a shellflip state at all.
    #[error("the state was not written by shellflip (bad magic)")]
    Foreign,
    /// The state was written by a newer version of the format.
    #[error("the state has format version {0}; this build reads version {VERSION}")]
    UnsupportedVersion(u32),
    /// The writer stopped before committing: it was killed, or failed, in the middle.
    #[error(
        "the state is torn: {received} bytes were written but never committed (the previous \
         generation stopped in the middle of writing it)"
    )]
    Torn {
        /// Payload bytes that were present.
        received: u64,
    },
    /// A checksum or length does not match: the bytes were damaged.
    #[error("the state is corrupt: {0}")]
    Corrupt(&'static str),
}

impl From<StateError> for io::Error {
    fn from(e: StateError) -> io::Error {
        match e {
            StateError::Io(e) => e,
            StateError::Torn { .. } => io::Error::new(io::ErrorKind::UnexpectedEof, e),
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

/// The start of a state: who wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    /// The generation of the process that wrote it.
    pub(crate) generation: u64,
}

fn encode_header(generation: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&VERSION.to_be_bytes());
    h.extend_from_slice(&generation.to_be_bytes());
    h
}

fn decode_header(h: &[u8; HEADER_LEN]) -> Result<Header, StateError> {
    if &h[..8] != MAGIC {
        return Err(StateError::Foreign);
    }
    let version = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
    if version != VERSION {
        return Err(StateError::UnsupportedVersion(version));
    }
    let mut g = [0u8; 8];
    g.copy_from_slice(&h[12..20]);
    Ok(Header {
        generation: u64::from_be_bytes(g),
    })
}

/// Writes the framing around the application's bytes. Cloning it shares it: the application
/// gets one handle, the library keeps another to commit once the application is done.
#[derive(Clone)]
pub(crate) struct StateWriter {
    inner: Arc<Mutex<FrameWriter>>,
}

struct FrameWriter {
    sink: Pin<Box<dyn AsyncWrite + Send>>,
    /// Encoded bytes waiting to go out, and how many of them went.
    out: Vec<u8>,
    out_pos: usize,
    /// The chunk being filled: 8 bytes reserved for its length and checksum, then payload.
    chunk: Vec<u8>,
    total: crc32fast::Hasher,
    total_len: u64,
    committed: bool,
    /// Whether writing to the sink failed (the reader went away), as opposed to the
    /// application's own failure.
    sink_failed: bool,
}

impl StateWriter {
    pub(crate) fn new(sink: impl AsyncWrite + Send + 'static, generation: u64) -> StateWriter {
        let mut chunk = Vec::with_capacity(8 + CHUNK);
        chunk.resize(8, 0);
        StateWriter {
            inner: Arc::new(Mutex::new(FrameWriter {
                sink: Box::pin(sink),
                out: encode_header(generation),
                out_pos: 0,
                chunk,
                total: crc32fast::Hasher::new(),
                total_len: 0,
                committed: false,
                sink_failed: false,
            })),
        }
    }

    /// Writes the commit record. After it, the state is complete and further writes fail.
    pub(crate) async fn commit(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.lock().poll_commit(cx)).await?;
        let mut this = self.clone();
        this.flush().await?;
        this.shutdown().await
    }

    /// Whether a write to the sink failed: the reader went away.
    pub(crate) fn sink_failed(&self) -> bool {
        self.lock().sink_failed
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FrameWriter> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl FrameWriter {
    /// Writes out everything pending.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.out.len() {
            let n = match ready!(self.sink.as_mut().poll_write(cx, &self.out[self.out_pos..])) {
                Ok(0) => Err(io::ErrorKind::WriteZero.into()),
                other => other,
            };
            match n {
                Ok(n) => self.out_pos += n,
                Err(e) => {
                    self.sink_failed = true;
                    return Poll::Ready(Err(e));
                }
            }
        }
        self.out.clear();
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }

    /// Seals the current chunk (if it holds payload) and queues it.
    fn seal_chunk(&mut self) {
        let len = self.chunk.len() - 8;
        if len == 0 {
            return;
        }
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&self.chunk[8..]);
        self.total.combine(&hasher);
        let crc = hasher.finalize();
        self.chunk[..4].copy_from_slice(&(len as u32).to_be_bytes());
        self.chunk[4..8].copy_from_slice(&crc.to_be_bytes());
        debug_assert!(self.out.is_empty());
        std::mem::swap(&mut self.out, &mut self.chunk);
        self.chunk.clear();
        self.chunk.resize(8, 0);
    }

    fn poll_commit(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.committed {
            return Poll::Ready(Ok(()));
        }
        ready!(self.poll_drain(cx))?;
        self.seal_chunk();
        ready!(self.poll_drain(cx))?;
        let mut record = Vec::with_capacity(24);
        record.extend_from_slice(&0u32.to_be_bytes());
        record.extend_from_slice(&self.total_len.to_be_bytes());
        record.extend_from_slice(&self.total.clone().finalize().to_be_bytes());
        record.extend_from_slice(COMMIT_MAGIC);
        self.out = record;
        self.committed = true;
        self.poll_drain(cx)
    }
}

impl AsyncWrite for StateWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut w = self.lock();
        if w.committed {
            return Poll::Ready(Err(io::Error::other("the state was already committed")));
        }
        ready!(w.poll_drain(cx))?;
        let room = 8 + CHUNK - w.chunk.len();
        let n = room.min(buf.len());
        w.chunk.extend_from_slice(&buf[..n]);
        w.total_len += n as u64;
        if w.chunk.len() == 8 + CHUNK {
            w.seal_chunk();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut w = self.lock();
        ready!(w.poll_drain(cx))?;
        if !w.committed {
            w.seal_chunk();
            ready!(w.poll_drain(cx))?;
        }
        w.sink.as_mut().poll_flush(cx)
    }

    /// Flushes; it does not commit (only the library commits, once the handler succeeded).
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_flush(cx))?;
        let mut w = self.lock();
        if w.committed {
            w.sink.as_mut().poll_shutdown(cx)
        } else {
            Poll::Ready(Ok(()))
        }
    }
}

/// A reader of a state stream's verified payload; it reads and checks the header first.
///
/// The reader ends (returns 0) only after the commit record was found and the total length and
/// checksum matched. A stream that stops before that is an [`io::ErrorKind::UnexpectedEof`]
/// error carrying [`StateError::Torn`]; damaged bytes are [`io::ErrorKind::InvalidData`].
pub(crate) fn read_stream<R>(source: R) -> StateReader
where
    R: AsyncRead + Send + 'static,
{
    StateReader {
        source: Box::pin(source),
        step: Step::Header,
        buf: Vec::new(),
        filled: 0,
        served: 0,
        total: crc32fast::Hasher::new(),
        total_len: 0,
    }
}

/// The verified payload of a state: see [`read_stream`].
pub(crate) struct StateReader {
    source: Pin<Box<dyn AsyncRead + Send>>,
    step: Step,
    /// The current record: filled up to `filled`, payload served up to `served`.
    buf: Vec<u8>,
    filled: usize,
    served: usize,
    total: crc32fast::Hasher,
    total_len: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Reading the header.
    Header,
    /// Reading a record's 4-byte length.
    Length,
    /// Reading a chunk's checksum and payload.
    Chunk,
    /// Serving a verified chunk's payload.
    Serve,
    /// Reading the commit record.
    Commit,
    Done,
}

impl StateReader {
    /// Fills `buf[filled..]` from the source. Ok(false) at end of stream before it was full.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        while self.filled < self.buf.len() {
            let mut rb = tokio::io::ReadBuf::new(&mut self.buf[self.filled..]);
            ready!(self.source.as_mut().poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                return Poll::Ready(Ok(false));
            }
            self.filled += n;
        }
        Poll::Ready(Ok(true))
    }

    fn expect(&mut self, len: usize, step: Step) {
        self.buf.clear();
        self.buf.resize(len, 0);
        self.filled = 0;
        self.step = step;
    }

    fn torn(&self) -> io::Error {
        StateError::Torn {
            received: self.total_len,
        }
        .into()
    }
}

impl AsyncRead for StateReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match this.step {
                Step::Done => return Poll::Ready(Ok(())),
                Step::Header => {
                    if this.buf.len() != HEADER_LEN {
                        this.expect(HEADER_LEN, Step::Header);
                    }
                    if !ready!(this.poll_fill(cx))? {
                        return Poll::Ready(Err(this.torn()));
                    }
                    let mut h = [0u8; HEADER_LEN];
                    h.copy_from_slice(&this.buf);
                    decode_header(&h)?;
                    this.expect(4, Step::Length);
                }
                Step::Length => {
                    if this.buf.len() != 4 {
                        this.expect(4, Step::Length);
                    }
                    if !ready!(this.poll_fill(cx))? {
                        return Poll::Ready(Err(this.torn()));
                    }
                    let len =
                        u32::from_be_bytes([this.buf[0], this.buf[1], this.buf[2], this.buf[3]])
                            as usize;
                    if len == 0 {
                        this.expect(8 + 4 + 8, Step::Commit);
                    } else if len > MAX_CHUNK {
                        return Poll::Ready(Err(
                            StateError::Corrupt("chunk length too large").into()
                        ));
                    } else {
                        this.expect(4 + len, Step::Chunk);
                    }
                }
                Step::Chunk => {
                    if !ready!(this.poll_fill(cx))? {
                        return Poll::Ready(Err(this.torn()));
                    }
                    let crc =
                        u32::from_be_bytes([this.buf[0], this.buf[1], this.buf[2], this.buf[3]]);
                    let payload = &this.buf[4..];
                    let mut hasher = crc32fast::Hasher::new();
                    hasher.update(payload);
                    this.total.combine(&hasher);
                    if hasher.finalize() != crc {
                        return Poll::Ready(Err(
                            StateError::Corrupt("chunk checksum mismatch").into()
                        ));
                    }
                    this.total_len += payload.len() as u64;
                    this.served = 4;
                    this.step = Step::Serve;
                }
                Step::Serve => {
                    let rest = &this.buf[this.served..];
                    if rest.is_empty() {
                        this.expect(4, Step::Length);
                        continue;
                    }
                    let n = rest.len().min(out.remaining());
                    out.put_slice(&rest[..n]);
                    this.served += n;
                    return Poll::Ready(Ok(()));
                }
                Step::Commit => {
                    if !ready!(this.poll_fill(cx))? {
                        return Poll::Ready(Err(this.torn()));
                    }
                    let b = &this.buf;
                    let mut len = [0u8; 8];
                    len.copy_from_slice(&b[..8]);
                    let crc = u32::from_be_bytes([b[8], b[9], b[10], b[11]]);
                    if &b[12..20] != COMMIT_MAGIC {
                        return Poll::Ready(Err(StateError::Corrupt("bad commit record").into()));
                    }
                    if u64::from_be_bytes(len) != this.total_len
                        || crc != this.total.clone().finalize()
                    {
                        return Poll::Ready(Err(StateError::Corrupt(
                            "total length or checksum mismatch",
                        )
                        .into()));
                    }
                    this.step = Step::Done;
                    this.buf = Vec::new();
                }
            }
        }
    }
}

/// Checks a stored state (a memfd) from its start to its commit record without handing out
/// any byte, then rewinds it. `Ok(None)` means the file is empty: no state was left.
pub(crate) fn verify_file(file: &mut std::fs::File) -> Result<Option<Header>, StateError> {
    file.seek(SeekFrom::Start(0))?;
    let mut r = io::BufReader::with_capacity(1 << 20, &mut *file);
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut h[got..])? {
            0 if got == 0 => return Ok(None),
            0 => return Err(StateError::Torn { received: 0 }),
            n => got += n,
        }
    }
    let header = decode_header(&h)?;
    let mut total = crc32fast::Hasher::new();
    let mut total_len = 0u64;
    let mut chunk = Vec::new();
    let torn = |total_len| {
        move |e: io::Error| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                StateError::Torn {
                    received: total_len,
                }
            } else {
                StateError::Io(e)
            }
        }
    };
    loop {
        let mut len = [0u8; 4];
        r.read_exact(&mut len).map_err(torn(total_len))?;
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 {
            let mut c = [0u8; 20];
            r.read_exact(&mut c).map_err(torn(total_len))?;
            let mut l = [0u8; 8];
            l.copy_from_slice(&c[..8]);
            if &c[12..20] != COMMIT_MAGIC {
                return Err(StateError::Corrupt("bad commit record"));
            }
            if u64::from_be_bytes(l) != total_len
                || u32::from_be_bytes([c[8], c[9], c[10], c[11]]) != total.finalize()
            {
                return Err(StateError::Corrupt("total length or checksum mismatch"));
            }
            break;
        }
        if len > MAX_CHUNK {
            return Err(StateError::Corrupt("chunk length too large"));
        }
        chunk.resize(4 + len, 0);
        r.read_exact(&mut chunk).map_err(torn(total_len))?;
        let crc = u32::from_be_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&chunk[4..]);
        total.combine(&hasher);
        if hasher.finalize() != crc {
            return Err(StateError::Corrupt("chunk checksum mismatch"));
        }
        total_len += len as u64;
    }
    drop(r);
    file.seek(SeekFrom::Start(0))?;
    Ok(Some(header))
}

/// Creates an empty, close-on-exec memfd to hold a state.
#[cfg(target_os = "linux")]
pub(crate) fn create_memfd() -> io::Result<std::fs::File> {
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let fd = memfd_create(c"shellflip-state", MFdFlags::MFD_CLOEXEC).map_err(io::Error::from)?;
    Ok(std::fs::File::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn roundtrip(payload: &[u8]) -> Vec<u8> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let payload = payload.to_vec();
        let writer = tokio::spawn(async move {
            let w = StateWriter::new(a, 3);
            let mut app = w.clone();
            app.write_all(&payload).await.unwrap();
            drop(app);
            w.commit().await.unwrap();
        });
        let mut reader = read_stream(b);
        let mut got = Vec::new();
        reader.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        got
    }

    #[tokio::test]
    async fn empty_and_large_states_round_trip() {
        assert_eq!(roundtrip(b"").await, b"");
        let big: Vec<u8> = (0..(3 * CHUNK + 17)).map(|i| (i * 7) as u8).collect();
        assert_eq!(roundtrip(&big).await, big);
    }

    /// Encodes a state in memory: header, payload, and optionally the commit record.
    async fn encode(payload: &[u8], commit: bool) -> Vec<u8> {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let w = StateWriter::new(a, 1);
        let mut app = w.clone();
        app.write_all(payload).await.unwrap();
        app.flush().await.unwrap();
        if commit {
            w.commit().await.unwrap();
        }
        drop(app);
        drop(w);
        let mut v = Vec::new();
        b.read_to_end(&mut v).await.unwrap();
        v
    }

    async fn read_all(bytes: Vec<u8>) -> io::Result<Vec<u8>> {
        let mut r = read_stream(std::io::Cursor::new(bytes));
        let mut v = Vec::new();
        r.read_to_end(&mut v).await?;
        Ok(v)
    }

    #[tokio::test]
    async fn uncommitted_stream_is_torn_not_eof() {
        let bytes = encode(b"hello world", false).await;
        let err = read_all(bytes).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(err.to_string().contains("torn"), "{err}");
    }

    #[tokio::test]
    async fn every_truncation_is_an_error() {
        let bytes = encode(&vec![5u8; 1000], true).await;
        for cut in 0..bytes.len() {
            assert!(
                read_all(bytes[..cut].to_vec()).await.is_err(),
                "cut at {cut}"
            );
        }
        assert_eq!(read_all(bytes).await.unwrap(), vec![5u8; 1000]);
    }

    #[tokio::test]
    async fn flipped_byte_is_corrupt() {
        let mut bytes = encode(b"some state bytes", true).await;
        bytes[HEADER_LEN + 8 + 2] ^= 0x40;
        let err = read_all(bytes).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn foreign_bytes_are_refused() {
        let err = read_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec())
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("not written by shellflip"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn stored_state_is_verified_whole() {
        let mut f = create_memfd().unwrap();
        assert!(
            verify_file(&mut f).unwrap().is_none(),
            "empty file is no state"
        );
        let good = encode(&vec![9u8; 600_000], true).await;
        std::io::Write::write_all(&mut f, &good).unwrap();
        assert_eq!(verify_file(&mut f).unwrap().unwrap().generation, 1);
        f.set_len(good.len() as u64 - 1).unwrap();
        assert!(matches!(verify_file(&mut f), Err(StateError::Torn { .. })));
    }

    #[tokio::test]
    async fn writes_after_commit_fail() {
        let (a, _b) = tokio::io::duplex(1024);
        let w = StateWriter::new(a, 0);
        w.commit().await.unwrap();
        let mut app = w.clone();
        assert!(app.write_all(b"late").await.is_err());
    }
}
