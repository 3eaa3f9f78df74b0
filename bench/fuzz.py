"""The fuzzer of tests/test_fuzz.py, run long against one daemon.

    .venv/bin/python bench/fuzz.py                  # 20,000 cases, about 3 minutes
    .venv/bin/python bench/fuzz.py --cases 100000 --seed 7

Every route and method, with hostile paths, queries, headers and bodies (see
tests/fuzzing.py), as the daemon's own user (root's reach: everything but locking,
rotating, re-tuning the governor and pruning the audit log). It prints the statuses
seen and each failure (a 5xx other than a documented 503 with Retry-After, a hang, a
dropped connection, a daemon exit) with the shrunk request that reproduces it; the
daemon's memory before and after is the only baseline a fuzz run has. Results go to
bench/results/fuzz.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from common import MODEL, EdgeDaemon, table  # noqa: E402
from fuzzing import run  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    # a stalled body is answered 408 after idle_timeout: short, so such cases stay cheap
    daemon = EdgeDaemon(max_queue=8, log_level="INFO", idle_timeout="2s")
    try:
        proc = psutil.Process(daemon.proc.pid)
        with daemon.http() as h:
            wait = 0
            while wait < 100 and h.get("/health").status_code != 200:
                wait += 1
            h.put("/api/data/docs/a.txt", content=b"fuzz me")
            for _ in range(20):  # the model loaded and the allocators warm: the baseline
                h.post(
                    "/v1/chat/completions",
                    json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
                )
        before = proc.memory_info().rss / 2**20
        result = run(
            str(daemon.socket),
            args.seed,
            args.cases,
            {"model": MODEL, "name": MODEL, "id": "req-0"},
            as_root=True,
            alive=lambda: daemon.proc.poll() is None,
        )
        after = proc.memory_info().rss / 2**20 if daemon.proc.poll() is None else float("nan")
    finally:
        daemon.stop()
    rows = [
        {"what": "cases", "value": result["cases"]},
        {"what": "seconds", "value": result["seconds"]},
        {"what": "cases per second", "value": result["cases"] / max(result["seconds"], 0.1)},
        {"what": "failures", "value": len(result["failures"])},
        {"what": "daemon RSS before, MB", "value": before},
        {"what": "daemon RSS after, MB", "value": after},
        {"what": "RSS after / before", "value": after / before},
    ]
    rows += [{"what": f"status {k}", "value": v} for k, v in sorted(result["statuses"].items())]
    print(table(rows, [("what", "fuzz run"), ("value", "value")]))
    for f in result["failures"]:
        print(f"FAIL {f['problem']}\n  reproduce: {f['reproducer']}")
    out = Path(__file__).parent / "results" / "fuzz.json"
    out.write_text(
        json.dumps({**result, "seed": args.seed, "rss_mb": [before, after]}, indent=2) + "\n"
    )
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
