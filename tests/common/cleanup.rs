//! A test's temporary directory, whose processes are killed when the test ends.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// Kills every process whose command line names the directory, when dropped (after a failed
/// assertion too); prints the log when the test failed.
pub struct Cleanup {
    dir: tempfile::TempDir,
    pub log: PathBuf,
}

impl Cleanup {
    pub fn new() -> Cleanup {
        let dir = super::test_dir();
        let log = dir.path().join("stderr.log");
        Cleanup { dir, log }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Output for a process: stdout and stderr appended to the log.
    pub fn output(&self) -> (Stdio, Stdio) {
        let open = || {
            File::options()
                .create(true)
                .append(true)
                .open(&self.log)
                .expect("log file")
        };
        (Stdio::from(open()), Stdio::from(open()))
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- log ----\n{}---- end of log ----", self.log_text());
        }
        super::kill_processes_naming(self.dir.path());
    }
}
