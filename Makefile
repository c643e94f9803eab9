# The two set-up commands of the README. Both install what they need first (scripts/bootstrap).
.PHONY: demo test bench

PYTEST_ARGS ?=

demo:
	@venv=$$(scripts/bootstrap core) && "$$venv/bin/safeguard-consumer" demo

test:
	@venv=$$(scripts/bootstrap full) && "$$venv/bin/python" -m pytest $(PYTEST_ARGS)

# Prints a table and writes JSON under bench/results/ (docs/benchmark.md); BENCH_ARGS=--quick for a smoke run.
# Then the decode cost per event of JSON, Avro and Protobuf, in one run against a real registry
# (docs/registry.md; DECODE_BENCH_ARGS="--events 2000 --repeats 2" for a smoke run).
# Then a replay run with 1, 2, 4 workers (docs/replay.md).
# Last, 1,000 communities' own policies against a single policy: start-up, peak RSS, CPU per event
# (docs/benchmark.md; COMMUNITIES_BENCH_ARGS="--communities 50 --events 1000" for a smoke run).
BENCH_ARGS ?=
DECODE_BENCH_ARGS ?=
COMMUNITIES_BENCH_ARGS ?=
bench:
	@venv=$$(scripts/bootstrap full) && peer=$$(scripts/bootstrap peer) && \
	  "$$venv/bin/python" -m bench.pipeline_bench --peer-python "$$peer/bin/python" $(BENCH_ARGS) && \
	  "$$venv/bin/python" -m bench.decode_bench $(DECODE_BENCH_ARGS) && \
	  "$$venv/bin/python" -m bench.replay_fleet_bench && \
	  "$$venv/bin/python" -m bench.communities_bench $(COMMUNITIES_BENCH_ARGS)
