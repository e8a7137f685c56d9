//! TLS session resumption across restarts (feature `tls`, for rustls).
//!
//! A TLS server encrypts the session tickets it gives its clients with keys only it knows. The
//! keys of rustls's own ticketers are random and live in the process: after a restart the new
//! generation cannot read the tickets the old one issued, and every returning client pays a full
//! handshake. [`TicketKeys`] is a ticketer ([`rustls::server::ProducesTickets`]) whose keys are
//! made once, in generation 0, and cross to every later generation in the state, so that a
//! client resumes its session with whichever generation answers it.
//!
//! The keys still rotate, as rustls's do: time is cut into periods (6 hours by default), each
//! period's key is derived from the previous one's by a one-way function (HKDF-SHA256), and a
//! ticket is accepted during the period it was issued in and the next. Every generation computes
//! the same key for the same period, so the rotation needs no coordination, and a key that was
//! replaced cannot be recomputed from the ones kept: tickets older than two periods cannot be
//! decrypted by anyone, which bounds what a stolen key reveals (forward secrecy).
//!
//! Tickets are encrypted with AES-256-GCM (`ring`). The state carries the current and previous
//! secret: keep it where only the service can read it (the fork/exec lifecycle streams it
//! through a pipe; the systemd lifecycle keeps it in a memfd in the service's file descriptor
//! store).
//!
//! ```
//! use shellflip::tls::TicketKeys;
//! use std::sync::Arc;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Generation 0 makes the keys; later generations read them from the state.
//! let keys = match shellflip::receive_from_old_process() {
//!     Some(mut state) => TicketKeys::read_from(&mut state).await?,
//!     None => TicketKeys::generate()?,
//! };
//! # let (cert, key) = { let c = rcgen::generate_simple_self_signed(["localhost".to_owned()])?;
//! #     (c.cert.der().clone(), rustls::pki_types::PrivateKeyDer::Pkcs8(c.signing_key.serialize_der().into())) };
//! let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
//!     rustls::crypto::ring::default_provider(),
//! ))
//! .with_safe_default_protocol_versions()?
//! .with_no_client_auth()
//! .with_single_cert(vec![cert], key)?;
//! config.ticketer = Arc::new(keys.clone());
//! // In LifecycleHandler::send_to_new_process: keys.write_to(&mut state).await
//! # Ok(()) }
//! ```

use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf::{HKDF_SHA256, Prk};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Length of a period's secret, and of the AES-256 key derived from it.
const SECRET_LEN: usize = 32;
/// Length of the key name that starts every ticket: it says which period's key encrypted it.
const NAME_LEN: usize = 16;
/// Length of the AES-GCM tag that ends every ticket.
const TAG_LEN: usize = 16;
/// Serialized form: magic, version, period, epoch, current secret, flag, previous secret.
const MAGIC: &[u8; 4] = b"SFTK";
const VERSION: u8 = 1;
const SERIALIZED_LEN: usize = 4 + 1 + 8 + 8 + SECRET_LEN + 1 + SECRET_LEN;
/// The longest rotation period accepted: the lifetime rustls announces is a `u32` of seconds,
/// and TLS 1.3 caps ticket lifetimes at 7 days (RFC 8446 §4.6.1).
const MAX_PERIOD: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// Why ticket keys could not be made or read.
///
/// # Examples
///
/// ```
/// use shellflip::tls::{TicketKeys, TicketKeysError};
///
/// match TicketKeys::from_bytes(b"torn") {
///     Err(TicketKeysError::Malformed(why)) => eprintln!("starting with new keys: {why}"),
///     Err(e) => eprintln!("{e}"),
///     Ok(_) => unreachable!(),
/// }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TicketKeysError {
    /// The system's random number generator failed.
    #[error("the system's random number generator failed")]
    Random,
    /// The rotation period is zero, not a whole number of seconds, or longer than 7 days.
    #[error("ticket key rotation period {0:?}: must be whole seconds, from 1 s to 7 days")]
    Period(Duration),
    /// Bytes that are not ticket keys written by [`TicketKeys::to_bytes`].
    #[error("not ticket keys: {0}")]
    Malformed(&'static str),
}

