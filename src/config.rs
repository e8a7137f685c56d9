//! The restart's settings.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use tokio::signal::unix::SignalKind;

use crate::lifecycle::{LifecycleHandler, NullLifecycleHandler};
use crate::registry::Registry;

/// Settings for restarts. Build it with struct update syntax over `Default`:
///
/// ```
/// use shellflip::RestartConfig;
/// use std::time::Duration;
///
/// let config = RestartConfig {
///     enabled: true,
///     coordination_socket_path: "/run/my-service.sock".into(),
///     startup_timeout: Duration::from_secs(10),
///     ..Default::default()
/// };
/// ```
pub struct RestartConfig {
    /// Enables the control socket at [`coordination_socket_path`](Self::coordination_socket_path).
    pub enabled: bool,
    /// Where the control socket is bound (in the first generation; later ones inherit it, and
    /// bind it again if its file was removed). At most 107 bytes. The generation serving it
    /// holds an exclusive `flock` on `<path>.lock`, next to it.
    pub coordination_socket_path: PathBuf,
    /// Mode of the control socket file (default `0o600`); a directory created for it gets
    /// search permission for whom this mode lets in.
    pub socket_mode: u32,
    /// Users besides this process's own and root allowed on the control socket.
    pub allowed_uids: Vec<u32>,
    /// Extra environment variables for the new process.
    pub environment: Vec<(OsString, OsString)>,
    /// Hooks and the state writer.
    pub lifecycle_handler: Box<dyn LifecycleHandler>,
    /// When true, a failed restart resolves the restart task with the error instead of
    /// carrying on (default false: the old process keeps serving).
    pub exit_on_error: bool,
    /// The signal that triggers a restart (default SIGUSR1).
    pub restart_signal: SignalKind,
    /// How long a new process has to become ready before it is killed (default 60 s).
    pub startup_timeout: Duration,
    /// Fork/exec lifecycle: how long a new process stays on probation after it declared
    /// itself ready (default zero: none). During it the old process no longer accepts but keeps
    /// its listeners, state and control socket; if the new process exits, is killed or reports
    /// itself unhealthy ([`report_unhealthy`](crate::report_unhealthy)), the old one resumes
    /// (see [`Handover::confirmed`](crate::Handover::confirmed)) and the restart is reported as
    /// rolled back. The initiator is answered when the probation is over.
    pub probation: Duration,
    /// The program to start; by default the path this process was started from, made absolute
    /// at start-up (so a binary replaced on disk is the one that starts).
    pub executable: Option<PathBuf>,
    /// The named descriptors that cross to the next generation.
    pub registry: Registry,
    /// A file that names the serving generation's PID, for scripts and managers that read one
    /// (`PIDFile=`, `kill -USR1 $(cat ...)`): written by each generation once it is ready (and
    /// again by the old one after a rollback), replaced atomically. Left in place when the
    /// service stops. Default: none.
    pub pid_file: Option<PathBuf>,
    /// Systemd lifecycle: the exit status of a restart asked for on the control socket or by the
    /// restart signal; list it in the unit's `RestartForceExitStatus=` (default 75).
    pub systemd_restart_exit_code: i32,
}

impl Default for RestartConfig {
    fn default() -> Self {
        RestartConfig {
            enabled: false,
            coordination_socket_path: PathBuf::new(),
            socket_mode: 0o600,
            allowed_uids: Vec::new(),
            environment: Vec::new(),
            lifecycle_handler: Box::new(NullLifecycleHandler),
            exit_on_error: false,
            restart_signal: SignalKind::user_defined1(),
            startup_timeout: Duration::from_secs(60),
            probation: Duration::ZERO,
            executable: None,
            registry: Registry::new(),
            pid_file: None,
            systemd_restart_exit_code: 75,
        }
    }
}

impl std::fmt::Debug for RestartConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestartConfig")
            .field("enabled", &self.enabled)
            .field("coordination_socket_path", &self.coordination_socket_path)
            .field("startup_timeout", &self.startup_timeout)
            .field("probation", &self.probation)
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}
