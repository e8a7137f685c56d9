//! Zero-downtime restarts for long-running network services.
//!
//! A service built on shellflip replaces itself — with a new binary, or the same binary and a
//! new configuration — without refusing a connection and without losing its state, in one of
//! two lifecycles:
//!
//! * **Fork/exec handover.** The running process starts its successor itself
//!   ([`RestartConfig::try_into_restart_task`]), hands it the listening sockets of its
//!   [`Registry`] and a stream of state, and waits until the successor declares itself ready.
//!   Only then does it stop accepting and drain. If the successor crashes, reports a failure,
//!   or is not ready within the start-up timeout, it is killed and reaped, the initiator is told
//!   why, and the old process carries on: its listeners were never closed.
//! * **systemd's file descriptor store.** systemd stops the old process and starts the new one
//!   ([`RestartConfig::try_into_systemd_restart_task`]). The listeners, a memfd holding the
//!   state and any descriptor the service chooses (a connection) wait in systemd's store; the
//!   new process takes them back by name. Connections arriving in between wait in the kernel's
//!   backlog. A restart asked for on the control socket is first validated by running the new
//!   executable against the written state.
//!
//! Both lifecycles share the registry of named descriptors, the framed and checksummed state,
//! the control socket and the [`ShutdownCoordinator`].
//!
//! # Fork/exec example
//!
//! ```no_run
//! use shellflip::{RestartConfig, ShutdownCoordinator};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! struct State(u64);
//!
//! #[shellflip::async_trait]
//! impl shellflip::LifecycleHandler for State {
//!     async fn send_to_new_process(&mut self, mut w: shellflip::StateWriter) -> std::io::Result<()> {
//!         w.write_u64(self.0).await
//!     }
//! }
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // SAFETY: no other thread exists yet.
//!     unsafe { shellflip::init_from_env() }?;
//!     tokio::runtime::Runtime::new()?.block_on(serve())
//! }
//!
//! async fn serve() -> Result<(), Box<dyn std::error::Error>> {
//!     // The state from the previous generation, if any.
//!     let requests = match shellflip::receive_from_old_process() {
//!         Some(mut r) => r.read_u64().await?,
//!         None => 0,
//!     };
//!     let config = RestartConfig {
//!         enabled: true,
//!         coordination_socket_path: "/tmp/my-service.sock".into(),
//!         lifecycle_handler: Box::new(State(requests)),
//!         ..Default::default()
//!     };
//!     // Inherited from the previous generation, or bound now.
//!     let listener = config.registry.tcp_listener("http", "127.0.0.1:8080".parse()?)?;
//!     let listener = tokio::net::TcpListener::from_std(listener)?;
//!     let mut restart = config.try_into_restart_task()?; // polled below: declares readiness
//!     let shutdown = ShutdownCoordinator::new();
//!     loop {
//!         tokio::select! {
//!             conn = listener.accept() => {
//!                 let (_socket, _) = conn?;
//!                 let _handle = shutdown.handle(); // hold it while serving the connection
//!             }
//!             handover = &mut restart => {
//!                 let handover = handover?;
//!                 drop(listener); // stop accepting: the new generation accepts now
//!                 handover.accepting_stopped(); // the initiator hears the new PID now
//!                 shutdown.shutdown_with_timeout(std::time::Duration::from_secs(30)).await;
//!                 std::process::exit(handover.exit_code());
//!             }
//!         }
//!     }
//! }
//! ```
//!
//! # systemd example
//!
//! The same service in the systemd lifecycle differs in one call: `try_into_systemd_restart_task`
//! instead of `try_into_restart_task`, and a unit such as `examples/systemd/restarter.service`
//! (`Type=notify`, `FileDescriptorStoreMax=`, `StartLimitIntervalSec=0`,
//! `RestartForceExitStatus=75`). `systemctl restart` then keeps listeners and state, and the
//! control socket's restart is validated before the old process exits.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let config = shellflip::RestartConfig::default();
//! let state = shellflip::receive_from_old_process(); // read it before the task starts
//! let listener = config.registry.tcp_listener("http", "127.0.0.1:8080".parse()?)?;
//! let restart = config.try_into_systemd_restart_task()?;
//! # Ok(()) }
//! ```
//!
//! # With `#[tokio::main]` and frameworks
//!
//! `#[tokio::main]` works: the runtime's threads exist before `main`'s body runs, so skip
//! [`init_from_env`] there (the library reads its variables on first use and never passes them
//! to a process it starts itself; only programs you start with `std::process::Command` would
//! still see them, harmlessly). A framework that takes a shutdown future gets
//! [`RestartTask::restart_or_terminate`]: it resolves on a restart or on SIGTERM, and declares
//! readiness when first polled. A task that is never polled never declares readiness: the
//! library warns about it after a few seconds.
//!
//! ```no_run
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let config = shellflip::RestartConfig::default();
//!     let listener = config.registry.tcp_listener("http", "127.0.0.1:8080".parse()?)?;
//!     let listener = tokio::net::TcpListener::from_std(listener)?;
//!     let mut restart = config.try_into_restart_task()?;
//!     let stop = tokio::select! {
//!         stop = restart.restart_or_terminate() => stop?,
//!         _ = async { loop { let _ = listener.accept().await; } } => unreachable!(),
//!     };
//!     drop(listener);
//!     if let shellflip::Stop::Restart(handover) = &stop {
//!         handover.accepting_stopped();
//!     }
//!     // ... drain
//!     Ok(())
//! }
//! ```
//!
//! The state is a snapshot taken when the old generation writes it: what that generation
//! changes afterwards (it still serves while it drains) does not cross. Carry such changes
//! another way, or stop changing them once [`LifecycleHandler::send_to_new_process`] ran.
//!
//! # Restart thread
//!
//! Successors are started by a thread created with the restart task, with `posix_spawn`: if the
//! service later drops privileges or installs a seccomp filter, create the task first.
//!
//! # Observability
//!
//! Each restart reports its phases (requested, successor spawned, state sent, ready or failed)
//! through [`tracing`] with the time each took; [`control::Status`] reports the last outcome.