impl From<TicketKeysError> for io::Error {
    fn from(e: TicketKeysError) -> io::Error {
        let kind = match e {
            TicketKeysError::Malformed(_) => io::ErrorKind::InvalidData,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

/// Session-ticket keys that cross restarts in the state: a rustls ticketer
/// ([`rustls::server::ProducesTickets`]) whose tickets every generation can decrypt.
///
/// Make them once with [`generate`](Self::generate), write them into the state with
/// [`write_to`](Self::write_to) and read them back in the next generation with
/// [`read_from`](Self::read_from); give a clone to the `ServerConfig`
/// (`config.ticketer = Arc::new(keys.clone())`). Clones share the keys. See the
/// [module documentation](self) for the rotation.
///
/// # Examples
///
/// ```
/// use rustls::server::ProducesTickets;
/// use shellflip::tls::TicketKeys;
///
/// # fn main() -> Result<(), shellflip::tls::TicketKeysError> {
/// let keys = TicketKeys::generate()?;
/// let ticket = keys.encrypt(b"session").expect("a ticket");
/// // What the next generation reads from the state decrypts it.
/// let next = TicketKeys::from_bytes(&keys.to_bytes())?;
/// assert_eq!(next.decrypt(&ticket).as_deref(), Some(&b"session"[..]));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TicketKeys {
    ratchet: Arc<Mutex<Ratchet>>,
    rng: SystemRandom,
}

impl fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ratchet = self.lock();
        f.debug_struct("TicketKeys")
            .field("period", &Duration::from_secs(ratchet.period))
            .field("epoch", &ratchet.current.epoch)
            .finish_non_exhaustive()
    }
}

impl TicketKeys {
    /// How often keys rotate by default, as rustls's own ticketer does.
    pub const DEFAULT_ROTATION: Duration = Duration::from_secs(6 * 60 * 60);

    /// New random keys rotating every [`DEFAULT_ROTATION`](Self::DEFAULT_ROTATION).
    ///
    /// # Examples
    ///
    /// ```
    /// let keys = shellflip::tls::TicketKeys::generate()?;
    /// assert_eq!(keys.rotation_period(), shellflip::tls::TicketKeys::DEFAULT_ROTATION);
    /// # Ok::<(), shellflip::tls::TicketKeysError>(())
    /// ```
    pub fn generate() -> Result<TicketKeys, TicketKeysError> {
        Self::generate_rotating_every(Self::DEFAULT_ROTATION)
    }

    /// New random keys rotating every `period` (whole seconds, from 1 s to 7 days). A ticket is
    /// accepted for at least `period` after it was issued, and at most twice that.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// let keys = shellflip::tls::TicketKeys::generate_rotating_every(Duration::from_secs(3600))?;
    /// assert_eq!(keys.rotation_period(), Duration::from_secs(3600));
    /// # Ok::<(), shellflip::tls::TicketKeysError>(())
    /// ```
    pub fn generate_rotating_every(period: Duration) -> Result<TicketKeys, TicketKeysError> {
        let period_secs = check_period(period)?;
        let rng = SystemRandom::new();
        let mut secret = [0; SECRET_LEN];
        rng.fill(&mut secret).map_err(|_| TicketKeysError::Random)?;
        let epoch = now_secs() / period_secs;
        Ok(TicketKeys {
            ratchet: Arc::new(Mutex::new(Ratchet {
                period: period_secs,
                current: Epoch::new(epoch, secret),
                previous: None,
            })),
            rng,
        })
    }

    /// How often the keys rotate.
    ///
    /// # Examples
    ///
    /// ```
    /// let keys = shellflip::tls::TicketKeys::generate()?;
    /// println!("tickets live {:?}", keys.rotation_period());
    /// # Ok::<(), shellflip::tls::TicketKeysError>(())
    /// ```
    pub fn rotation_period(&self) -> Duration {
        Duration::from_secs(self.lock().period)
    }

