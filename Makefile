# LoRA & QLoRA from scratch: every entry point. `make help` lists the ones this checkout offers.
# The first target that needs Python creates .venv and installs requirements.txt into it.
#
# Variables (set them on the command line: make grade EX=1.2):
#   IMPL       which student files run: student | solutions | DIR (a clone, or a folder of the files).
#              Unset: make grade grades your files; demo, notebooks and bench show the reference
#              where this checkout has it (model/_impl.py states the rule).
#   EX         grade one exercise (1.2), a stage (1) or a list (1,2.3)
#   RESULTS    where make grade writes Gradescope's results.json
#   PRECISION  make bench: fp32 | bf16 | fp16
#   SEEDS      make stress: how many seed offsets; make variants: how many seeds
#   THREADS CAPS  make stress: torch thread counts (1 2) and CPU code paths (native default avx2 avx512)
#   FORCE      make stubs: overwrite filled-in exercises
#   MODEL DATA ADAPTER PROMPT INPUT   make finetune / generate / chat: a Hugging Face Llama directory, a JSONL file, ...
#   ARGS       extra options for finetune, generate, chat, ddp, fsdp (--help lists them); NPROC: make ddp's and fsdp's processes (2)

PY        ?= python3
VENV      := .venv
PYTHON    := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
LAB       := $(VENV)/.lab-installed
IMPL      ?=
EX        ?=
RESULTS   ?= runs/grade/results.json
PRECISION ?= fp32
SEEDS     ?= 10
THREADS   ?= 1 2
CAPS      ?= native default avx2 avx512
FORCE     ?=
MODEL     ?=
DATA      ?=
ADAPTER   ?=
PROMPT    ?=
INPUT     ?=
ARGS      ?=
NPROC     ?= 2
SHOW       = $(if $(IMPL),LORA_IMPL=$(IMPL))
INSTRUCTOR := $(wildcard solutions/tools/variants.py)

.DEFAULT_GOAL := help
.PHONY: help setup grade demo variants peft-family finetune generate chat ddp fsdp notebooks bench lint format pretrain clean

help: ## list the targets
	@awk -F':.*## ' -v all=$(if $(INSTRUCTOR),1,0) '/^ifneq / && !all {exit} /^[a-z-]+:.*## / {printf "  make %-16s %s\n", $$1, $$2}' Makefile
	@echo "  variables: IMPL=student|solutions|DIR  EX=1.2  RESULTS=path  PRECISION=bf16  SEEDS=N  MODEL=dir DATA=file ADAPTER=dir PROMPT=… INPUT=… ARGS=… NPROC=2$(if $(INSTRUCTOR),  FORCE=1  THREADS=\"1 2\"  CAPS=\"default avx2\")"

setup: $(STAMP) ## create .venv and install requirements.txt (done automatically)

