"""The cascade (reasoner none) at a thousand communities: start-up, first verdict, all, peak RSS.

1,000 policy variants, copies of `policies/chat-harassment.md` (and its examples file), each
with its own id, `community: cNNNN` and one extra pattern; 20,000 chat messages spread at
random over them are asked of the `CascadeClassifier` directly (no broker), a poll batch of
500 at a time as the pipeline asks: `classify_now_many`, then `classify` for what it left.
Each run is a child process, so its peak RSS (ru_maxrss) is its own:

    python -m bench.cascade_communities                       # this checkout's code
    python -m bench.cascade_communities --code /work/main     # another checkout's, same workload
    python -m bench.cascade_communities --distinct            # each variant's text differs: no heads shared
    python -m bench.cascade_communities --distinct --max-trained 100 --state-dir   # LRU at 100, evicted saved

`--distinct` adds one line naming the community to each variant's text, so no two variants
share heads (the worst case for memory); without it the variants differ in id, community and
pattern only, as communities that adopt one policy do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "policies" / "chat-harassment.md"
BATCH = 500


def write_variants(folder: Path, count: int, distinct: bool) -> None:
    text = SOURCE.read_text()
    examples = SOURCE.with_name("chat-harassment.examples.jsonl").read_bytes()
    for n in range(count):
        community = f"c{n:04d}"
        variant = text.replace("id: chat-harassment\n", f"id: chat-harassment-{community}\ncommunity: {community}\n", 1)
        variant = variant.replace("patterns:\n", f"patterns:\n  - '\\bbanned-word-{community}\\b'\n", 1)
        if distinct:
            variant = variant.replace("## INSTRUCTIONS\n", f"## INSTRUCTIONS\nThis is community {community}'s copy.\n", 1)
        (folder / f"chat-harassment-{community}.md").write_text(variant)
        (folder / f"chat-harassment-{community}.examples.jsonl").write_bytes(examples)


def messages(count: int) -> list[str]:
    from bench.workload import chat_events

    return [json.loads(value)["content"] for _, value in chat_events(count)]


async def child(args: argparse.Namespace) -> dict:
    from consumer.classify import ClassificationFailed, ClassifyRequest
    from consumer.classify.cascade import CascadeSettings, make_cascade
    from consumer.events import ContentEvent
    from consumer.policy import PolicyStore

    folder = Path(args.folder)
    texts = messages(args.requests)
    options: dict = {}
    if args.max_trained is not None:
        options["max_trained_policies"] = args.max_trained
    if args.state_folder is not None:
        options["state_dir"] = Path(args.state_folder)
    t0 = time.perf_counter()
    store = PolicyStore(folder)
    policies = list(store.get().values())
    cascade = make_cascade(CascadeSettings(**options), None, store)
    await cascade.start()
    started = time.perf_counter() - t0
    rng = random.Random(1)
    requests = [
        ClassifyRequest(ContentEvent(event_id=str(i), content=text), rng.choice(policies), str(i))
        for i, text in enumerate(texts)
    ]
    first: float | None = None
    answered = failed = 0

    def answered_now(answer: object) -> None:
        nonlocal first, answered, failed
        first = first if first is not None else time.perf_counter() - t0
        answered += 1
        failed += isinstance(answer, ClassificationFailed)

    async def one(request: ClassifyRequest) -> None:
        try:
            answered_now(await cascade.classify(request))
        except ClassificationFailed as exc:
            answered_now(exc)

    for start in range(0, len(requests), BATCH):
        batch = requests[start : start + BATCH]
        left = []
        for request, answer in zip(batch, cascade.classify_now_many(batch)):
            if answer is None:
                left.append(request)
            else:
                answered_now(answer)
        await asyncio.gather(*(one(r) for r in left))
    total = time.perf_counter() - t0
    await cascade.close()
    return {"policies": len(policies), "requests": answered, "failed": failed, "start_s": round(started, 2),
            "first_verdict_s": round(first or 0.0, 2), "all_s": round(total, 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policies", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--distinct", action="store_true", help="a line of each variant's text names its community")
    parser.add_argument("--code", type=Path, default=REPO, help="the checkout whose consumer package runs")
    parser.add_argument("--max-trained", type=int, default=None, help="cascade.max_trained_policies")
    parser.add_argument("--state-dir", action="store_true", help="set cascade.state_dir (a temporary folder)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--state-folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(child(args))))
        return
    with tempfile.TemporaryDirectory(prefix="communities-") as tmp:
        folder = Path(tmp) / "policies"
        folder.mkdir()
        write_variants(folder, args.policies, args.distinct)
        command = [sys.executable, str(Path(__file__).resolve()), "--child", "--folder", str(folder),
                   "--requests", str(args.requests)]  # fmt: skip
        if args.max_trained is not None:
            command += ["--max-trained", str(args.max_trained)]
        if args.state_dir:
            command += ["--state-folder", str(Path(tmp) / "state")]
        # The workload module comes from this checkout; the consumer package from --code.
        env = os.environ | {"PYTHONPATH": f"{args.code.resolve()}{os.pathsep}{REPO}"}
        process = subprocess.Popen(command, stdout=subprocess.PIPE, env=env, cwd=tmp)
        assert process.stdout is not None
        out = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
        if status != 0:
            sys.exit(f"the run failed (status {status})")
        result = json.loads(out.decode().strip().splitlines()[-1])
        result |= {"peak_rss_mb": round(usage.ru_maxrss / 1024), "code": str(args.code), "distinct": args.distinct,
                   "load": os.getloadavg()[0]}  # fmt: skip
        shutil.rmtree(folder)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