    /// The keys as bytes, for the state: the rotation period and the current and previous
    /// periods' secrets (86 bytes). Anyone who reads them can decrypt the tickets of these two
    /// periods.
    ///
    /// # Examples
    ///
    /// ```
    /// let keys = shellflip::tls::TicketKeys::generate()?;
    /// let copy = shellflip::tls::TicketKeys::from_bytes(&keys.to_bytes())?;
    /// assert_eq!(copy.to_bytes(), keys.to_bytes());
    /// # Ok::<(), shellflip::tls::TicketKeysError>(())
    /// ```
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut ratchet = self.lock();
        ratchet.advance(now_secs());
        let mut out = Vec::with_capacity(SERIALIZED_LEN);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&ratchet.period.to_be_bytes());
        out.extend_from_slice(&ratchet.current.epoch.to_be_bytes());
        out.extend_from_slice(&ratchet.current.secret);
        match &ratchet.previous {
            Some(previous) => {
                out.push(1);
                out.extend_from_slice(&previous.secret);
            }
            None => {
                out.push(0);
                out.extend_from_slice(&[0; SECRET_LEN]);
            }
        }
        out
    }

    /// Keys written by [`to_bytes`](Self::to_bytes), in this process or another.
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(shellflip::tls::TicketKeys::from_bytes(b"not keys").is_err());
    /// ```
    pub fn from_bytes(bytes: &[u8]) -> Result<TicketKeys, TicketKeysError> {
        use TicketKeysError::Malformed;
        if bytes.len() != SERIALIZED_LEN {
            return Err(Malformed("wrong length"));
        }
        let (magic, rest) = bytes.split_at(4);
        if magic != MAGIC {
            return Err(Malformed("wrong magic"));
        }
        let (version, rest) = rest.split_at(1);
        if version[0] != VERSION {
            return Err(Malformed("unknown version"));
        }
        let (period, rest) = rest.split_at(8);
        let (epoch, rest) = rest.split_at(8);
        let (current, rest) = rest.split_at(SECRET_LEN);
        let (flag, previous) = rest.split_at(1);
        let u64_of = |b: &[u8]| b.try_into().map(u64::from_be_bytes);
        let secret_of = |b: &[u8]| -> Result<[u8; SECRET_LEN], TicketKeysError> {
            b.try_into().map_err(|_| Malformed("short secret"))
        };
        let period = u64_of(period).map_err(|_| Malformed("short period"))?;
        let epoch = u64_of(epoch).map_err(|_| Malformed("short epoch"))?;
        let period = check_period(Duration::from_secs(period))
            .map_err(|_| Malformed("rotation period out of range"))?;
        let previous = match flag[0] {
            0 => None,
            1 if epoch > 0 => Some(Epoch::new(epoch - 1, secret_of(previous)?)),
            _ => return Err(Malformed("bad previous-key flag")),
        };
        let mut ratchet = Ratchet {
            period,
            current: Epoch::new(epoch, secret_of(current)?),
            previous,
        };
        ratchet.advance(now_secs());
        Ok(TicketKeys {
            ratchet: Arc::new(Mutex::new(ratchet)),
            rng: SystemRandom::new(),
        })
    }

    /// Writes the keys into `state` (the [`StateWriter`](crate::StateWriter) given to
    /// [`LifecycleHandler::send_to_new_process`](crate::LifecycleHandler::send_to_new_process)),
    /// length-prefixed, for [`read_from`](Self::read_from).
    ///
    /// # Examples
    ///
    /// ```
    /// use shellflip::tls::TicketKeys;
    ///
    /// struct Handler(TicketKeys);
    ///
    /// #[shellflip::async_trait]
    /// impl shellflip::LifecycleHandler for Handler {
    ///     async fn send_to_new_process(&mut self, mut state: shellflip::StateWriter) -> std::io::Result<()> {
    ///         self.0.write_to(&mut state).await
    ///     }
    /// }
    /// ```
    pub async fn write_to<W: AsyncWrite + Unpin + ?Sized>(&self, state: &mut W) -> io::Result<()> {
        let bytes = self.to_bytes();
        // SERIALIZED_LEN: a constant that fits.
        state.write_u32(bytes.len() as u32).await?;
        state.write_all(&bytes).await
    }

    /// Reads keys written by [`write_to`](Self::write_to) from `state` (the
    /// [`StateReader`](crate::StateReader) that
    /// [`receive_from_old_process`](crate::receive_from_old_process) returned).
    ///
    /// # Examples
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// use shellflip::tls::TicketKeys;
    ///
    /// let keys = match shellflip::receive_from_old_process() {
    ///     Some(mut state) => TicketKeys::read_from(&mut state).await?,
    ///     None => TicketKeys::generate()?,
    /// };
    /// # Ok(()) }
    /// ```
    pub async fn read_from<R: AsyncRead + Unpin + ?Sized>(state: &mut R) -> io::Result<TicketKeys> {
        let len = state.read_u32().await?;
        if len as usize != SERIALIZED_LEN {
            return Err(TicketKeysError::Malformed("wrong length").into());
        }
        let mut bytes = [0; SERIALIZED_LEN];
        state.read_exact(&mut bytes).await?;
        Ok(Self::from_bytes(&bytes)?)
    }

    fn lock(&self) -> MutexGuard<'_, Ratchet> {
        self.ratchet.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn encrypt_at(&self, now: u64, plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut ratchet = self.lock();
        ratchet.advance(now);
        let key = &ratchet.current;
        let mut ticket = Vec::with_capacity(NAME_LEN + NONCE_LEN + plain.len() + TAG_LEN);
        ticket.extend_from_slice(&key.name);
        ticket.extend_from_slice(&nonce);
        ticket.extend_from_slice(plain);
        let (head, body) = ticket.split_at_mut(NAME_LEN + NONCE_LEN);
        let tag = key
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&head[..NAME_LEN]),
                body,
            )
            .ok()?;
        ticket.extend_from_slice(tag.as_ref());
        Some(ticket)
    }

    fn decrypt_at(&self, now: u64, ticket: &[u8]) -> Option<Vec<u8>> {
        if ticket.len() < NAME_LEN + NONCE_LEN + TAG_LEN {
            return None;
        }
        let (name, rest) = ticket.split_at(NAME_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut ratchet = self.lock();
        ratchet.advance(now);
        // Key names are public (they are in every ticket): comparing them in variable time
        // reveals nothing.
        let key = [Some(&ratchet.current), ratchet.previous.as_ref()]
            .into_iter()
            .flatten()
            .find(|k| k.name == name)?;
        let mut buffer = sealed.to_vec();
        let plain_len = key
            .aead
            .open_in_place(nonce, Aad::from(name), &mut buffer)
            .ok()?
            .len();
        buffer.truncate(plain_len);
        Some(buffer)
    }
}

