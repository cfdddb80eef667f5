# Two commands: `make demo` and `make test`. Both create or refresh .venv from the
# project's own files first (pinned constraints, torch==2.13.0 CPU, data packages --no-deps).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.clp-installed
DEMO_OUT ?= bench-out/demo

ASSETS := src/clpdecode/assets/drafters/SmolLM2-135M-Instruct

.PHONY: setup demo test gemma peers heads heads-gemma heads-independent corpus clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt requirements-assets.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check -c constraints.txt torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	$(PIP) install -q --disable-pip-version-check --no-deps -r requirements-assets.txt
	touch $(STAMP)

# The main job on the embedded backbone, with the defaults a new user gets (numerics auto =
# q4 on the GGUF's own blocks; the first run builds the CPU kernels, ~1 min): a short benchmark
# of every method on MT-Bench prompts, then one answer streamed with the head-emitted tokens
# highlighted.
demo: setup
	$(VENV)/bin/clp bench --model embedded --prompts mtbench --limit 4 --max-new-tokens 64 --out $(DEMO_OUT)
	@echo
	@echo "One answer with --method verified (identical to AR); head-emitted tokens in cyan:"
	$(VENV)/bin/clp generate --model embedded --method verified --max-new-tokens 96 \
		--color always --prompt "Give me three tips for staying focused while studying."
	@echo "full report: $(DEMO_OUT)/report.md"

# Lint first (pyflakes, pycodestyle errors, import order; pyproject.toml's [tool.ruff]), then the suite.
test: setup
	$(VENV)/bin/ruff check src tests scripts
	$(PY) -m pytest

# Opt-in: the second real backbone (Gemma 3 270M, 253 MB in four chunks).
gemma: setup
	$(PIP) install -q --disable-pip-version-check --no-deps -r requirements-gemma.txt

