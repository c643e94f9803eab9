"""The pipeline benchmark: every case side by side on one local broker and the same input.

    python -m bench.pipeline_bench                 # 100k events, every case
    python -m bench.pipeline_bench --quick         # a smoke run: 10k events, short engine cases
    python -m bench.pipeline_bench --events 1000000 --cases ours   # one case, more events
    python -m bench.pipeline_bench --memory        # peak RSS of ours at 100k and at 1M events

It starts one Kafka broker (consumer.kafka.devkafka), writes the input once (realistic chat JSON,
6 partitions), runs each case in its own process (so peak RSS and CPU time are per case),
prints a table and writes everything to bench/results/<time>.json. docs/benchmark.md says
what each case means and holds the last figures.

Our cases run with tracing as production deploys it (`--trace-ratio`, default 0.01): the
standard OTEL_* variables ask for a parent-based ratio sampler and the OTLP/HTTP exporter,
whose batches go to a sink this process serves on 127.0.0.1 (it answers every export with an
empty success, so the figure is what encoding and sending the sampled spans costs).
`--input-traces RATIO` has every input record carry its producer's `traceparent`, sampled by
the producer at RATIO (the parent-based sampler then follows the producer's decision).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench.checkouts import baseline_problem
from bench.workload import REPO, Spec, chat_events, produce_events
from consumer.kafka.devkafka import KafkaBroker, create_topics

PARTITIONS = 6
STREAM_CASES = ("raw", "hand", "keyword-floor", "peer", "ours", "keyword", "cascade-lexical", "cascade-embedding")
OUR_STREAM_CASES = ("ours", "keyword", "cascade-lexical", "cascade-embedding")
KAFKA_CASES = (*STREAM_CASES, "engine-sat", "engine-half")
ALL_CASES = (*KAFKA_CASES, "engine", "remote")
PEER_PYTHON = Path.home() / ".cache" / "safeguard-consumer" / "bench-peer" / "bin" / "python"


def run_case(
    python: str, module: str, args: list[str], timeout: float, root: Path = REPO, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """One case in a process of its own, running the consumer package of the checkout at `root` (with
    this checkout's bench: both sides of a before/after are measured alike); `env`: added variables."""
    cwd, path = side_paths(root)
    env = {**os.environ, **(env or {}), "PYTHONPATH": path}
    proc = subprocess.run(
        [python, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}"}


def side_paths(root: Path) -> tuple[Path, str]:
    """The working folder and PYTHONPATH of a side run with `python -m` on the consumer package of
    the checkout at `root` and this checkout's bench."""
    if root == REPO:
        return root, str(root)
    cwd = bench_only()  # `-m` puts the working folder first on the path: there, only this bench
    return cwd, f"{cwd}{os.pathsep}{root}"


def case_command(case: str, spec: Spec, peer_python: str) -> tuple[str, str, list[str]]:
    """The Python, module and arguments that run a Kafka case in a process of its own: the peer in
    its own environment (`bench.peer`), every other case through `bench.cases`."""
    if case == "peer":
        return peer_python, "bench.peer", [spec.to_json()]
    return sys.executable, "bench.cases", [case, spec.to_json()]


def bench_only() -> Path:
    """A folder holding only this checkout's `bench` package (a link), to put before another
    checkout on the path."""
    folder = Path(tempfile.gettempdir()) / f"safeguard-bench-{os.getpid()}"
    link = folder / "bench"
    if not link.exists():
        folder.mkdir(exist_ok=True)
        link.symlink_to(REPO / "bench", target_is_directory=True)
    return folder


class OtlpSink:
    """A stand-in OTLP/HTTP collector on 127.0.0.1: takes every trace export, answers it with an
    empty success (a valid ExportTraceServiceResponse) and counts the requests and bytes."""

    def __init__(self) -> None:
        sink = self
        self.requests = 0
        self.bytes = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                size = int(self.headers.get("Content-Length", 0))
                self.rfile.read(size)
                sink.requests += 1
                sink.bytes += size
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, name="otlp-sink", daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def tracing_env(ratio: float, endpoint: str) -> dict[str, str]:
    """The OTEL_* variables of a production deployment: ParentBased(TraceIdRatioBased(ratio)),
    spans batched to an OTLP/HTTP endpoint. Ratio 0: tracing off (no tracer provider at all)."""
    if ratio <= 0:
        return {"OTEL_TRACES_EXPORTER": "none"}
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": str(ratio),
    }


class Bench:
    def __init__(self, bootstrap: str, args: argparse.Namespace, env: dict[str, str] | None = None):
        """`env`: variables for the case processes (tracing's)."""
        self.bootstrap = bootstrap
        self.args = args
        self.env = env or {}
        self.run_id = uuid.uuid4().hex[:6]

    def topic(self, name: str, events: list[tuple[bytes, bytes]] | None, traces: float | None = None) -> str:
        topic = f"bench-{self.run_id}-{name}"
        create_topics(self.bootstrap, topic, partitions=PARTITIONS)
        if events:
            produce_events(self.bootstrap, topic, events, traces)
        return topic

    def spec(self, case: str, input_topic: str, events: int, **options: Any) -> Spec:
        out = f"bench-{self.run_id}-{case}-out"
        dlq = f"bench-{self.run_id}-{case}-dlq"
        create_topics(self.bootstrap, out, dlq, partitions=PARTITIONS)
        if self.args.profile:
            options["profile"] = str(self.args.results / f"profile-{case}-{self.run_id}.txt")
        if self.args.stages:
            options["stages"] = self.args.py_spy
        if self.args.set:
            options["settings"] = dict(self.args.set)
        return Spec(self.bootstrap, input_topic, out, dlq, f"bench-{self.run_id}-{case}", events, options)

    def kafka_case(self, case: str, spec: Spec, root: Path = REPO) -> dict[str, Any]:
        python, module, args = case_command(case, spec, self.args.peer_python)
        print(f"  {case}{'' if root == REPO else ' @ ' + str(root)} ...", file=sys.stderr, flush=True)
        return run_case(python, module, args, timeout=self.args.case_timeout, root=root, env=self.env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000, help="input events for cases 1-4 (default 100k)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 10k events, short engine cases")
    parser.add_argument("--cases", default=",".join(ALL_CASES), help=f"comma-separated, of {','.join(ALL_CASES)}")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the stream cases (raw .. cascade-embedding) this many alternating rounds; "
                             "the table shows each case's median round by events/s, and the range")
    parser.add_argument("--engine-bound-events", type=int, default=20_000, help="case 5 at saturation")
    parser.add_argument("--half-load-s", type=float, default=10.0, help="case 5 at half load: seconds of input")
    parser.add_argument("--engine-events", type=int, default=256, help="case 6: requests to the vLLM tiny model")
    parser.add_argument("--memory", action="store_true", help="peak RSS of ours at 100k vs 1M events (slow)")
    parser.add_argument("--profile", action="store_true", help="pyinstrument each case into bench/results/")
    parser.add_argument("--stages", action="store_true",
                        help="our cases sampled by py-spy from outside: the event loop's CPU per event split by "
                             "stage (bench/stage_split.py), printed beside the thread split")
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"),
                        help="the py-spy binary --stages runs (pip install py-spy)")
    parser.add_argument("--peer-python", default=os.environ.get("SAFEGUARD_BENCH_PEER_PYTHON", str(PEER_PYTHON)),
                        help="interpreter with requirements/bench.txt installed (Quix Streams)")
    parser.add_argument("--baseline", type=Path, metavar="CHECKOUT",
                        help="also run our stream cases (ours, keyword, cascade-*) on the consumer package of another "
                             "checkout (with this checkout's bench), e.g. `git worktree add /tmp/base main`, in the "
                             "same alternating rounds: before/after ratios measured side by side (as CASE@baseline)")
    parser.add_argument("--trace-ratio", type=float, default=0.01,
                        help="our cases trace at ParentBased(TraceIdRatioBased(RATIO)) into a local OTLP/HTTP sink, "
                             "as deployed (default 0.01); 0: tracing off")
    parser.add_argument("--input-traces", type=float, metavar="RATIO",
                        help="every input record carries its producer's traceparent, sampled at RATIO by the producer "
                             "(default: input without headers, every record a root)")
    parser.add_argument("--set", action="append", type=setting, default=[], metavar="KEY=VALUE",
                        help="a configuration key for our cases, e.g. telemetry.statistics_interval_ms=0 (a YAML "
                             "value; repeatable; a --baseline checkout from before this option ignores it)")
    parser.add_argument("--case-timeout", type=float, default=1800)
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.events, args.engine_bound_events, args.half_load_s, args.engine_events = 10_000, 4_000, 4.0, 64
    if args.baseline is not None:
        args.baseline = args.baseline.resolve()
        problem = baseline_problem(args.baseline)
        if problem:
            parser.error(f"--baseline {args.baseline}: {problem}")
    if args.stages and not Path(args.py_spy).is_file():
        parser.error(f"--stages needs py-spy: {args.py_spy} not found (pip install py-spy, or pass --py-spy PATH)")
    cases = [c for c in args.cases.split(",") if c]
    unknown = set(cases) - set(ALL_CASES)
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    if "peer" in cases and not Path(args.peer_python).is_file():
        parser.error(f"the peer case needs Quix Streams' own environment: {args.peer_python} not found (run "
                     "scripts/bootstrap peer and pass its bin/python as --peer-python, as `make bench` does, or "
                     "leave peer out of --cases)")
    if args.input_traces is not None and not 0 <= args.input_traces <= 1:
        parser.error(f"--input-traces {args.input_traces}: a ratio from 0 to 1")
    args.results.mkdir(parents=True, exist_ok=True)

    results: dict[str, Any] = {}
    targets: dict[str, Any] = {}
    data_dir = Path(tempfile.mkdtemp(prefix="bench-kafka-"))
    broker = KafkaBroker(data_dir)
    otlp = OtlpSink()
    try:
        print("starting Kafka ...", file=sys.stderr, flush=True)
        broker.start(timeout=120)
        bench = Bench(broker.bootstrap, args, tracing_env(args.trace_ratio, otlp.endpoint))
        if set(cases) & set(STREAM_CASES):
            shared = bench.topic("input", chat_events(args.events), args.input_traces)
            rounds: dict[str, list[dict[str, Any]]] = {}
            for n in range(args.rounds):
                # Alternating rounds: the machine's drift through the run touches every case alike.
                for case in (c for c in STREAM_CASES if c in cases):
                    name = case if args.rounds == 1 else f"{case}-r{n}"
                    rounds.setdefault(case, []).append(bench.kafka_case(case, bench.spec(name, shared, args.events)))
                    if args.baseline and case in OUR_STREAM_CASES:
                        spec = bench.spec(f"{name}-baseline", shared, args.events)
                        rounds.setdefault(f"{case}@baseline", []).append(bench.kafka_case(case, spec, args.baseline))
            for case, runs in rounds.items():
                results[case] = median_run(runs)
            targets = issue_targets(rounds)
        if "engine-sat" in cases:
            topic = bench.topic("backlog", chat_events(args.engine_bound_events, seed=9))
            results["engine-sat"] = bench.kafka_case(
                "engine-sat", bench.spec("engine-sat", topic, args.engine_bound_events)
            )
        if "engine-half" in cases:
            from bench.cases import SimulatedEngine

            count = int(SimulatedEngine().throughput / 2 * args.half_load_s)
            topic = bench.topic("live", None)
            results["engine-half"] = bench.kafka_case("engine-half", bench.spec("engine-half", topic, count))
        if args.memory:
            results["memory"] = memory_case(bench)
        if "engine" in cases:
            print("  engine (vLLM tiny model) ...", file=sys.stderr, flush=True)
            spec = bench.spec("engine", bench.topic("engine", chat_events(args.engine_events, seed=5)),
                              args.engine_events)
            results["engine"] = run_case(sys.executable, "bench.engine_case", [spec.to_json()], args.case_timeout)
        if "remote" in cases:  # case 7: bench/remote_bench.py, no Kafka
            print("  remote (vllm serve vs in-process, tiny model) ...", file=sys.stderr, flush=True)
            spec = bench.spec("remote", "unused", args.engine_events)
            results["remote"] = run_case(sys.executable, "bench.remote_bench", [spec.to_json()], args.case_timeout)
    finally:
        otlp.stop()
        broker.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
        if args.baseline is not None:
            shutil.rmtree(bench_only(), ignore_errors=True)  # the link only, never what it points to

    summary = summarise(results)
    stamp = time.strftime("%Y-%m-%dT%H%M%S")
    path = args.results / f"pipeline-{stamp}.json"
    meta = {"date": stamp, "events": args.events, "cpus": os.cpu_count(), "argv": sys.argv[1:],
            "trace_ratio": args.trace_ratio, "input_traces": args.input_traces,
            "otlp_exports": otlp.requests, "otlp_bytes": otlp.bytes}
    path.write_text(json.dumps({"meta": meta, "cases": results, "summary": summary, "targets": targets}, indent=2))
    print_table(results, summary, args.events)
    print_targets(targets)
    print(f"\nwritten to {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return 0


def setting(text: str) -> tuple[str, Any]:
    """`--set KEY=VALUE`: the value read as YAML, as in a configuration file."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return key.strip(), yaml.safe_load(value)


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median events/s, with every round's events/s and CPU per event beside it."""
    good = sorted((r for r in runs if "events_per_s" in r), key=lambda r: r["events_per_s"])
    if not good:
        return runs[-1]
    if len(runs) == 1:
        return good[0]
    return {**good[len(good) // 2], "rounds_events_per_s": [r["events_per_s"] for r in runs if "events_per_s" in r],
            "rounds_cpu_us_per_event": [r["cpu_us_per_event"] for r in runs if "cpu_us_per_event" in r]}


def memory_case(bench: Bench) -> dict[str, Any]:
    """Peak RSS of ours at 100k and at 1M events: bounded memory means (nearly) the same."""
    out: dict[str, Any] = {}
    for count in (100_000, 1_000_000):
        print(f"  memory: ours on {count} events ...", file=sys.stderr, flush=True)
        topic = bench.topic(f"memory-{count}", None)
        step = 100_000  # written in slices, so the parent never holds a million events at once
        for start in range(0, count, step):
            produce_events(bench.bootstrap, topic, chat_events(step, seed=start, start_id=start))
        out[str(count)] = bench.kafka_case("ours", bench.spec(f"memory-{count}", topic, count))
    small, large = out["100000"].get("peak_rss_mb"), out["1000000"].get("peak_rss_mb")
    if small and large:
        out["ratio_1m_to_100k"] = round(large / small, 3)
    return out


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    def rate(case: str) -> float | None:
        return results.get(case, {}).get("events_per_s")

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    def cpu(case: str) -> float | None:
        return results.get(case, {}).get("cpu_us_per_event")

    ours = rate("ours")
    engine = results.get("engine", {})
    return {
        "keyword/peer": ratio(rate("keyword"), rate("peer")),
        "keyword_cpu/hand_cpu": ratio(cpu("keyword"), cpu("hand")),
        "keyword_cpu/keyword-floor_cpu": ratio(cpu("keyword"), cpu("keyword-floor")),
        "cascade-lexical/keyword": ratio(rate("cascade-lexical"), rate("keyword")),
        "cascade-embedding/keyword": ratio(rate("cascade-embedding"), rate("keyword")),
        "ours/hand": ratio(ours, rate("hand")),
        "ours/peer": ratio(ours, rate("peer")),
        "ours/raw": ratio(ours, rate("raw")),
        "hand/raw": ratio(rate("hand"), rate("raw")),
        "peer/hand": ratio(rate("peer"), rate("hand")),
        "utilisation_at_saturation": results.get("engine-sat", {}).get("utilisation"),
        "p99_added_ms_at_half_load": results.get("engine-half", {}).get("p99_added_ms"),
        "p99_added_in_consumer_ms_at_half_load": results.get("engine-half", {}).get("p99_added_in_consumer_ms"),
        "ours/engine-alone": ratio(engine.get("ours_per_s"), engine.get("engine_alone_per_s")),
        "remote/in-process": results.get("remote", {}).get("remote/in_process"),
        "remote_added_p50_ms": results.get("remote", {}).get("added_p50_ms"),
        **{f"{case}/baseline": ratio(rate(case), rate(f"{case}@baseline")) for case in OUR_STREAM_CASES},
        **{f"{case}_cpu/baseline_cpu": ratio(cpu(case), cpu(f"{case}@baseline")) for case in OUR_STREAM_CASES},
    }


def print_table(results: dict[str, Any], summary: dict[str, Any], events: int) -> None:
    print(f"\n{'case':<12} {'events':>8} {'events/s':>10} {'CPU µs/ev':>10} {'peak RSS MB':>12}  notes")
    for case, r in results.items():
        if case == "memory":
            continue
        if "error" in r:
            print(f"{case:<12} failed: {r['error'][-300:]}")
            continue
        notes = []
        for key in ("utilisation", "overfilled", "p50_in_consumer_ms", "p99_in_consumer_ms", "offered_per_s",
                    "p50_e2e_ms", "p99_e2e_ms", "p99_engine_ms", "p99_added_ms", "p99_added_in_consumer_ms",
                    "p99_before_consumer_ms", "avg_batch_size", "decided_cache", "decided_lexical",
                    "decided_embedding", "decided_undecided", "rounds_events_per_s", "rounds_cpu_us_per_event",
                    "peak_in_flight", "cpu_us_main", "cpu_us_poll", "cpu_us_librdkafka", "engine_alone_per_s", "ours_per_s",
                    "in_process_per_s", "remote/in_process", "added_p50_ms", "added_p99_ms"):
            if key in r:
                notes.append(f"{key}={r[key]}".replace(" ", ""))
        print(f"{case:<12} {r.get('events', ''):>8} {r.get('events_per_s', ''):>10} "
              f"{r.get('cpu_us_per_event', ''):>10} {r.get('peak_rss_mb', ''):>12}  {' '.join(notes)}")
    if "memory" in results:
        m = results["memory"]
        print(f"memory: peak RSS 100k={m.get('100000', {}).get('peak_rss_mb')} MB, "
              f"1M={m.get('1000000', {}).get('peak_rss_mb')} MB, ratio={m.get('ratio_1m_to_100k')}")
    print("\n" + "  ".join(f"{k}={v}" for k, v in summary.items() if v is not None))
    print_stages(results)


# Issue 31's targets, each a ratio of two cases: (name, numerator, denominator, figure, the line, which side meets it).
TARGETS: tuple[tuple[str, str, str, str, float, str], ...] = (
    ("keyword CPU / Quix Streams CPU", "keyword", "peer", "cpu_us_per_event", 1.0, "<="),
    ("cascade-lexical / keyword events/s", "cascade-lexical", "keyword", "events_per_s", 0.8, ">="),
    ("cascade-embedding / keyword events/s", "cascade-embedding", "keyword", "events_per_s", 0.5, ">="),
)


def issue_targets(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Each target's ratio round by round: the two cases of one round ran back to back, so their
    ratio shares the machine's state, where a ratio of two cases' medians may pair a quick round
    of one with a slow round of the other. The median of the paired ratios is what is judged;
    `peer_cpu_spread` (the peer's own rounds, (max - min) / median) says how far this machine moves
    a figure that did not change: a median nearer the line than that is not told apart from it."""
    out: dict[str, Any] = {}
    for name, top, bottom, figure, line, side in TARGETS:
        pairs = zip(rounds.get(top, []), rounds.get(bottom, []))
        by_round = [round(a[figure] / b[figure], 3) for a, b in pairs if a.get(figure) and b.get(figure)]
        if by_round:
            median = round(statistics.median(by_round), 3)
            met = median <= line if side == "<=" else median >= line
            out[name] = {"rounds": by_round, "median": median, "target": f"{side} {line}", "met": met}
    peer = [r["cpu_us_per_event"] for r in rounds.get("peer", []) if r.get("cpu_us_per_event")]
    if len(peer) > 1:
        out["peer_cpu_spread"] = round((max(peer) - min(peer)) / statistics.median(peer), 3)
    return out


def print_targets(targets: dict[str, Any]) -> None:
    named = {name: t for name, t in targets.items() if isinstance(t, dict)}
    if not named:
        return
    print("\nissue 31's targets, paired round by round (the median is judged):")
    for name, t in named.items():
        verdict = "met" if t["met"] else "not met"
        print(f"  {name:<38} {t['target']:>6}  median {t['median']:.3f}  {verdict:<8} rounds {t['rounds']}")
    if "peer_cpu_spread" in targets:
        print(f"  Quix Streams' own CPU per event moved {targets['peer_cpu_spread']:.0%} between its rounds (the same "
              "code each time): a median that near the line is not told apart from it on this machine")


def print_stages(results: dict[str, Any]) -> None:
    """µs per event by stage (the event loop's, `--stages`) and by thread, one column per case."""
    cases = [case for case, r in results.items() if isinstance(r, dict) and "stages_us" in r]
    if not cases:
        return
    rows: list[str] = []
    for case in cases:
        rows.extend(stage for stage in results[case]["stages_us"] if stage not in rows)
    width = max(14, *(len(c) + 1 for c in cases))
    print(f"\n{'µs per event':<28}" + "".join(f"{c:>{width}}" for c in cases))
    for stage in rows:
        cells = "".join(f"{results[c]['stages_us'].get(stage, 0.0):>{width}.2f}" for c in cases)
        print(f"{'  main: ' + stage:<28}{cells}")
    for thread in ("main", "poll", "librdkafka", "other"):
        cells = "".join(f"{results[c].get('cpu_us_' + thread, 0.0):>{width}.2f}" for c in cases)
        print(f"{thread + ' thread':<28}{cells}")
    print(f"{'process':<28}" + "".join(f"{results[c].get('cpu_us_per_event', 0.0):>{width}.2f}" for c in cases))


if __name__ == "__main__":
    sys.exit(main())