impl rustls::server::ProducesTickets for TicketKeys {
    fn enabled(&self) -> bool {
        true
    }

    /// The rotation period: a ticket is accepted at least that long.
    fn lifetime(&self) -> u32 {
        u32::try_from(self.lock().period).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.encrypt_at(now_secs(), plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.decrypt_at(now_secs(), cipher)
    }
}

/// The keys of the current period and of the previous one.
struct Ratchet {
    /// Seconds.
    period: u64,
    current: Epoch,
    previous: Option<Epoch>,
}

impl Ratchet {
    /// Moves to the period `now` (seconds since the Unix epoch) falls in: every generation that
    /// holds the same keys reaches the same ones. A clock that went back keeps the keys.
    fn advance(&mut self, now: u64) {
        let target = now / self.period;
        if target <= self.current.epoch {
            return;
        }
        if target - self.current.epoch > 2 {
            // Both keys kept would be too old to use: step to just before the target, keeping
            // nothing from on the way (each step is one HKDF).
            while self.current.epoch + 1 < target {
                self.current = self.current.next();
            }
        }
        while self.current.epoch < target {
            let next = self.current.next();
            self.previous = Some(std::mem::replace(&mut self.current, next));
        }
    }
}

/// One period's secret, and the key name and AEAD key derived from it.
struct Epoch {
    epoch: u64,
    secret: [u8; SECRET_LEN],
    name: [u8; NAME_LEN],
    aead: LessSafeKey,
}

impl Epoch {
    fn new(epoch: u64, secret: [u8; SECRET_LEN]) -> Epoch {
        let prk = Prk::new_less_safe(HKDF_SHA256, &secret);
        let mut name = [0; NAME_LEN];
        let mut key = [0; SECRET_LEN];
        expand(&prk, b"shellflip ticket key name", &mut name);
        expand(&prk, b"shellflip ticket key", &mut key);
        let aead = match UnboundKey::new(&AES_256_GCM, &key) {
            Ok(k) => LessSafeKey::new(k),
            // The key has the algorithm's length by construction.
            Err(_) => unreachable!("a 32-byte key is an AES-256 key"),
        };
        Epoch {
            epoch,
            secret,
            name,
            aead,
        }
    }

