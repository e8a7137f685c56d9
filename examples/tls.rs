//! An HTTPS service (rustls, ALPN `h2` and `http/1.1`) whose TLS session-ticket keys cross to
//! the next generation in the state: a client that saved its session before a restart resumes
//! it with the new process. Every answer says `generation=N pid=P alpn=A resumed=R`.
//!
//! ```text
//! cargo run --release --features tls,hyper --example tls -- --https 127.0.0.1:8443 --socket /tmp/tls.sock
//! openssl s_client -connect 127.0.0.1:8443 -tls1_3 -sess_out /tmp/sess </dev/null   # New, TLSv1.3
//! shellflip restart --socket /tmp/tls.sock
//! openssl s_client -connect 127.0.0.1:8443 -tls1_3 -sess_in /tmp/sess </dev/null    # Reused, TLSv1.3
//! ```
//!
//! Without `--cert PEM --key PEM` generation 0 makes a self-signed certificate for `localhost`,
//! and it crosses in the state too. A certificate from files is read again by every generation:
//! renew it, then restart.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use shellflip::tls::TicketKeys;
use shellflip::{RestartConfig, ShutdownCoordinator, StateWriter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Cert = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// What crosses: the ticket keys, and the certificate when it was made here.
struct Tls(TicketKeys, Option<(Vec<u8>, Vec<u8>)>);

#[shellflip::async_trait]
impl shellflip::LifecycleHandler for Tls {
    async fn send_to_new_process(&mut self, mut state: StateWriter) -> std::io::Result<()> {
        self.0.write_to(&mut state).await?;
        for part in self.1.iter().flat_map(|(cert, key)| [cert, key]) {
            state.write_u32(part.len() as u32).await?; // a DER certificate or key: < 4 GiB
            state.write_all(part).await?;
        }
        Ok(())
    }
}

async fn read_part(state: &mut shellflip::StateReader) -> std::io::Result<Vec<u8>> {
    let mut part = vec![0; state.read_u32().await? as usize];
    state.read_exact(&mut part).await.map(|_| part)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: first thing in main, before any thread exists.
    unsafe { shellflip::init_from_env() }?;
    let exit_code = tokio::runtime::Runtime::new()?.block_on(serve())?;
    std::process::exit(exit_code)
}

async fn serve() -> Result<i32, Box<dyn std::error::Error>> {
    let (mut addr, mut socket) = ("127.0.0.1:8443".parse()?, "/tmp/tls.sock".into());
    let (mut cert_file, mut key_file) = (None::<String>, None::<String>);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next()) {
            ("--https", Some(v)) => addr = v.parse().map_err(|e| format!("{v}: {e}"))?,
            ("--socket", Some(v)) => socket = v.into(),
            ("--cert", Some(v)) => cert_file = Some(v),
            ("--key", Some(v)) => key_file = Some(v),
            _ => {
                return Err(
                    "usage: tls [--https ADDR] [--socket PATH] [--cert PEM --key PEM]".into(),
                );
            }
        }
    }
    let mut state = shellflip::receive_from_old_process();
    let keys = match &mut state {
        Some(state) => TicketKeys::read_from(state).await?,
        None => TicketKeys::generate()?,
    };
    let (cert, made): (Cert, _) = match (cert_file, key_file, &mut state) {
        (Some(c), Some(k), _) => {
            let chain = CertificateDer::pem_file_iter(&c)?.collect::<Result<_, _>>();
            let key = PrivateKeyDer::from_pem_file(&k).map_err(|e| format!("{k}: {e}"))?;
            ((chain.map_err(|e| format!("{c}: {e}"))?, key), None)
        }
        (None, None, Some(state)) => {
            let (cert, key) = (read_part(state).await?, read_part(state).await?);
            let parsed = (
                vec![cert.clone().into()],
                PrivateKeyDer::try_from(key.clone())?,
            );
            (parsed, Some((cert, key)))
        }
        (None, None, None) => {
            let made = rcgen::generate_simple_self_signed(["localhost".to_owned()])?;
            let (cert, key) = (made.cert.der().to_vec(), made.signing_key.serialize_der());
            let parsed = (
                vec![cert.clone().into()],
                PrivateKeyDer::try_from(key.clone())?,
            );
            (parsed, Some((cert, key)))
        }
        _ => return Err("--cert and --key go together".into()),
    };
    if let Some(mut state) = state {
        state.read_to_end(&mut Vec::new()).await?; // up to the commit: a torn state fails
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(cert.0, cert.1)?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tls.ticketer = Arc::new(keys.clone()); // resumption across generations
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

    let config = RestartConfig {
        enabled: true,
        coordination_socket_path: socket,
        lifecycle_handler: Box::new(Tls(keys, made)),
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::from_std(config.registry.tcp_listener("https", addr)?)?;
    let mut restart = config.try_into_restart_task()?; // its first poll declares readiness
    let shutdown = ShutdownCoordinator::new();
    let handover = loop {
        tokio::select! {
            conn = listener.accept() => {
                let Ok((tcp, _)) = conn else { continue }; // EMFILE, ...: try again
                let (acceptor, mut signal, handle) = (acceptor.clone(), shutdown.signal(), shutdown.handle());
                tokio::spawn(async move {
                    let accepted = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp));
                    let Ok(Ok(tls)) = accepted.await else { return };
                    let (_, conn) = tls.get_ref();
                    let h2 = conn.alpn_protocol() == Some(b"h2");
                    let answer = format!(
                        "generation={} pid={} alpn={} resumed={}\n",
                        shellflip::generation(),
                        std::process::id(),
                        if h2 { "h2" } else { "http/1.1" },
                        conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
                    );
                    let service = hyper::service::service_fn(move |_: Request<Incoming>| {
                        let body = Full::new(Bytes::from(answer.clone()));
                        async move { Ok::<_, std::convert::Infallible>(Response::new(body)) }
                    });
                    let io = TokioIo::new(tls);
                    if h2 {
                        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, service);
                        tokio::pin!(conn);
                        tokio::select! {
                            _ = conn.as_mut() => {}
                            _ = signal.on_shutdown() => {
                                conn.as_mut().graceful_shutdown(); // GOAWAY, then finish
                                let _ = conn.await;
                            }
                        }
                    } else {
                        let grace = Duration::from_secs(5); // next answer says Connection: close
                        let _ = shellflip::http::serve_connection(io, service, signal, grace).await;
                    }
                    drop(handle);
                });
            }
            handover = &mut restart => break handover?,
        }
    };
    drop(listener); // stop accepting: the new process accepts on the same socket
    handover.accepting_stopped(); // only now does `shellflip restart` hear the new PID
    shutdown
        .shutdown_with_timeout(Duration::from_secs(10))
        .await;
    Ok(handover.exit_code())
}
