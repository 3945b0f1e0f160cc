"""Write the micro suite to disk in the TRACE format (``<out>/<task>/{train,eval,test}.json``).

The runner generates micro data in memory; this script exports the same examples for inspection or for use
with other tools. Usage: ``python benchmarks/prepare_micro.py OUT_DIR [--train 300 --test 50]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clbench.data import micro
from clbench.results import write_text_atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--test", type=int, default=50)
    args = parser.parse_args()
    sizes = {"train": args.train, "eval": args.test, "test": args.test}
    for task in micro.TASKS:
        for split, n in sizes.items():
            examples = micro.generate_task(task, n, micro.SPLIT_SEEDS[split])
            write_text_atomic(args.out / task / f"{split}.json", json.dumps(examples, indent=1))
    print(f"wrote {len(micro.TASKS)} tasks to {args.out}")


if __name__ == "__main__":
    main()
