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
    /// The environment that describes the inherited state descriptor is wrong.
    #[error(transparent)]
    Inherit(#[from] crate::InheritError),
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
            StateError::Inherit(e) => io::Error::new(io::ErrorKind::InvalidInput, e),
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

/// Where the old generation writes its state for the next one
/// ([`LifecycleHandler::send_to_new_process`](crate::LifecycleHandler::send_to_new_process)).
///
/// Write plain bytes: the library frames them in checksummed chunks and commits the state only
/// after `send_to_new_process` returned `Ok`. The state is a **snapshot**: what the application
/// changes after writing it does not reach the new generation.
///
/// # Examples
///
/// ```
/// use shellflip::{LifecycleHandler, StateWriter};
/// use tokio::io::AsyncWriteExt;
///
/// struct Sessions(Vec<u8>);
///
/// #[shellflip::async_trait]
/// impl LifecycleHandler for Sessions {
///     async fn send_to_new_process(&mut self, mut state: StateWriter) -> std::io::Result<()> {
///         state.write_all(&self.0).await
///     }
/// }
/// ```
#[derive(Clone)]
pub struct StateWriter {
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

impl std::fmt::Debug for StateWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateWriter").finish_non_exhaustive()
    }
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

/// The format's checks without any I/O: it is given each record whole, exactly
/// [`want`](Decoder::want) bytes at a time, and says what the record was or why it is wrong.
/// The stream reader and the stored-state verifier both drive it, so both check the same way.
#[derive(Debug, Clone)]
pub(crate) struct Decoder {
    step: Step,
    total: crc32fast::Hasher,
    total_len: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The header comes next.
    Header,
    /// A record's 4-byte length comes next.
    Length,
    /// A chunk's checksum and this many payload bytes come next.
    Chunk(usize),
    /// The commit record's body comes next.
    Commit,
    /// Committed: nothing more is read.
    Done,
}

/// What a record given to [`Decoder::push`] was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Record {
    /// The header: who wrote the state.
    Header(Header),
    /// A record's length; nothing to hand out.
    Length,
    /// A chunk whose payload (the record from [`PAYLOAD_OFFSET`] on) matched its checksum.
    Chunk,
    /// The commit record matched the whole payload: the state is complete.
    Committed,
}

/// Where a chunk record's payload starts (after its checksum).
pub(crate) const PAYLOAD_OFFSET: usize = 4;
/// The commit record's body: total length, total checksum, magic.
const COMMIT_LEN: usize = 8 + 4 + 8;

impl Decoder {
    pub(crate) fn new() -> Decoder {
        Decoder {
            step: Step::Header,
            total: crc32fast::Hasher::new(),
            total_len: 0,
        }
    }

    /// How many bytes the next record has (0 once the state is committed).
    pub(crate) fn want(&self) -> usize {
        match self.step {
            Step::Header => HEADER_LEN,
            Step::Length => 4,
            Step::Chunk(len) => PAYLOAD_OFFSET + len,
            Step::Commit => COMMIT_LEN,
            Step::Done => 0,
        }
    }

    /// Whether the commit record was read and matched.
    pub(crate) fn is_done(&self) -> bool {
        self.step == Step::Done
    }

    /// The error for a stream that ended now: torn, with the payload bytes verified so far.
    pub(crate) fn torn(&self) -> StateError {
        StateError::Torn {
            received: self.total_len,
        }
    }

