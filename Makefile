# make demo: set up, compile the bundled example model, generate text.
# make test: set up, run the whole test suite.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# A CPU build of torch, pinned: a bare `torch` requirement can pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
STAMP   = $(VENV)/.installed
ARTIFACT = out/tiny-moe
PROMPT ?= The secret of a happy life is

.PHONY: venv test demo perplexity compile-example fuzz runtime-check kernel-check clean

$(STAMP): pyproject.toml setup.py $(wildcard runtime/native/*.c runtime/native/*.h)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[compile,dev,serve]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Compiling the example takes seconds, so every target compiles afresh with the current compiler.
compile-example: $(STAMP)
	$(BIN)/fate-compile examples/tiny-moe -o $(ARTIFACT) --bits 4 --force

demo: compile-example
	$(BIN)/fate-inspect $(ARTIFACT)
	$(BIN)/fate-run $(ARTIFACT) --prompt "$(PROMPT)" --max-new-tokens 60 --temperature 0.8 --top-p 0.95 --seed 1 \
		--memory-budget 50%

# Held-out perplexity: INT4 and float32 artifacts against transformers in float32.
perplexity: compile-example
	$(BIN)/fate-compile examples/tiny-moe -o out/tiny-moe-fp32 --bits 32 --dense-bits 32 --force -q
	$(BIN)/python examples/perplexity.py examples/tiny-moe $(ARTIFACT) out/tiny-moe-fp32

# Longer fuzzing than make test does: the manifest and archive readers, and every family on
# randomized configs against transformers (FUZZ_SEEDS per family; a failure names its seed), and hostile
# config.json values for every family (600 / 6 examples each).
FUZZ_SEEDS ?= 25
fuzz: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_hostile.py -k fuzz --fuzz-examples 5000
	$(BIN)/python -m pytest -q tests/test_fuzz_parity.py --fuzz-seeds $(FUZZ_SEEDS) --fuzz-examples 600

# The expert kernel without Python: every kernel of this CPU against portable C, and the aarch64
# build (NEON) under qemu-user when the cross tools are here (Debian: gcc-aarch64-linux-gnu qemu-user).
kernel-check:
	mkdir -p build
	cc -O2 -std=c11 -Wall -pthread tests/native/kernel_check.c runtime/native/kernel.c -lm -o build/kernel_check
	build/kernel_check
	if command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null; then \
		aarch64-linux-gnu-gcc -O2 -std=c11 -Wall -pthread -static tests/native/kernel_check.c runtime/native/kernel.c \
			-lm -o build/kernel_check_aarch64 && qemu-aarch64 build/kernel_check_aarch64; \
	else echo "kernel-check: no aarch64 cross compiler or qemu-aarch64; NEON not checked"; fi

# The runtime alone (no torch, no transformers) in a fresh environment runs a packed artifact.
RUNTIME_VENV ?= .venv-runtime
runtime-check: compile-example
	rm -rf $(RUNTIME_VENV)
	$(PYTHON) -m venv $(RUNTIME_VENV)
	$(RUNTIME_VENV)/bin/pip install -q --upgrade pip
	$(RUNTIME_VENV)/bin/pip install -q .
	$(BIN)/fate-pack $(ARTIFACT) -o out/tiny-moe.fate --force
	$(RUNTIME_VENV)/bin/fate-verify out/tiny-moe.fate
	$(RUNTIME_VENV)/bin/python -c "from fate.runtime import native; print('native expert kernel:', native.kernel_name())"
	$(RUNTIME_VENV)/bin/fate-run out/tiny-moe.fate --prompt "$(PROMPT)" --max-new-tokens 24 --greedy --memory-budget 50%
	$(RUNTIME_VENV)/bin/fate-run out/tiny-moe.fate --prompt "$(PROMPT)" --max-new-tokens 24 --greedy --memory-budget 50% \
		--executor session
	! $(RUNTIME_VENV)/bin/python -c "import torch" 2>/dev/null
	! $(RUNTIME_VENV)/bin/python -c "import transformers" 2>/dev/null
	! $(RUNTIME_VENV)/bin/fate-compile examples/tiny-moe -o out/never 2> out/compile-hint.txt
	grep -q "pip install 'fate\[compile\]'" out/compile-hint.txt && test "$$(wc -l < out/compile-hint.txt)" -eq 1
	@echo "runtime-only environment: $$(du -sm $(RUNTIME_VENV) | cut -f1) MB; with the compiler (torch): $$(du -sm $(VENV) | cut -f1) MB"

clean:
	rm -rf out $(RUNTIME_VENV)
