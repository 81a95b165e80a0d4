"""The `bench` command: performance figures (issue 6)."""

from __future__ import annotations

import json
import sys


def cmd_bench(cfg) -> int:
    from .bench import check_readme, fill_readme, markdown, run

    if cfg.readme:
        check_readme(cfg.readme)  # before minutes of work
    result = run(cfg)
    command = "expertpool " + " ".join(sys.argv[1:])
    if cfg.out:
        with open(cfg.out, "w") as f:
            f.write(markdown(result, command))
    if cfg.readme:
        fill_readme(cfg.readme, result, command)
    if cfg.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:36s} {v}")
    return 0


def add_commands(sub, pool_sub) -> None:
    """Register this module's sub-commands on the top-level ``sub`` (and ``pool_sub`` for ``pool ...``)."""
    from .bench import BenchConfig

    b = sub.add_parser("bench", help="measure composition, export, fused inference and extraction speed")
    b.set_defaults(run=cmd_bench, config=BenchConfig)
    b.add_argument("--quick", action="store_true", help="fewer repetitions and a smaller extraction run")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--pool", help="benchmark this pool instead of a random-weight one of the cpu preset's shapes")
    b.add_argument("--out", help="also write a Markdown report (e.g. docs/results/performance.md)")
    b.add_argument("--readme", help="also put the goals table between the bench markers of this README")
