PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)

.PHONY: install test lint format bench ci mutate

install:
	$(PYTHON) -m pip install -e '.[dev]'

test:
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff check src tests benchmarks
	$(PYTHON) -m ruff format --check src tests benchmarks
	$(PYTHON) -m mypy

format:
	$(PYTHON) -m ruff check --fix src tests benchmarks
	$(PYTHON) -m ruff format src tests benchmarks

# The targets on the workers users run (two pairs of runs, for the range), then the per-stage
# table from the instrumented workers, whose timing wrappers cost CPU of their own.
bench:
	$(PYTHON) -m benchmarks.pipeline --plain --repeat 2 --skip-imaging
	$(PYTHON) -m benchmarks.pipeline

ci:
	.ci/run

# Mutation testing of the pure core with mutmut (configuration: setup.cfg [mutmut]). Slow — 8 to
# 12 minutes on two cores from an empty mutants/ — and not in CI. Mutates imaging, outcomes, storage
# and config whole, and of fetching only its policy functions (FETCHING_POLICY: no Fetcher method,
# nothing that connects), then prints each module's score and the mutants not killed (`mutmut show
# NAME` shows one). Its work is kept in mutants/ (delete it for a run from scratch); the summary is
# also in mutants/summary.txt. mutmut kills a mutant's test process when it times out, which leaves
# the redis-server tests/conftest.py started for it: the run has a process group of its own, ended
# once it is over (IN_OWN_GROUP).
FETCHING_POLICY = check_url is_public_address _is_public parse_retry_after default_user_agent \
	_has_zlib_header _content_length _time_left _fetch_error _causes
MUTANTS = $(foreach module,imaging outcomes storage config,'image_crawler.$(module).*') \
	$(foreach name,$(FETCHING_POLICY),'image_crawler.fetching.x_$(name)__mutmut_*') \
	'image_crawler.fetching.xǁ_BodyDecoderǁ*'

mutate:
	$(PYTHON) -c "$$IN_OWN_GROUP" $(PYTHON) -m mutmut run --max-children 2 $(MUTANTS)
	$(PYTHON) -m mutmut results --all true | $(PYTHON) -c "$$MUTATION_SUMMARY" $(MUTANTS) | tee mutants/summary.txt

# Reads `mutmut results --all true` and prints, for the mutants the arguments name, each module's
# counts and score: killed or timed out, of all its mutants (one no test runs is not killed), then
# the mutants not killed.
define MUTATION_SUMMARY
import collections, fnmatch, sys
patterns = sys.argv[1:]
by_module = collections.defaultdict(collections.Counter)
alive = []
for line in sys.stdin:
    name, _, status = line.strip().rpartition(": ")
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
        by_module[name.split(".")[1]][status] += 1
        if status in ("survived", "no tests"):
            alive.append(f"{name}: {status}")
columns = ("killed", "timeout", "survived", "no tests")
print(f"{'module':<10}" + "".join(f"{column:>10}" for column in (*columns, "other", "score")))
for module, counts in sorted(by_module.items()):
    other = sum(counts.values()) - sum(counts[column] for column in columns)
    score = 100 * (counts["killed"] + counts["timeout"]) / (sum(counts.values()) - other)
    print(f"{module:<10}" + "".join(f"{counts[column]:>10}" for column in columns) + f"{other:>10}{score:>9.1f}%")
print(f"\nnot killed ({len(alive)}):")
for line in alive:
    print(f"  {line}")
endef
export MUTATION_SUMMARY

# Runs the command given in a process group of its own and, once it is over, ends what is left of
# that group (the orphans of the test processes mutmut killed); exits with the command's status.
define IN_OWN_GROUP
import os, signal, subprocess, sys
child = subprocess.Popen(sys.argv[1:], start_new_session=True)
try:
    status = child.wait()
except KeyboardInterrupt:
    status = 130
finally:
    try:
        os.killpg(child.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
sys.exit(status)
endef
export IN_OWN_GROUP
