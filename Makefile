# Entry points. Every target that needs the machine prepared runs `setup` first (idempotent,
# seconds when already done). Run as root.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test chaos lint typecheck unit netns demo plugin plugin-forms bench clean vm-test vm-test-one vm-smoke image

setup:
	@bash scripts/setup.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# The layering contracts ([tool.importlinter] in pyproject.toml): which package may import
# which, the one kubernetes-client module per side, pure modules free of I/O, no cycles.
.PHONY: layers
layers: setup
	$(VENV)/bin/lint-imports

typecheck: setup
	$(VENV)/bin/mypy

# The whole suite: lint, types, every pytest marker but `vm` and `chaos`, then the vm smoke
# on two other kernels (the full other-kernel matrix is `make vm-test`: hours, see
# docs/kernels.md). The fault tests run here in their cheap size; `make chaos` runs them full.
test: setup build/istio-cni
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy
	bash scripts/pytest.sh -m "not vm and not chaos" $(PYTEST_ARGS)
	$(MAKE) --no-print-directory vm-smoke

# Faults survived and soak runs at full size (marker `chaos`; figures in docs/reliability.md,
# "Faults survived"): 200 pods, 30 s outages, long cycles. Tens of minutes on 2 busy cores.
chaos: setup build/istio-cni testbed-build
	bash scripts/pytest.sh -m chaos $(PYTEST_ARGS)

unit: setup
	bash scripts/pytest.sh -m "not netns and not vm and not testbed and not chaos" $(PYTEST_ARGS)

netns: setup
	bash scripts/pytest.sh -m "netns and not chaos" $(PYTEST_ARGS)

# Istio's ambient walkthrough with bookinfo on the testbed node, torn down at the end
# (testbed/demo.py). Other backends: make demo DEMO_ARGS='--backend ebpf' (or nftables).
demo: setup build/istio-cni
	$(PY) -m testbed.demo $(DEMO_ARGS)

# Every benchmark in docs/benchmarks.md, one after another (each prints its own figures as
# ratios against a baseline measured in the same run).
bench: bench-iptables bench-nftables bench-zds bench-ebpf bench-plugin bench-agent

.PHONY: bench-nftables bench-plugin
bench-nftables: setup
	$(PY) -m bench.nftables_install --samples 200
	$(PY) -m bench.nftables_install --samples 200 --ipv6

bench-plugin: setup build/istio-cni
	$(PY) -m bench.plugin_startup --runs 100
	$(PY) -m bench.plugin_ambient --pods 40

# Install time of the iptables backend's appliers (docs/benchmarks.md, "iptables appliers").
.PHONY: bench-iptables
bench-iptables: setup
	$(PY) -m bench.iptables_install --samples 200 --backend
	$(PY) -m bench.iptables_install --samples 200 --ipv4-only

# Host probe set: one batched sync of 1000 pods vs 1000 per-pod adds (docs/lifecycle.md).
.PHONY: bench-host-probe
bench-host-probe: setup
	$(PY) -m bench.host_probe_sync --pods 1000

# ZDS Add round trips and the ztunnel stand-in's proxy overhead (docs/benchmarks.md, "ZDS").
.PHONY: bench-zds
bench-zds: setup
	$(PY) -m bench.zds_bench --pods 50 --requests 300