    /// The next period's keys: a one-way step, so this period's secret cannot be recomputed
    /// from the next one's.
    fn next(&self) -> Epoch {
        let prk = Prk::new_less_safe(HKDF_SHA256, &self.secret);
        let mut secret = [0; SECRET_LEN];
        expand(&prk, b"shellflip ticket key ratchet", &mut secret);
        Epoch::new(self.epoch.saturating_add(1), secret)
    }
}

/// HKDF-Expand into `out`; `out` is short enough for SHA-256 (at most 255 × 32 bytes).
fn expand(prk: &Prk, info: &[u8], out: &mut [u8]) {
    struct Len(usize);
    impl ring::hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let info = [info];
    let filled = prk
        .expand(&info, Len(out.len()))
        .and_then(|okm| okm.fill(out));
    if filled.is_err() {
        unreachable!(
            "HKDF-SHA256 expands to at most 8160 bytes; asked for {}",
            out.len()
        );
    }
}

fn check_period(period: Duration) -> Result<u64, TicketKeysError> {
    if period.is_zero() || period.subsec_nanos() != 0 || period > MAX_PERIOD {
        return Err(TicketKeysError::Period(period));
    }
    Ok(period.as_secs())
}

/// Seconds since the Unix epoch; 0 for a clock set before it.
fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;

    const HOUR: u64 = 3600;

    fn keys_at(now: u64) -> TicketKeys {
        let keys = TicketKeys::generate_rotating_every(Duration::from_secs(HOUR)).unwrap();
        let mut r = keys.lock();
        let secret = r.current.secret;
        *r = Ratchet {
            period: HOUR,
            current: Epoch::new(now / HOUR, secret),
            previous: None,
        };
        drop(r);
        keys
    }

    /// What the next generation would read, without moving to the real clock's period.
    fn copy(keys: &TicketKeys) -> TicketKeys {
        let r = keys.lock();
        TicketKeys {
            ratchet: Arc::new(Mutex::new(Ratchet {
                period: r.period,
                current: Epoch::new(r.current.epoch, r.current.secret),
                previous: r.previous.as_ref().map(|p| Epoch::new(p.epoch, p.secret)),
            })),
            rng: SystemRandom::new(),
        }
    }

    #[test]
    fn a_ticket_round_trips_and_a_tampered_one_does_not() {
        let keys = TicketKeys::generate().unwrap();
        let ticket = keys.encrypt(b"hello").unwrap();
        assert_eq!(keys.decrypt(&ticket).unwrap(), b"hello");
        for i in 0..ticket.len() {
            let mut bad = ticket.clone();
            bad[i] ^= 1;
            assert_eq!(keys.decrypt(&bad), None, "byte {i} flipped");
        }
        assert_eq!(keys.decrypt(&ticket[..ticket.len() - 1]), None);
        assert_eq!(keys.decrypt(&[]), None);
        assert!(keys.enabled());
        assert_eq!(keys.lifetime(), 6 * 3600);
    }

    #[test]
    fn other_keys_cannot_decrypt() {
        let a = TicketKeys::generate().unwrap();
        let b = TicketKeys::generate().unwrap();
        assert_ne!(a.to_bytes(), b.to_bytes());
        assert_eq!(b.decrypt(&a.encrypt(b"x").unwrap()), None);
    }

