# Two commands: `make demo` (set up everything, then run the main job) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all bench aot-table install clean

demo: $(STAMP)
	$(PY) -m inception_fast demo

# `make test` (CI, README) skips the tests marked slow: every path stays covered on its
# cheapest shapes. `make test-all` runs the whole matrix (about twice as long).
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not slow" tests/test_triton_interpreter.py tests/test_gpu_check.py

test-all: $(STAMP)
	$(PY) -m pytest -q tests
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/test_triton_interpreter.py tests/test_gpu_check.py

bench: $(STAMP)
	$(PY) -m inception_fast bench --networks 1,16 --write-readme
	$(PY) -m inception_fast bench --dtype bfloat16 --networks 1,16 --out benchmarks/results/bf16 --write-readme
	$(PY) -m inception_fast bench --blocks 3a,4a,5b --batch 32 --backward --reps 10 --out benchmarks/results/backward --write-readme
	$(PY) -m inception_fast bench --v3 --networks 1,8 --reps 10 --out benchmarks/results/inception_v3 --write-readme
	$(PY) -m inception_fast bench --v3 --backward --batch 8 --reps 5 --out benchmarks/results/inception_v3_backward --write-readme
	$(PY) -m inception_fast bench --whole-networks --reps 12 --out benchmarks/results/networks --write-readme
	$(PY) -m inception_fast bench --whole-networks --convs --reps 12 --out benchmarks/results/networks_convs --write-readme
	$(PY) -m inception_fast bench --train --reps 10 --out benchmarks/results/train --write-readme

aot-table: $(STAMP)
	INCEPTION_FAST_AOT_TABLE=benchmarks/results/aot_resources.md $(PY) -m pytest -q tests/test_triton_aot.py

install: $(STAMP)

# torch first (the C++ build compiles against it), then the package with its extension.
# Re-runs when setup.py or a C++ source changes, so `make test` never runs a stale kernel.
$(STAMP): setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 setuptools wheel pybind11 ninja numpy
	rm -f inception_fast/_C*.so  # a failed build must not leave a stale kernel behind
	$(PY) -m pip install -q --no-build-isolation -e '.[test,bench]'
	$(PY) -c "import inception_fast._C" || (echo "inception_fast: the C++ extension did not build (see above)"; exit 1)
	touch $(STAMP)

clean:
	rm -rf build *.egg-info inception_fast/_C*.so $(STAMP)