    /// Checks the next record, `record.len() == self.want()`.
    pub(crate) fn push(&mut self, record: &[u8]) -> Result<Record, StateError> {
        debug_assert_eq!(record.len(), self.want());
        match self.step {
            Step::Header => {
                let mut h = [0u8; HEADER_LEN];
                h.copy_from_slice(record);
                let header = decode_header(&h)?;
                self.step = Step::Length;
                Ok(Record::Header(header))
            }
            Step::Length => {
                let len = u32::from_be_bytes([record[0], record[1], record[2], record[3]]) as usize;
                self.step = match len {
                    0 => Step::Commit,
                    len if len > MAX_CHUNK => {
                        return Err(StateError::Corrupt("chunk length too large"));
                    }
                    len => Step::Chunk(len),
                };
                Ok(Record::Length)
            }
            Step::Chunk(_) => {
                let crc = u32::from_be_bytes([record[0], record[1], record[2], record[3]]);
                let payload = &record[PAYLOAD_OFFSET..];
                let mut hasher = crc32fast::Hasher::new();
                hasher.update(payload);
                self.total.combine(&hasher);
                if hasher.finalize() != crc {
                    return Err(StateError::Corrupt("chunk checksum mismatch"));
                }
                self.total_len += payload.len() as u64;
                self.step = Step::Length;
                Ok(Record::Chunk)
            }
            Step::Commit => {
                let mut len = [0u8; 8];
                len.copy_from_slice(&record[..8]);
                let crc = u32::from_be_bytes([record[8], record[9], record[10], record[11]]);
                if &record[12..20] != COMMIT_MAGIC {
                    return Err(StateError::Corrupt("bad commit record"));
                }
                if u64::from_be_bytes(len) != self.total_len || crc != self.total.clone().finalize()
                {
                    return Err(StateError::Corrupt("total length or checksum mismatch"));
                }
                self.step = Step::Done;
                Ok(Record::Committed)
            }
            Step::Done => Err(StateError::Corrupt("bytes after the commit record")),
        }
    }
}

/// A reader of a state stream's verified payload; it reads and checks the header first.
pub(crate) fn read_stream<R>(source: R) -> StateReader
where
    R: AsyncRead + Send + 'static,
{
    StateReader {
        source: Box::pin(source),
        decoder: Decoder::new(),
        buf: Vec::new(),
        filled: 0,
        served: None,
    }
}

/// The state the previous generation wrote, as the new one reads it
/// ([`receive_from_old_process`](crate::receive_from_old_process)).
///
/// It hands out only payload whose chunk checksum matched, and ends (a read of 0 bytes) only
/// after the commit record matched the whole payload. A stream that stops before that is an
/// [`io::ErrorKind::UnexpectedEof`] error carrying [`StateError::Torn`]; damaged bytes are
/// [`io::ErrorKind::InvalidData`]. Never a silent short read.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
/// use tokio::io::AsyncReadExt;
///
/// if let Some(mut state) = shellflip::receive_from_old_process() {
///     let mut bytes = Vec::new();
///     state.read_to_end(&mut bytes).await?; // all of it, verified, or an error
/// }
/// # Ok(()) }
/// ```
pub struct StateReader {
    source: Pin<Box<dyn AsyncRead + Send>>,
    decoder: Decoder,
    /// The current record, filled up to `filled`.
    buf: Vec<u8>,
    filled: usize,
    /// A verified chunk being handed out: how far.
    served: Option<usize>,
}

impl std::fmt::Debug for StateReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateReader").finish_non_exhaustive()
    }
}

impl StateReader {
    /// Fills the current record from the source. Ok(false) at end of stream before it was full.
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
}

impl AsyncRead for StateReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Some(pos) = this.served {
                let rest = &this.buf[pos..];
                if !rest.is_empty() {
                    let n = rest.len().min(out.remaining());
                    out.put_slice(&rest[..n]);
                    this.served = Some(pos + n);
                    return Poll::Ready(Ok(()));
                }
                this.served = None;
                this.buf.clear();
                this.filled = 0;
            }
            if this.decoder.is_done() {
                this.buf = Vec::new();
                return Poll::Ready(Ok(()));
            }
            if this.buf.is_empty() {
                this.buf.resize(this.decoder.want(), 0);
                this.filled = 0;
            }
            if !ready!(this.poll_fill(cx))? {
                return Poll::Ready(Err(this.decoder.torn().into()));
            }
            match this.decoder.push(&this.buf)? {
                Record::Chunk => this.served = Some(PAYLOAD_OFFSET),
                Record::Header(_) | Record::Length | Record::Committed => {
                    this.buf.clear();
                    this.filled = 0;
                }
            }
        }
    }
}

