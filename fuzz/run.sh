#!/usr/bin/env bash
# Builds every fuzz target and runs each for SECONDS (default 60), one after
# the other on one core, then prints executions, coverage and crashes per
# target. Exits non-zero if any target crashed, hung or ran out of memory.
#
#   fuzz/run.sh [SECONDS] [TARGET...]
#
# KILN_FUZZ_SANITIZER=address builds with AddressSanitizer (stable rustc with
# RUSTC_BOOTSTRAP=1, see ../../shared/ENVIRONMENT.md); the default is none.
# Inputs that grow coverage go to target/fuzz/corpus/TARGET (not committed);
# crashing inputs to target/fuzz/artifacts/TARGET/, to be minimized and
# committed under fuzz/regressions/TARGET/ once fixed (tests/replay.rs runs
# them). Extra libFuzzer flags can be given in KILN_FUZZ_FLAGS.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-60}
shift || true
case $secs in
  '' | *[!0-9]*) echo "usage: fuzz/run.sh [SECONDS] [TARGET...]" >&2; exit 2 ;;
esac

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz" >&2
  cargo install --locked cargo-fuzz >&2
fi

sanitizer=${KILN_FUZZ_SANITIZER:-none}
build=(cargo fuzz build --features libfuzzer --debug-assertions -s "$sanitizer")
if [ "$sanitizer" != none ]; then
  # The sanitizers need -Zsanitizer; this stable toolchain takes it with
  # RUSTC_BOOTSTRAP=1. A target directory of its own keeps the two builds.
  export RUSTC_BOOTSTRAP=1
  build+=(--target-dir target/fuzz-"$sanitizer")
  bin_dir=target/fuzz-$sanitizer/x86_64-unknown-linux-gnu/release
else
  bin_dir=target/x86_64-unknown-linux-gnu/release
fi

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi

echo "fuzz: building ${#targets[@]} targets (sanitizer: $sanitizer)" >&2
start=$SECONDS
"${build[@]}" >&2
echo "fuzz: built in $((SECONDS - start)) s" >&2

report=()
failed=0
for t in "${targets[@]}"; do
  corpus=target/fuzz/corpus/$t
  artifacts=target/fuzz/artifacts/$t
  log=target/fuzz/logs/$t.log
  mkdir -p "$corpus" "$artifacts" "$(dirname "$log")" fuzz/regressions/"$t"
  before=$(find "$artifacts" -type f | wc -l)
  echo "fuzz: $t for $secs s" >&2
  # -timeout: one input taking this long is a hang. -rss_limit_mb: the
  # outer memory bound (each target checks its own, far lower, cap).
  # shellcheck disable=SC2086
  status=0
  "$bin_dir/$t" "$corpus" fuzz/seeds/"$t" fuzz/regressions/"$t" \
    -max_total_time="$secs" -timeout=60 -rss_limit_mb=2048 -max_len=65536 \
    -print_final_stats=1 -artifact_prefix="$artifacts/" ${KILN_FUZZ_FLAGS:-} \
    >"$log" 2>&1 || status=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  last=$(grep -E '^#[0-9]+' "$log" | tail -n 1 || true)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  units=$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$last")
  new=$(($(find "$artifacts" -type f | wc -l) - before))
  crashes=$new
  if [ "$status" -ne 0 ] && [ "$new" -eq 0 ]; then
    crashes="exit $status"
  fi
  if [ "$status" -ne 0 ] || [ "$new" -ne 0 ]; then
    failed=1
    echo "fuzz: $t FAILED (log $log, inputs in $artifacts/):" >&2
    grep -E 'panicked at|ERROR: libFuzzer|SUMMARY|==[0-9]+==' "$log" | head -n 5 >&2 || true
  fi
  report+=("$(printf '%-10s %12s %7s %8s %7s  %s' "$t" "${execs:-?}" "${cov:-?}" "${ft:-?}" "${units:-?}" "$crashes")")
done

printf '%-10s %12s %7s %8s %7s  %s\n' target executions cov ft corpus crashes
printf '%s\n' "${report[@]}"
exit "$failed"