    #[test]
    fn serialized_keys_decrypt_the_originals_tickets() {
        let keys = TicketKeys::generate().unwrap();
        let ticket = keys.encrypt(b"session").unwrap();
        let next = TicketKeys::from_bytes(&keys.to_bytes()).unwrap();
        assert_eq!(next.decrypt(&ticket).unwrap(), b"session");
        let back = next.encrypt(b"later").unwrap();
        assert_eq!(keys.decrypt(&back).unwrap(), b"later");
    }

    #[test]
    fn tickets_live_one_to_two_periods_and_copies_rotate_alike() {
        let t0 = 1_000 * HOUR + 10;
        let keys = keys_at(t0);
        let ticket = keys.encrypt_at(t0, b"s").unwrap();
        let twin = copy(&keys);
        // Same period, the next one: accepted, by the original and by the copy alike.
        assert_eq!(keys.decrypt_at(t0 + HOUR - 11, &ticket).unwrap(), b"s");
        assert_eq!(twin.decrypt_at(t0 + HOUR, &ticket).unwrap(), b"s");
        assert_eq!(keys.decrypt_at(t0 + HOUR, &ticket).unwrap(), b"s");
        // Issued in the next period by one, read by the other.
        let later = keys.encrypt_at(t0 + HOUR, b"t").unwrap();
        assert_eq!(twin.decrypt_at(t0 + HOUR, &later).unwrap(), b"t");
        // Two periods on: the first ticket is gone, for both.
        assert_eq!(keys.decrypt_at(t0 + 2 * HOUR, &ticket), None);
        assert_eq!(twin.decrypt_at(t0 + 2 * HOUR, &ticket), None);
        assert_eq!(twin.decrypt_at(t0 + 2 * HOUR, &later).unwrap(), b"t");
        // A clock that goes back keeps the keys.
        assert_eq!(twin.decrypt_at(t0, &later).unwrap(), b"t");
    }

    #[test]
    fn a_long_jump_rotates_like_single_steps() {
        let t0 = 50 * HOUR;
        let jumper = keys_at(t0);
        let stepper = copy(&jumper);
        for h in 1..=10 {
            stepper.lock().advance(t0 + h * HOUR);
        }
        jumper.lock().advance(t0 + 10 * HOUR);
        let (a, b) = (jumper.lock(), stepper.lock());
        assert_eq!(a.current.secret, b.current.secret);
        assert_eq!(a.current.epoch, b.current.epoch);
        let prev = |r: &Ratchet| r.previous.as_ref().map(|p| (p.epoch, p.secret));
        assert_eq!(prev(&a), prev(&b));
    }

    #[test]
    fn malformed_bytes_and_periods_are_refused() {
        let good = TicketKeys::generate().unwrap().to_bytes();
        assert!(TicketKeys::from_bytes(&good[1..]).is_err());
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(TicketKeys::from_bytes(&bad).is_err());
        let mut bad = good.clone();
        bad[4] = 2;
        assert!(TicketKeys::from_bytes(&bad).is_err());
        let mut bad = good.clone();
        bad[5..13].copy_from_slice(&0u64.to_be_bytes());
        assert!(TicketKeys::from_bytes(&bad).is_err());
        let mut bad = good;
        bad[4 + 1 + 16 + SECRET_LEN] = 7;
        assert!(TicketKeys::from_bytes(&bad).is_err());
        for p in [0, 8 * 24 * 3600] {
            assert!(TicketKeys::generate_rotating_every(Duration::from_secs(p)).is_err());
        }
        assert!(TicketKeys::generate_rotating_every(Duration::from_millis(1500)).is_err());
    }

    #[tokio::test]
    async fn write_to_and_read_from_a_stream() {
        let keys = TicketKeys::generate().unwrap();
        let mut buf = Vec::new();
        keys.write_to(&mut buf).await.unwrap();
        buf.extend_from_slice(b"rest");
        let mut reader = &buf[..];
        let read = TicketKeys::read_from(&mut reader).await.unwrap();
        assert_eq!(read.to_bytes(), keys.to_bytes());
        assert_eq!(reader, b"rest");
        let mut short = &buf[..10];
        assert!(TicketKeys::read_from(&mut short).await.is_err());
    }
}
