# l4proxy: `make test` runs every check CI runs.
CARGO ?= cargo

.PHONY: test fmt-check clippy unit-and-integration example build run

test: fmt-check clippy unit-and-integration example

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit-and-integration:
	$(CARGO) test --workspace

example:
	$(CARGO) run -q -p l4proxy --example connection_management_demo > /dev/null

build:
	$(CARGO) build --release -p l4proxy

run:
	$(CARGO) run --release -p l4proxy -- run --config examples/quickstart.yaml