# Opt-in: llama.cpp, timed by `clp bench --hf-generate` and `clp bench-serve --peers` as a peer
# on the very GGUF file the embedded backbone comes from, twice: in process (llama-cpp-python,
# built from source: about 10 min on 2 cores) and as llama.cpp's own server, llama-server,
# built from the llama.cpp sources inside the same llama-cpp-python sdist (downloaded with pip,
# unpacked under build/peers; about 20 min on 2 cores). The bench finds it there, or at
# $CLP_LLAMA_SERVER, or on PATH. Needs cmake and a C++ compiler.
# Both are built for this machine's instruction sets, named one by one from /proc/cpuinfo
# (GGML_CPU_ARGS), not with GGML_NATIVE=ON: on AMX Xeons that build dies with SIGILL
# (`tilezero` in tinygemm_kernel_amx) on its first decode. Each is kept only once it has
# decoded a few tokens of the embedded GGUF (PEERS_CHECK); one kept from an earlier build is
# checked again, and rebuilt when it fails.
LLAMA_CPP_VERSION := 0.3.36
PEERS_WORK := build/peers
LLAMA_SDIST := $(PEERS_WORK)/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
LLAMA_CPP_SRC := $(PEERS_WORK)/llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp
LLAMA_SERVER := $(LLAMA_CPP_SRC)/build/bin/llama-server
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
GGML_CPU_ARGS = $(shell $(PY) -m clpdecode.evaluation.cpu --ggml-cmake-args)
PEERS_CHECK = $(PY) -m clpdecode.evaluation.peers
peers: setup
	$(PEERS_CHECK) --check-server $(LLAMA_SERVER) || { rm -f $(LLAMA_SERVER) && $(MAKE) --no-print-directory $(LLAMA_SERVER); }
	# --force-reinstall --no-cache-dir: a wheel built earlier (or cached by pip) for other flags is not reused
	$(PEERS_CHECK) --check-llama-cpp || { \
		CMAKE_ARGS="$(GGML_CPU_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$(JOBS) $(PIP) install -q --disable-pip-version-check --force-reinstall --no-deps \
			--no-cache-dir $(LLAMA_SDIST) \
		&& $(PIP) install -q --disable-pip-version-check -c constraints.txt llama-cpp-python==$(LLAMA_CPP_VERSION) \
		&& $(PEERS_CHECK) --check-llama-cpp \
		|| { $(PIP) uninstall -q -y llama-cpp-python; \
			echo "make peers: llama-cpp-python, built for this CPU (GGML_CPU_ARGS), does not decode here: removed" >&2; exit 1; }; }
	# convert_hf_to_gguf.py (our EAGLE-3 drafter for llama-server's draft-eagle3 row) needs it
	$(PIP) install -q --disable-pip-version-check -c constraints.txt sentencepiece

$(LLAMA_SDIST): | $(STAMP)
	mkdir -p $(PEERS_WORK)
	$(PIP) download -q --disable-pip-version-check --no-deps --no-binary :all: -d $(PEERS_WORK) \
		llama-cpp-python==$(LLAMA_CPP_VERSION)

$(LLAMA_SERVER): $(LLAMA_SDIST)
	test -d $(LLAMA_CPP_SRC) || tar -xzf $(LLAMA_SDIST) -C $(PEERS_WORK)
	cd $(LLAMA_CPP_SRC) && cmake -B build $(GGML_CPU_ARGS) -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
		-DLLAMA_BUILD_EXAMPLES=OFF -DCMAKE_BUILD_TYPE=Release && cmake --build build --target llama-server -j$(JOBS)
	$(PEERS_CHECK) --check-server $@ || { rm -f $@; \
		echo "make peers: llama-server, built for this CPU (GGML_CPU_ARGS), does not decode here: removed" >&2; exit 1; }

# The shipped drafter's design (the chain, k = 4) trained on this CPU through the package's one
# training path, `clp train` (rerun to resume: checkpoints every 25 steps in $(HEADS_WORK)).
# It writes $(HEADS_WORK)/chain-k4 (use it with --heads), not the shipped folders (the package's
# files are read-only input): the shipped chain came from one H200 run (README, "Training the
# drafter", gives its recipe as `clp train` flags), and $(HEADS_STEPS) steps here (~9 s each on
# 2 cores: 2.5 h) see ~1M positions against its 22M (docs/design.md, "Ablations on CPU"). The
# learning rate's cosine spans the steps; `--minutes` would stop it early.
# HEADS_ARGS: more `clp train` flags, e.g. "--device cuda --batch-sequences 32" on a GPU.
HEADS_WORK ?= build/heads
HEADS_STEPS ?= 1000
HEADS_ARGS ?=
heads: setup
	$(VENV)/bin/clp train --design chain --k 4 --steps $(HEADS_STEPS) --threads $(JOBS) \
		--out $(HEADS_WORK)/chain-k4 --work $(HEADS_WORK)/chain-k4-work $(HEADS_ARGS)

# The same for Gemma 3 270M (a base model), with one thread (rerun to resume): 1. its greedy
# 64-token continuations of 1,024 ShareGPT-answer passages (`clp distill` copies the committed
# corpus, assets/corpus/gemma-3-270m, into the cache and answers only what it lacks: nothing);
# 2. a k = 2 chain of the shipped design (a 1024-wide MLP) on those and the training split's
# answers read as plain text, then CLP, gates and the competing heads, into
# $(GEMMA_WORK)/chain-k2 (README, "Gemma 3 270M's drafter").
GEMMA_WORK ?= build/heads-gemma
GEMMA_STEPS ?= 150
GEMMA_ARGS ?=
GEMMA_ENV := OMP_NUM_THREADS=1
heads-gemma: gemma
	$(GEMMA_ENV) $(VENV)/bin/clp distill --model gemma3-270m --threads 1 --prompt-set passages --prompts 1024 \
		--batch-size 64 --max-new-tokens 64 --corpus-only
	$(GEMMA_ENV) $(VENV)/bin/clp train --model gemma3-270m --design chain --k 2 --chain-mlp 1024 \
		--steps $(GEMMA_STEPS) --threads 1 --max-len 272 --out $(GEMMA_WORK)/chain-k2 \
		--work $(GEMMA_WORK)/chain-k2-work $(GEMMA_ARGS)

# The independent heads (the baseline shipped as independent-k2/-k4), about 45 min, into
# $(INDEPENDENT_WORK) (the shipped folders are read-only input; use these with --heads).
INDEPENDENT_WORK ?= build/heads-independent
heads-independent: setup
	$(VENV)/bin/clp distill --teacher-forced 1000
	$(VENV)/bin/clp train --design fused --k 2 --steps 2000 --competing-steps 1000 --out $(INDEPENDENT_WORK)/independent-k2
	$(VENV)/bin/clp train --design fused --k 4 --steps 2000 --competing-steps 1000 --out $(INDEPENDENT_WORK)/independent-k4

# Extend the committed token-id corpus (it resumes): the committed one is the first 24
# batches (768 prompts, shortest first) of this command, ~45 answer tokens/s on 2 cores.
# `clp distill` copies it into the cache (<cache>/corpus/<backbone>) and extends the copy there;
# `clp train` and `clp distill` read that copy from then on.
corpus: setup
	$(VENV)/bin/clp distill --prompts 3000

clean:
	rm -rf $(VENV) bench-out .pytest_cache
