# LoRA & QLoRA from scratch: every entry point. `make help` lists them.
# The first target that needs Python creates .venv and installs requirements.txt into it.

PY        ?= python3
VENV      := .venv
PYTHON    := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
IMPL      ?= solutions              # demo / notebooks / bench: solutions (reference) or student
EX        ?=                        # grade one exercise (1.2), a stage (1) or a list (1,2.3)
SUBMISSION ?=                       # grade another checkout's three student files
RESULTS   ?= runs/grade/results.json
FORCE     ?=
PYTEST    := $(PYTHON) -m pytest -p no:nbmake
GRADED    := testcases/basic_test.py testcases/advanced_test.py
GRADE_IMPL = $(if $(strip $(SUBMISSION)),$(abspath $(strip $(SUBMISSION))),student)

.DEFAULT_GOAL := help
.PHONY: help setup demo test grade stubs check-stubs notebooks lint format pretrain bench \
        mutants solution-branch handout clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'
	@echo "  variables: IMPL=solutions|student  EX=1.2  SUBMISSION=dir  RESULTS=path  FORCE=1"

setup: $(STAMP) ## create .venv and install requirements.txt (done automatically)

$(STAMP): requirements.txt
	@$(PY) -c 'import sys; assert sys.version_info >= (3, 10), f"Python >= 3.10 needed, found {sys.version.split()[0]}"'
	@test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@touch $(STAMP)

demo: $(STAMP) ## fine-tune the bundled base model: full vs LoRA vs QLoRA (IMPL=student for your code)
	LORA_IMPL=$(strip $(IMPL)) $(PYTHON) -m training.demo

test: $(STAMP) ## the self-test: reference passes, stubs score 0, mutants caught, notebooks run, stubs in sync
	@echo "== 1/6 student files in sync with the reference";  $(PYTHON) -m testcases.tools.stubgen --check
	@echo "== 2/6 lint";                                       $(MAKE) --no-print-directory lint
	@echo "== 3/6 the reference passes every test";           $(PYTEST) -q testcases --impl solutions
	@echo "== 4/6 the untouched stubs score zero";             $(PYTEST) -q -rN --tb=no $(GRADED) --impl student --expect-not-attempted --results-json runs/selftest/stubs.json
	@echo "== 5/6 every mutant is caught";                     $(PYTHON) -m testcases.mutants.run
	@echo "== 6/6 the notebooks run on the reference";         LORA_IMPL=solutions $(PYTHON) -m pytest -q -p no:cacheprovider --nbmake --nbmake-timeout=600 notebooks
	@echo "make test: all checks passed"

grade: $(STAMP) ## grade the student files (EX=1.2, SUBMISSION=dir, RESULTS=path); exits non-zero unless all pass
	$(PYTEST) -q -rN --tb=short $(GRADED) --impl $(GRADE_IMPL) $(if $(strip $(EX)),--ex $(strip $(EX))) --results-json $(RESULTS)

stubs: $(STAMP) ## regenerate the student files from solutions/ (FORCE=1 overwrites filled-in work)
	$(PYTHON) -m testcases.tools.stubgen $(if $(FORCE),--force)

check-stubs: $(STAMP) ## fail if a student file differs from the stub generated from solutions/
	$(PYTHON) -m testcases.tools.stubgen --check

notebooks: $(STAMP) ## open Jupyter Lab on notebooks/ (IMPL=student runs them on your code)
	LORA_IMPL=$(strip $(IMPL)) $(VENV)/bin/jupyter lab notebooks

lint: $(STAMP) ## ruff check and ruff format --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP) ## ruff format and ruff check --fix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

pretrain: $(STAMP) ## rebuild the bundled base checkpoint model/checkpoints/ (deterministic)
	$(PYTHON) -m training.pretrain

bench: $(STAMP) ## timings: LoRA layer overhead, NF4 throughput, LoRA vs QLoRA training step
	LORA_IMPL=$(strip $(IMPL)) $(PYTHON) -m training.bench

mutants: $(STAMP) ## run the suites against every mutant in testcases/mutants/
	$(PYTHON) -m testcases.mutants.run

solution-branch: ## instructors: a local branch `solution` whose student files hold the reference
	@git rev-parse --verify -q solution >/dev/null && { echo "branch 'solution' exists; delete it first: git branch -D solution"; exit 1; } || true
	@tmp=$$(mktemp -d) && git worktree add -q -b solution $$tmp HEAD && \
	  for f in model/lora.py model/quant.py training/qlora_trainer.py; do cp solutions/$$f $$tmp/$$f; done && \
	  git -C $$tmp commit -q -am "Reference solutions in the student files" && \
	  git worktree remove $$tmp && echo "created branch 'solution' (git switch solution)"

handout: ## instructors: build/handout/, a copy of HEAD without solutions/ and the mutants
	rm -rf build/handout && mkdir -p build/handout
	git archive HEAD | tar -x -C build/handout
	rm -rf build/handout/solutions build/handout/.ci build/handout/testcases/mutants build/handout/testcases/tools \
	       build/handout/testcases/support_test.py
	@echo "build/handout/: hand this out (students run make grade; make test needs solutions/)"

clean: ## remove generated output (runs/, build/); keeps .venv
	rm -rf runs build