/// Checks a stored state (a memfd) from its start to its commit record without handing out
/// any byte, then rewinds it. `Ok(None)` means the file is empty: no state was left.
pub(crate) fn verify_file(file: &mut std::fs::File) -> Result<Option<Header>, StateError> {
    if file.metadata()?.len() == 0 {
        return Ok(None);
    }
    file.seek(SeekFrom::Start(0))?;
    let mut r = io::BufReader::with_capacity(1 << 20, &mut *file);
    let mut decoder = Decoder::new();
    let mut header = None;
    let mut record = Vec::new();
    while !decoder.is_done() {
        record.resize(decoder.want(), 0);
        match r.read_exact(&mut record) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(decoder.torn()),
            Err(e) => return Err(StateError::Io(e)),
        }
        if let Record::Header(h) = decoder.push(&record)? {
            header = Some(h);
        }
    }
    drop(r);
    file.seek(SeekFrom::Start(0))?;
    Ok(header)
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

    /// Feeds `bytes` to the decoder record by record, as both readers do.
    fn decode(bytes: &[u8]) -> Result<Vec<u8>, StateError> {
        let mut d = Decoder::new();
        let mut payload = Vec::new();
        let mut at = 0;
        while !d.is_done() {
            let want = d.want();
            let Some(record) = bytes.get(at..at + want) else {
                return Err(d.torn());
            };
            at += want;
            if d.push(record)? == Record::Chunk {
                payload.extend_from_slice(&record[PAYLOAD_OFFSET..]);
            }
        }
        Ok(payload)
    }

    #[tokio::test]
    async fn the_decoder_reads_what_the_writer_wrote() {
        let bytes = encode(b"abc", true).await;
        assert_eq!(decode(&bytes).unwrap(), b"abc");
        let mut d = Decoder::new();
        assert_eq!(d.want(), HEADER_LEN);
        assert_eq!(
            d.push(&bytes[..HEADER_LEN]).unwrap(),
            Record::Header(Header { generation: 1 })
        );
        assert_eq!(d.want(), 4);
        assert!(matches!(
            decode(&bytes[..bytes.len() - 1]),
            Err(StateError::Torn { received: 3 })
        ));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn runtime() -> tokio::runtime::Runtime {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime")
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            #[test]
            fn any_payload_round_trips(payload in proptest::collection::vec(any::<u8>(), 0..20_000)) {
                let bytes = runtime().block_on(encode(&payload, true));
                prop_assert_eq!(decode(&bytes).unwrap(), payload.clone());
                prop_assert_eq!(runtime().block_on(read_all(bytes)).unwrap(), payload);
            }

            #[test]
            fn a_truncated_or_damaged_state_is_never_handed_out(
                payload in proptest::collection::vec(any::<u8>(), 1..5_000),
                cut in any::<prop::sample::Index>(),
                flip in any::<prop::sample::Index>(),
                bit in 0u8..8,
            ) {
                let bytes = runtime().block_on(encode(&payload, true));
                let cut = cut.index(bytes.len());
                prop_assert!(decode(&bytes[..cut]).is_err());
                let mut damaged = bytes.clone();
                let at = flip.index(damaged.len());
                damaged[at] ^= 1 << bit;
                // Only the writer's generation is not checksummed: it names, it carries nothing.
                let in_generation = (12..HEADER_LEN).contains(&at);
                prop_assert_eq!(decode(&damaged).is_ok(), in_generation);
            }

            #[test]
            fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..4_096)) {
                let _ = decode(&bytes);
            }
        }
    }
}
