#!/usr/bin/env bash
# Fuzzes the parsers that read what another process wrote, with cargo fuzz (libFuzzer):
#
#   scripts/fuzz.sh                     every target, 600 s each
#   scripts/fuzz.sh state 60            one target, 60 s
#   scripts/fuzz.sh all 300 -jobs=2     extra arguments go to libFuzzer
#
# Targets (fuzz/fuzz_targets/, entry points in src/fuzzing.rs):
#   control_frames  the control socket's frames: the client's reader and the server's request handling
#   environment     the inherited-descriptor environment (SHELLFLIP_*, LISTEN_*) and the readiness line
#   state           the state framing: decoder, stream reader, stored-state verifier, writer
#
# The corpus grows in fuzz/corpus/<target>/ (only the seed-* files are committed); a crash is
# saved in fuzz/artifacts/<target>/ and replayed with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/artifacts/<target>/<file>
# Builds go to fuzz/target, or to $CARGO_TARGET_DIR when it is set. cargo fuzz needs nightly
# flags: on a stable toolchain they are allowed with RUSTC_BOOTSTRAP=1. Targets are built with
# debug assertions and overflow checks, and with AddressSanitizer except `state` (see below;
# FUZZ_SANITIZER=address|none chooses for all). The fuzzer runs under `nice`, so that it can
# share the machine. At the end libFuzzer prints its statistics (executions, coverage).
set -euo pipefail
cd "$(dirname "$0")/.."

TARGETS=(control_frames environment state)
target="${1:-all}"
seconds="${2:-600}"
shift $(($# > 2 ? 2 : $#))

case "$target" in
  all) selected=("${TARGETS[@]}") ;;
  control_frames | environment | state) selected=("$target") ;;
  *)
    echo "usage: $0 [all|control_frames|environment|state] [SECONDS] [LIBFUZZER ARGS...]" >&2
    exit 2
    ;;
esac

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi
if ! rustc --version | grep -q nightly; then
  export RUSTC_BOOTSTRAP=1
fi

failed=()
for t in "${selected[@]}"; do
  args=(-max_total_time="$seconds" -print_final_stats=1)
  # Frames go up to 64 KiB: long enough inputs for an answer that echoes a frame to outgrow it.
  [ "$t" = control_frames ] && args+=(-max_len=16384)
  # The state readers allocate 1 MiB buffers per run, which AddressSanitizer makes about ten
  # times slower; that code is safe Rust, so it runs without a sanitizer by default.
  sanitizer="${FUZZ_SANITIZER:-$([ "$t" = state ] && echo none || echo address)}"
  mkdir -p "fuzz/corpus/$t"
  echo "== fuzzing $t for ${seconds}s" >&2
  if ! nice -n 19 cargo fuzz run --sanitizer "$sanitizer" "$t" "fuzz/corpus/$t" -- "${args[@]}" "$@"; then
    failed+=("$t")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "crashes or errors in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
echo "no crash in: ${selected[*]}" >&2
