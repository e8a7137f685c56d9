//! `examples/tls.rs` as real processes: a TLS 1.3 client that got a session ticket from one
//! generation resumes its session with the next one (the ticket keys crossed in the state), over
//! HTTP/1.1 and HTTP/2 (ALPN), with the rustls client and with `openssl s_client`.
//!
//! Every test has its own temporary directory and port, waits only with deadlines, and kills
//! the processes it started when it ends. Run with `cargo test --all-features --test tls`.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::cleanup::Cleanup;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, HandshakeKind, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Time for one connection, handshake and answer.
const IO: Duration = Duration::from_secs(10);

/// Accepts any certificate (the example's is self-signed), and remembers each one it saw.
#[derive(Debug)]
struct AnyCert {
    seen: Mutex<Vec<CertificateDer<'static>>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.push(end_entity.clone().into_owned());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS 1.3-only client offering `alpn`, with its own session store (tickets kept in memory).
fn client(alpn: &[u8]) -> (Arc<ClientConfig>, Arc<AnyCert>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(AnyCert {
        seen: Mutex::new(Vec::new()),
        provider: provider.clone(),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3 with ring")
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    (Arc::new(config), verifier)
}

/// What one connection saw: the service's answer line and the kind of handshake.
#[derive(Debug)]
struct Seen {
    answer: String,
    handshake: Option<HandshakeKind>,
}

impl Seen {
    fn field(&self, name: &str) -> &str {
        self.answer
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {name}= in {:?}", self.answer))
    }
}

/// One request on a new TLS connection, over the protocol the client offers by ALPN.
async fn get(config: &Arc<ClientConfig>, addr: SocketAddr) -> std::io::Result<Seen> {
    tokio::time::timeout(IO, async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = ServerName::try_from("localhost").expect("a DNS name");
        let tls = tokio_rustls::TlsConnector::from(config.clone())
            .connect(name, tcp)
            .await?;
        let (_, conn) = tls.get_ref();
        let handshake = conn.handshake_kind();
        let answer = if conn.alpn_protocol() == Some(b"h2") {
            http2_get(tls).await?
        } else {
            http1_get(tls).await?
        };
        Ok(Seen { answer, handshake })
    })
    .await
    .map_err(|_| std::io::Error::other("timed out"))?
}

async fn http1_get(
    mut tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> std::io::Result<String> {
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    // Reading to the end also processes the session tickets the server sent after the handshake.
    match tls.read_to_end(&mut response).await {
        Ok(_) => {}
        // A server that closes without close_notify: the answer is complete anyway.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
        Err(e) => return Err(e),
    }
    let text = String::from_utf8_lossy(&response);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    Ok(body.trim_end().to_owned())
}

async fn http2_get(
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> std::io::Result<String> {
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .map_err(std::io::Error::other)?;
    let conn = tokio::spawn(conn);
    let request = hyper::Request::get("https://localhost/")
        .body(Empty::<Bytes>::new())
        .expect("a request");
    let response = send
        .send_request(request)
        .await
        .map_err(std::io::Error::other)?;
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?;
    drop(send);
    conn.abort();
    Ok(String::from_utf8_lossy(&body.to_bytes())
        .trim_end()
        .to_owned())
}

/// Starts generation 0 of the example: its address and control socket.
fn start(cleanup: &Cleanup, extra: &[&Path]) -> (ChildGuard, SocketAddr, PathBuf) {
    let (addr, _) = free_addrs();
    let socket = cleanup.path().join("tls.sock");
    let mut cmd = Command::new(example("tls"));
    cmd.arg("--https")
        .arg(addr.to_string())
        .arg("--socket")
        .arg(&socket);
    for (flag, path) in ["--cert", "--key"].iter().zip(extra) {
        cmd.arg(flag).arg(path);
    }
    for var in PROTOCOL_VARS {
        cmd.env_remove(var);
    }
    let (stdout, stderr) = cleanup.output();
    cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
    (ChildGuard::spawn(&mut cmd), addr, socket)
}

/// `shellflip restart`: the new PID.
fn restart(socket: &Path) -> u32 {
    let out = shellflip_at(socket, &["restart"]);
    assert!(out.status.success(), "shellflip restart failed: {out:?}");
    out.stdout.trim().parse().expect("a PID")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_across_restarts() {
    let cleanup = Cleanup::new();
    let (mut gen0, addr, socket) = start(&cleanup, &[]);
    let (http1, certs) = client(b"http/1.1");
    let first = wait_until("the service to answer", DEADLINE, || {
        assert!(gen0.try_wait().expect("try_wait").is_none(), "it exited");
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(get(&http1, addr))
        })
        .ok()
    });
    assert_eq!(first.handshake, Some(HandshakeKind::Full), "{first:?}");
    assert_eq!(first.field("generation"), "0");
    assert_eq!(first.field("alpn"), "http/1.1");
    assert_eq!(first.field("resumed"), "false");
    // HTTP/2 by ALPN, on another client (its own sessions).
    let (http2, _) = client(b"h2");
    let h2 = get(&http2, addr).await.expect("an HTTP/2 request");
    assert_eq!(h2.field("alpn"), "h2", "{h2:?}");

    let mut pids = vec![gen0.id()];
    for generation in 1..=2 {
        let pid = restart(&socket);
        pids.push(pid);
        // The old generation stopped accepting before `shellflip restart` answered.
        for (client, alpn) in [(&http1, "http/1.1"), (&http2, "h2")] {
            let seen = get(client, addr)
                .await
                .expect("a request after the restart");
            assert_eq!(seen.field("pid"), pid.to_string(), "{seen:?}");
            assert_eq!(seen.field("generation"), generation.to_string());
            assert_eq!(seen.field("alpn"), alpn);
            assert_eq!(
                seen.handshake,
                Some(HandshakeKind::Resumed),
                "generation {generation} did not resume the session ({alpn}): {seen:?}"
            );
            assert_eq!(seen.field("resumed"), "true", "{seen:?}");
        }
        // A client without a session gets a full handshake, with the same certificate: the
        // self-signed one crossed in the state too.
        let (fresh, fresh_certs) = client(b"http/1.1");
        let seen = get(&fresh, addr).await.expect("a fresh client");
        assert_eq!(seen.handshake, Some(HandshakeKind::Full));
        let lock = |v: &Arc<AnyCert>| v.seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(
            lock(&fresh_certs),
            lock(&certs)[..1],
            "the certificate changed"
        );
    }
    // Each old generation drained and exited.
    let status = gen0.wait_timeout(DEADLINE).expect("generation 0 to exit");
    assert_eq!(status.code(), Some(0), "{}", describe(&status));
    wait_until("generation 1 to exit", DEADLINE, || {
        (!is_running(pids[1])).then_some(())
    });
}

/// The README's commands: `openssl s_client -sess_out`, a restart, `-sess_in` says "Reused".
/// With a certificate from files (`--cert`, `--key`), which every generation reads again.
#[test]
fn openssl_resumes_across_a_restart() {
    let Ok(openssl) = which("openssl") else {
        eprintln!("openssl is not installed: skipped");
        return;
    };
    let cleanup = Cleanup::new();
    let made = rcgen::generate_simple_self_signed(["localhost".to_owned()]).expect("a cert");
    let (cert, key) = (
        cleanup.path().join("cert.pem"),
        cleanup.path().join("key.pem"),
    );
    std::fs::write(&cert, made.cert.pem()).expect("write cert.pem");
    std::fs::write(&key, made.signing_key.serialize_pem()).expect("write key.pem");
    let (mut gen0, addr, socket) = start(&cleanup, &[&cert, &key]);
    let session = cleanup.path().join("session.pem");
    let s_client = |sess: &str| {
        let script = format!(
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | {} s_client -connect {addr} -tls1_3 -ign_eof {sess} {}",
            openssl.display(),
            session.display()
        );
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script);
        run(cmd, COMMAND_DEADLINE).all()
    };
    let first = wait_until("the service to answer", DEADLINE, || {
        assert!(gen0.try_wait().expect("try_wait").is_none(), "it exited");
        Some(s_client("-sess_out")).filter(|out| out.contains("generation=0"))
    });
    assert!(first.contains("New, TLSv1.3"), "{first}");
    assert!(session.exists(), "no session saved: {first}");
    let pid1 = restart(&socket);
    let second = s_client("-sess_in");
    assert!(second.contains(&format!("pid={pid1}")), "{second}");
    assert!(second.contains("Reused, TLSv1.3"), "{second}");
    assert!(second.contains("resumed=true"), "{second}");
}

fn which(program: &str) -> Result<PathBuf, ()> {
    let path = std::env::var_os("PATH").ok_or(())?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .ok_or(())
}
