# Sourced by the benchmarks that need a Kafka broker and the release data plane (events.sh, commands.sh):
# fetches Kafka and builds the release binaries; lib.sh gives the work directory, its cleanup and the helpers.
# Expects ROOT and TARGET. DATAPLANE=path/to/umw-dataplane measures that build instead of this tree's (to
# compare with an older one on the same broker and machine).
KAFKA="$ROOT/e2e/testenv/kafka.sh"
bash "$KAFKA" fetch
[ -n "${DATAPLANE:-}" ] || cargo build -q --release -p umw-dataplane --bin umw-dataplane
cargo build -q --release -p umw-e2e --bin umw-load
DP="${DATAPLANE:-$TARGET/release/umw-dataplane}"
LOAD="$TARGET/release/umw-load"

# shellcheck source=lib.sh
. "$ROOT/e2e/bench/lib.sh"
