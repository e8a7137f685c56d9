//! Benchmarks of shellflip: failed requests under load across restarts, the same against its
//! peers, restart latency against the floor of starting a process, how the cost grows, state
//! throughput, and the idle cost. See `BENCHMARKS.md` at the repository root.
//!
//! The driver is `src/main.rs` (`cargo run --release -p shellflip-bench -- <name>`); the
//! services under test besides the example are the binaries in `src/bin/`.

pub mod env;
pub mod h2load;
pub mod idle;
pub mod latency;
pub mod load;
pub mod loadgen;
pub mod proc;
pub mod rollback;
pub mod scaling;
pub mod sdunit;
pub mod state;
pub mod stats;
pub mod svc;
pub mod svg;
