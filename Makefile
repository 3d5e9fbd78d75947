# l4proxy: `make test` runs every check CI runs.
CARGO ?= cargo

.PHONY: test fmt-check clippy crd-check tools unit-and-integration example build run crds

test: fmt-check clippy crd-check unit-and-integration example

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# crds/ holds the CRD generated from the Rust types; a change to the types must regenerate it.
crd-check:
	@$(CARGO) run -q -p l4proxy-operator -- crd | diff -u crds/l4proxy.dev_l4proxies.yaml - \
		|| { echo "crds/ is out of date with the Rust types: run 'make crds' and commit the result" >&2; exit 1; }

crds:
	$(CARGO) run -q -p l4proxy-operator -- crd > crds/l4proxy.dev_l4proxies.yaml

# Builds (or reuses from the cache outside the repo) etcd, kube-apiserver, kubectl and helm.
tools:
	tools/build.sh

# Every tier: unit, proxy integration, and control-plane tests against a real kube-apiserver + etcd.
unit-and-integration:
	L4PROXY_TOOLS_BIN="$$(tools/build.sh | tail -n 1)" && export L4PROXY_TOOLS_BIN && $(CARGO) test --workspace

example:
	$(CARGO) run -q -p l4proxy --example connection_management_demo > /dev/null

build:
	$(CARGO) build --release -p l4proxy -p l4proxy-operator

run:
	$(CARGO) run --release -p l4proxy -- run --config examples/quickstart.yaml