$(STAMP): requirements.txt
	@$(PY) -c 'import sys; assert sys.version_info >= (3, 11), f"Python >= 3.11 needed, found {sys.version.split()[0]}"'
	@echo "== $(VENV): pip install -r requirements.txt"; start=$$(date +%s); \
	  { test -x $(PYTHON) || $(PY) -m venv $(VENV); } && \
	  $(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements.txt && \
	  touch $(STAMP) && echo "== $(VENV) ready in $$(( $$(date +%s) - start )) s"

grade: $(STAMP) ## grade the student files (EX=1.2, IMPL=dir, RESULTS=path); exits non-zero unless full marks
	$(PYTHON) -m testcases.grade --impl $(or $(IMPL),student) $(if $(EX),--ex $(EX)) --results $(RESULTS)

demo: $(STAMP) ## fine-tune the bundled base model: full vs LoRA vs QLoRA (IMPL=student for your code)
	$(SHOW) $(PYTHON) -m training.demo

variants: $(STAMP) ## the LoRA family (Stage 5) side by side on the harder task (IMPL=student, SEEDS=3 for the spread)
	$(SHOW) $(PYTHON) -m training.variants $(if $(filter command line,$(origin SEEDS)),--seeds $(SEEDS))

peft-family: $(STAMP) ## LoRA's relatives (Stage 7) side by side on the harder task (IMPL=student)
	$(SHOW) $(PYTHON) -m training.peft_family

finetune: $(STAMP) ## QLoRA on a real checkpoint: MODEL=<HF dir> DATA=<file.jsonl> ARGS="--max-steps 200" (no MODEL: a toy one)
	$(if $(MODEL),$(if $(DATA),,$(error make finetune MODEL=$(MODEL) needs DATA=<file.jsonl> too)))
	$(if $(MODEL),,$(PYTHON) -m training.toy_checkpoint runs/toy)
	$(SHOW) $(PYTHON) -m training.finetune --model $(or $(MODEL),runs/toy/model) --data $(or $(DATA),runs/toy/data.jsonl) $(ARGS)

generate: $(STAMP) ## continue PROMPT="…" (INPUT="…") with MODEL=<HF dir>, ADAPTER=<dir> optional (no MODEL: the toy one)
	$(if $(MODEL),,test -d runs/toy/model || $(PYTHON) -m training.toy_checkpoint runs/toy)
	$(SHOW) $(PYTHON) -m training.generate --model $(or $(MODEL),runs/toy/model) $(if $(ADAPTER),--adapter $(ADAPTER)) --prompt "$(or $(PROMPT),Reverse the digits.)" $(if $(INPUT),--input "$(INPUT)") $(ARGS)

chat: $(STAMP) ## a conversation in the model's chat format, streamed: MODEL=<HF dir> ADAPTER=<dir> (no MODEL: the toy one)
	$(if $(MODEL),,test -d runs/toy/model || $(PYTHON) -m training.toy_checkpoint runs/toy)
	$(SHOW) $(PYTHON) -m training.chat --model $(or $(MODEL),runs/toy/model) $(if $(ADAPTER),--adapter $(ADAPTER)) $(ARGS)

ddp: $(STAMP) ## QLoRA on the bundled task with NPROC processes under torchrun (DistributedDataParallel; ARGS=…)
	$(SHOW) $(VENV)/bin/torchrun --nproc_per_node=$(NPROC) -m training.distributed $(ARGS)

fsdp: $(STAMP) ## the same, sharded over NPROC processes (FSDP2 fully_shard, sharded checkpoints; ARGS=…)
	$(SHOW) $(VENV)/bin/torchrun --nproc_per_node=$(NPROC) -m training.fsdp $(ARGS)

notebooks: $(LAB) ## open Jupyter Lab on notebooks/ (IMPL=student runs them on your code; installs JupyterLab once)
	$(SHOW) $(VENV)/bin/jupyter lab notebooks

$(LAB): $(STAMP) requirements-lab.txt
	@echo "== $(VENV): pip install -r requirements-lab.txt (JupyterLab, once)"; \
	  $(PYTHON) -m pip install --quiet --disable-pip-version-check -r requirements-lab.txt && touch $(LAB)

bench: $(STAMP) ## timings: LoRA layer overhead, NF4 throughput, LoRA vs QLoRA step, KV-cache generation (PRECISION=bf16)
	$(SHOW) BENCH_PRECISION=$(PRECISION) $(PYTHON) -m training.bench

lint: $(STAMP) ## ruff check and ruff format --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP) ## ruff format and ruff check --fix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

pretrain: $(STAMP) ## rebuild the bundled base checkpoint model/checkpoints/ (deterministic)
	$(PYTHON) -m training.pretrain

clean: ## remove generated output (runs/, build/); keeps .venv
	rm -rf runs build

ifneq ($(INSTRUCTOR),)
# ---- Instructors and maintainers (this part needs solutions/; a handout does not have it) ----------
.PHONY: test stress stubs check-stubs mutants equivalents hostile calibrate handout gradescope solution-branch

test: $(STAMP) ## the self-test: every check, side by side on 2 cores, with each step's seconds; what CI runs
	$(PYTHON) -m solutions.tools.selftest

stress: $(STAMP) ## the reference under SEEDS seed offsets × THREADS torch threads × CAPS CPU code paths
	$(PYTHON) -m solutions.tools.stress --seeds $(SEEDS) --threads $(THREADS) --caps $(CAPS)

stubs: $(STAMP) ## regenerate the student files from solutions/ (FORCE=1 overwrites filled-in work)
	$(PYTHON) -m solutions.tools.stubgen $(if $(FORCE),--force)

check-stubs: $(STAMP) ## fail if a student file differs from the stub generated from solutions/
	$(PYTHON) -m solutions.tools.stubgen --check

mutants: $(STAMP) ## run the suites against every mutant in solutions/mutants/
	$(PYTHON) -m solutions.tools.variants --mutants

equivalents: $(STAMP) ## run the suites against every correct variant in solutions/equivalents/
	$(PYTHON) -m solutions.tools.variants --equivalents

hostile: $(STAMP) ## grade the hostile submissions in solutions/hostile/ and check their scores
	$(PYTHON) -m solutions.tools.hostile

calibrate: $(STAMP) ## measure the statistical thresholds over 60 seeds (slow)
	$(PYTHON) -m solutions.tools.calibrate

handout: $(STAMP) ## build/handout/: this checkout without solutions/, with the students' README
	$(PYTHON) -m solutions.tools.handout build/handout

gradescope: $(STAMP) ## build/gradescope/autograder.zip (setup.sh, run_autograder) for Gradescope
	$(PYTHON) -m solutions.tools.gradescope build/gradescope

solution-branch: $(STAMP) ## a local branch `solution` whose student files hold the reference (an answer key)
	$(PYTHON) -m solutions.tools.handout --solution-branch
endif