#![deny(missing_docs)]

#[cfg(not(target_os = "linux"))]
compile_error!(
    "shellflip supports Linux only: it relies on pidfds, memfds, F_SETPIPE_SZ and systemd's \
     file descriptor store"
);

#[cfg(feature = "axum")]
pub mod axum;
mod bag;
#[cfg(feature = "client-retry")]
pub mod client;
mod config;
pub mod control;
mod fork_exec;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(feature = "grpc")]
pub mod grpc;
#[cfg(feature = "hyper")]
pub mod http;
mod inherit;
pub mod lifecycle;
mod listen;
mod notify;
mod outcome;
mod readiness;
mod registry;
mod restart;
pub mod shutdown;
mod state;
mod successor;
mod systemd;
#[cfg(feature = "tls")]
pub mod tls;
mod transport;

/// Re-exported so that [`LifecycleHandler`] can be implemented without adding a dependency:
/// write `#[shellflip::async_trait]` on the `impl`.
pub use async_trait::async_trait;
pub use config::RestartConfig;
pub use control::{
    Attempt, AttemptOutcome, LastRestart, LifecycleKind, Probation, RestartCoordinationSocket,
    Status,
};
pub use inherit::{InheritError, Origin, generation, init_from_env, is_validation_run, origin};
pub use lifecycle::{
    LifecycleHandler, NullLifecycleHandler, PipeReader, PipeWriter, receive_from_old_process,
    try_receive_from_old_process, try_receive_from_old_process_within,
};
pub use listen::{Configure, ListenOptions};
pub use outcome::{
    ExitStatus, Handover, ProbationFailure, RestartError, SetupError, SuccessorFailure,
};
pub use readiness::{report_startup_failure, report_unhealthy, startup_complete};
pub use registry::{Kind, Registry, RegistryError};
pub use restart::{RestartHandle, RestartTask, Stop};
pub use shutdown::{ShutdownCoordinator, ShutdownHandle, ShutdownSignal};
pub use state::{StateError, StateReader, StateWriter};

/// The README's code samples, compiled as doctests so that they stay true (with every feature,
/// as CI runs them: the framework sections need `axum` and `client-retry`).
#[cfg(all(doctest, feature = "axum", feature = "client-retry"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
