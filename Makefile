# Universal Middleware: the few entry points. `make help` lists them.
SHELL := bash
CARGO ?= cargo

.PHONY: help run dev test testenv images build lint crds bench bench-gateway bench-tls bench-cache bench-events bench-commands clean-testenv

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

run: ## The data plane alone on examples/shop/ with a demo upstream: http://127.0.0.1:8080/products
	$(CARGO) build -p umw-dataplane --bin umw-dataplane --example demo-upstream
	bash dataplane/run-local.sh

# NODE=real: a real kubelet on containerd runs the images (make images), and the chart installs the operator.
NODE ?= process

dev: build $(if $(filter real,$(NODE)),images) ## Local control plane, operator, data-plane pods, examples/shop/ applied (NODE=real: on a real kubelet, from the images)
	UMW_DEV_NODE=$(NODE) bash e2e/testenv/dev.sh

test: testenv lint build images ## Everything: formatting, lints, unit tests, CRD drift, e2e against a real control plane and a real node
	bash e2e/testenv/cargo-test.sh

testenv: ## Build (once, cached) the control plane, kubelet, CoreDNS, kubectl and helm; fetch Apache Kafka from Maven Central; install the Debian packages the tests use and the test OpenID provider (npm ci)
	bash e2e/testenv/packages.sh
	bash e2e/testenv/build-tools.sh
	bash e2e/testenv/kafka.sh fetch
	bash e2e/testenv/idp.sh

images: ## Build both images from their Dockerfiles with buildah (base images made from Debian packages; cached)
	bash e2e/testenv/packages.sh
	bash e2e/testenv/images.sh build

build: ## Build the binaries (and the demo upstream)
	$(CARGO) build --workspace --bins --examples

lint: ## cargo fmt --check and clippy with warnings denied (helm lint runs in the e2e tests)
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

crds: ## Regenerate crds/manifests, charts/umw/crds, charts/umw/values.schema.json and docs/crds.md from the Rust types
	$(CARGO) run -q -p umw-operator -- crds > crds/manifests/crds.yaml
	cp crds/manifests/crds.yaml charts/umw/crds/crds.yaml
	$(CARGO) run -q -p umw-operator -- values-schema > charts/umw/values.schema.json
	$(CARGO) run -q -p umw-operator -- crd-reference > docs/crds.md

bench: build testenv ## Operator benchmark: 200 Middlewares (see docs/benchmarks.md)
	bash e2e/bench/operator.sh

bench-gateway: ## Data plane vs nginx as a reverse proxy (see docs/benchmarks.md; needs nginx and wrk)
	bash e2e/bench/gateway.sh

bench-tls: ## HTTPS termination vs nginx with ssl: keep-alive requests/s and new handshakes/s (see docs/benchmarks.md)
	bash e2e/bench/tls.sh

bench-cache: ## Cache hits vs nginx proxy_cache, and the thundering herd (see docs/benchmarks.md)
	bash e2e/bench/cache.sh

bench-events: ## HTTP ingest into Kafka vs Kafka's producer perf tool, and consumer → webhook (see docs/benchmarks.md)
	bash e2e/bench/events.sh

bench-commands: ## Commands through the outbox vs plain inserts of the same rows, and commit-to-Kafka latency (see docs/benchmarks.md)
	bash e2e/bench/commands.sh

clean-testenv: ## Remove the cached test tools
	rm -rf "$${XDG_CACHE_HOME:-$$HOME/.cache}/umw-testenv"
