"""``make bench``: run every bench/bench_*.py, then summarise bench/results/*.json as markdown.

Each script runs in its own process (they start engines and process groups of their own).
Usage: python -m bench.run_all [--only NAME ...] [--skip NAME ...] [extra args passed to every script]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def summarise() -> str:
    lines = ["# megavrl benchmarks", "",
             "| benchmark | figure | value | baseline | ratio | date | device |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for path in sorted(RESULTS.glob("*.json")):
        rec = json.loads(path.read_text())
        for f in rec.get("figures", []):
            lines.append(f"| {rec['name']} | {f['name']} | {f['value']:.4g} {f['unit']} | "
                         f"{f['baseline']:.4g} ({f.get('baseline_name', 'baseline')}) | {f['ratio']:.2f}x | "
                         f"{rec['date']} | {rec['machine'].get('device', '?')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", nargs="*", default=None, help="run only these (names without bench_ and .py)")
    ap.add_argument("--skip", nargs="*", default=[], help="skip these")
    args, extra = ap.parse_known_args(argv)
    scripts = sorted(HERE.glob("bench_*.py"))
    failed = []
    for script in scripts:
        name = script.stem[len("bench_"):]
        if (args.only is not None and name not in args.only) or name in args.skip:
            continue
        print(f"=== {name}", flush=True)
        t0 = time.time()
        rc = subprocess.call([sys.executable, "-m", f"bench.{script.stem}", *extra], cwd=HERE.parent)
        print(f"=== {name}: exit {rc} after {time.time() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "SUMMARY.md").write_text(summarise())
    print(summarise())
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
