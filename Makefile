# l4proxy: `make test` runs every check CI runs.
CARGO ?= cargo

.PHONY: test shellcheck e2e e2e-if-able fmt-check clippy crd-check chart-check tools unit-and-integration example demo-check demo demo-down build run crds \
	images image-archives

test: fmt-check clippy crd-check chart-check shellcheck unit-and-integration example demo-check e2e-if-able

# The kind script runs where CI cannot (Docker): it is at least checked here, with the e2e driver.
shellcheck:
	shellcheck -x tests/kind/e2e.sh tests/e2e/run tests/cluster/up tests/cluster/down tests/cluster/load-image tests/cluster/lib.sh tools/build-node.sh

# The end-to-end tier: a real node on this machine (tests/cluster), the images built here, the
# suite in tests/e2e, the node removed after. `make test` runs it where the machine allows
# (root, network namespaces) and says loudly why it skipped it elsewhere.
e2e:
	tests/e2e/run

e2e-if-able:
	tests/e2e/run --if-able

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
	cp crds/l4proxy.dev_l4proxies.yaml charts/l4proxy/crds/l4proxy.dev_l4proxies.yaml

# The chart installs the generated CRD (a copy: Helm reads only files inside the chart), lints
# clean with --strict, renders its optional parts, and refuses a misspelt value (its schema).
# helm comes from tools/build.sh (or PATH, when KUBEBUILDER_ASSETS provides the rest).
chart-check:
	@diff -u crds/l4proxy.dev_l4proxies.yaml charts/l4proxy/crds/l4proxy.dev_l4proxies.yaml \
		|| { echo "charts/l4proxy/crds/ is out of date with crds/: run 'make crds' and commit the result" >&2; exit 1; }
	@helm="$$(tools/build.sh | tail -n 1)/helm" && { [ -x "$$helm" ] || helm=helm; } \
		&& "$$helm" lint --strict charts/l4proxy \
		&& "$$helm" lint --strict charts/l4proxy --set replicas=1 --set webhook.url=https://127.0.0.1:9443 \
			--set watchNamespace=shop --set serviceMonitor.enabled=true --set networkPolicy.enabled=true \
		&& if "$$helm" template charts/l4proxy --set webhook.failurPolicy=Fail > /dev/null 2>&1; then \
			echo "charts/l4proxy: a misspelt value was accepted (values.schema.json)" >&2; exit 1; fi

# Builds (or reuses from the cache outside the repo) etcd, kube-apiserver, kubectl and helm.
tools:
	tools/build.sh

# Every tier: unit, proxy integration, and control-plane tests against a real kube-apiserver + etcd
# (the operator's control-loop tests run real l4proxy processes: the debug binary, built first).
unit-and-integration:
	$(CARGO) build -q -p l4proxy --bin l4proxy
	L4PROXY_TOOLS_BIN="$$(tools/build.sh | tail -n 1)" && export L4PROXY_TOOLS_BIN \
		&& L4PROXY_BIN="$$($(CARGO) metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug/l4proxy" \
		&& export L4PROXY_BIN && $(CARGO) test --workspace

example:
	$(CARGO) run -q -p l4proxy --example connection_management_demo > /dev/null

# The control loop on this machine: local control plane, operator, one proxy, traffic, status.
demo:
	tests/demo/up

demo-down:
	tests/demo/down

# The demo, run through and stopped (what `make test` checks of it).
demo-check:
	L4PROXY_DEMO_DIR="$${TMPDIR:-/tmp}/l4proxy-demo-check" tests/demo/up --check

build:
	$(CARGO) build --release -p l4proxy -p l4proxy-operator

run:
	$(CARGO) run --release -p l4proxy -- run --config examples/quickstart.yaml

# Container images, daemonless (buildah; no Docker engine): static musl release binaries, then
# images/Containerfile.host around them, tagged localhost/l4proxy:$(IMAGE_TAG) and
# localhost/l4proxy-operator:$(IMAGE_TAG). Heavy (a release build): not part of `make test`.
# With Docker, images/Containerfile builds the same images from source instead.
MUSL_TARGET := x86_64-unknown-linux-musl
IMAGE_TAG ?= dev
# The cargo profile of the binaries in the images (tests/e2e/run uses `e2e`: faster to build).
IMAGE_PROFILE ?= release
BUILDAH ?= buildah
IMAGES := l4proxy l4proxy-operator l4proxy-echo
# Where cargo builds (CARGO_TARGET_DIR may put it outside the repo, as .ci/run does).
TARGET_DIR = $(shell $(CARGO) metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')

images:
	rustup target list --installed | grep -qx $(MUSL_TARGET) || rustup target add $(MUSL_TARGET)
	$(CARGO) build --profile $(IMAGE_PROFILE) --target $(MUSL_TARGET) -p l4proxy -p l4proxy-operator -p l4proxy-echo
	for image in $(IMAGES); do \
		$(BUILDAH) build --quiet -f images/Containerfile.host --target $$image -t localhost/$$image:$(IMAGE_TAG) \
			$(TARGET_DIR)/$(MUSL_TARGET)/$(IMAGE_PROFILE) || exit 1; \
	done

# The images as docker-archive tarballs in $(TARGET_DIR)/images/ (for `ctr images import` on a node).
image-archives: images
	mkdir -p $(TARGET_DIR)/images
	for image in $(IMAGES); do \
		rm -f $(TARGET_DIR)/images/$$image.tar; \
		$(BUILDAH) push --quiet localhost/$$image:$(IMAGE_TAG) \
			docker-archive:$(TARGET_DIR)/images/$$image.tar:localhost/$$image:$(IMAGE_TAG) || exit 1; \
	done