# The self-contained CNI plugin executable the installer copies (no Python needed on the host).
# `plugin-forms` builds every candidate measured in docs/benchmarks.md.
PLUGIN_SOURCES := $(wildcard cni_plugin/*.py) cni_plugin/launcher.c scripts/plugin_bundle.py \
	scripts/build-plugin.sh
build/istio-cni: $(PLUGIN_SOURCES)
	bash scripts/build-plugin.sh bundled-cpython

plugin: setup build/istio-cni

# The istio-cni-node image as an OCI archive (testbed/agent_image.py): Debian packages of
# install/image/packages.txt by mmdebstrap from the machine's apt sources, the project's
# wheel, the plugin. Cached by its inputs' hash under /var/cache/istio-cni-testbed/agent-image;
# prints {ref, tarball, size_mb, seconds}. Import: ctr -n k8s.io images import <tarball>.
image: setup build/istio-cni
	$(PY) -m testbed.agent_image

plugin-forms: setup
	bash scripts/build-plugin.sh bundled-cpython nuitka-standalone nuitka-onefile pyinstaller-onefile pyinstaller-onedir zipapp

# Other kernels (docs/kernels.md): Debian's 6.1 and 6.12 booted under qemu TCG with virtme-ng,
# running the netns suite inside (tests/vm, marker vm); then the table of results in build/vm.
# Slow (CPU-bound): tens of minutes per kernel. One kernel: make vm-test-one KERNEL=6.12
# (a series, an exact release such as 6.12.117+deb12-amd64, or host). VM_PYTEST_ARGS replaces
# the default pytest selection (-m 'netns and not chaos') inside the guest; KERNEL_ARGS are added to the guest
# kernel's command line (e.g. KERNEL_ARGS=ipv6.disable=1; results in build/vm/<release>_<args>, = as -).
KERNEL ?= 6.1
VM_PYTEST_ARGS ?=
KERNEL_ARGS ?=
vm-test: setup
	bash scripts/pytest.sh -m vm tests/vm $(PYTEST_ARGS); rc=$$?; \
	$(PY) -m vagrant.run_kernels --report; exit $$rc

vm-test-one: setup
	$(PY) -m vagrant.run_kernels $(KERNEL) $(foreach a,$(KERNEL_ARGS),--kernel-arg $(a)) \
	    $(if $(VM_PYTEST_ARGS),-- $(VM_PYTEST_ARGS))

# CI-sized (part of `make test`): the behaviour table's core cases for every backend (12 tests)
# on Debian's 6.1 and 6.12 kernels; about 90 s per kernel on an idle machine.
VM_SMOKE := tests/behaviour -k "((remove_restores and default) or outbound-captured-ipv4 \
	or inbound-captured-ipv4) and not inbound-nat and not ingress"
vm-smoke: setup
	ICNI_VM_KERNELS='6.1 6.12' ICNI_VM_PYTEST_ARGS='$(VM_SMOKE)' \
	bash scripts/pytest.sh -m vm tests/vm -k netns_suite $(PYTEST_ARGS)

clean:
	rm -rf build .mypy_cache .ruff_cache .pytest_cache

# eBPF vs iptables redirection: per-pod install time and data path (docs/benchmarks.md).
.PHONY: bench-ebpf
bench-ebpf: setup
	$(PY) -m bench.ebpf_redirect --samples 100 --seconds 3 --requests 3000 --rounds 3

# Istio's own istio-cni plugin and install-cni agent (plus a driver of its in-pod rule code),
# built from the Go module proxy into /var/cache/istio-cni-testbed/istio-<version> (cold ~7 min
# on 2 busy cores, then a no-op). ISTIO_PEER_ARGS e.g. --version latest, --cold.
.PHONY: istio-peer bench-vs-istio
istio-peer: setup
	$(PY) -m bench.istio_peer $(ISTIO_PEER_ARGS)

# Istio's source (its istio-cni Helm chart, which tests/unit/test_chart_parity.py compares our
# chart with) in Go's module cache: `go mod download` of the same version, seconds.
.PHONY: istio-source
istio-source: setup
	$(PY) -m bench.istio_source

# Ours vs Istio's own istio-cni, side by side (docs/benchmarks.md, "Ours vs Istio's istio-cni").
bench-vs-istio: setup istio-peer build/istio-cni testbed-build
	$(PY) -m bench.vs_istio_rules --samples 200 --chart docs/img/vs-istio-rules.png
	$(PY) -m bench.vs_istio_plugin --runs 200 --chart docs/img/vs-istio-plugin.png
	$(PY) -m bench.vs_istio_agent --pods 200 --order ours,istio,istio,ours --chart-dir docs/img

# Istio's own agent -> ours -> Istio's on a live testbed node under traffic, then each
# plugin against the other's agent (docs/operations.md, "Migrating from Istio's istio-cni").
# The test asserts (zero failed requests, every pod adopted, no rule changed); the module
# prints the figures: $(PY) -m testbed.swap [--json FILE] [--order ours,ours,ours --no-cross].
.PHONY: swap
swap: setup istio-peer build/istio-cni testbed-build
	ICNI_SWAP=1 bash scripts/pytest.sh -m testbed tests/testbed/test_agent_swap.py -s $(PYTEST_ARGS)

# The single-node Kubernetes testbed (docs/testbed.md). `testbed-build` builds Kubernetes 1.36
# and etcd from the Go module proxy, cached under /var/cache/istio-cni-testbed (cold: tens of
# minutes on 2 busy cores, then under a second): run it before the suite so the `testbed`
# tests' timeouts only count bring-up. TESTBED_ARGS e.g. --mesh.
.PHONY: testbed-build testbed-up testbed-down testbed-test
testbed-build: setup
	$(VENV)/bin/istio-cni-testbed build

testbed-up: testbed-build
	$(VENV)/bin/istio-cni-testbed up $(TESTBED_ARGS)

testbed-down: setup
	$(VENV)/bin/istio-cni-testbed down

testbed-test: testbed-build
	bash scripts/pytest.sh -m "testbed and not chaos" tests/testbed $(PYTEST_ARGS)

# Node agent: label a namespace of 200 running pods -> all enrolled, and RSS at 1000 pods
# (light pods on the real testbed API server; docs/benchmarks.md, "Node agent").
.PHONY: bench-agent
bench-agent: testbed-build
	$(PY) -m bench.agent_enroll --pods 200 --rss-pods 1000 --workers 16
