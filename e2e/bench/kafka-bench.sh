# Sourced by the benchmarks that need a Kafka broker and the release data plane (events.sh, commands.sh):
# fetches Kafka and builds the release binaries; lib.sh gives the work directory, its cleanup and the helpers.
# Expects ROOT and TARGET.
KAFKA="$ROOT/e2e/testenv/kafka.sh"
bash "$KAFKA" fetch
cargo build -q --release -p umw-dataplane --bin umw-dataplane
cargo build -q --release -p umw-e2e --bin umw-load
DP="$TARGET/release/umw-dataplane"
LOAD="$TARGET/release/umw-load"

# shellcheck source=lib.sh
. "$ROOT/e2e/bench/lib.sh"
