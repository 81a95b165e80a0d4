"""The `experiment` command: baselines and the paper's experiments (issue 4)."""

from __future__ import annotations

import json


def cmd_experiment(cfg) -> int:
    from .experiment import run

    report = run(cfg)
    print(json.dumps({"out": report["out"], "methods": report["methods"], "cross_expert": report["cross_expert"]},
                     indent=1))
    return 0


def add_commands(sub, pool_sub) -> None:
    """Register this module's sub-commands on the top-level ``sub`` (and ``pool_sub`` for ``pool ...``)."""
    from .baselines import METHODS
    from .build import PRESETS
    from .data import DATASETS
    from .experiment import ExperimentConfig

    e = sub.add_parser("experiment", help="every method on composite queries n(Q)=1..5, the loss ablation, "
                                          "tables, plots and a summary (resumable)")
    e.set_defaults(run=cmd_experiment, config=ExperimentConfig)
    e.add_argument("--dataset", required=True, choices=DATASETS)
    e.add_argument("--preset", default="cpu", choices=PRESETS)
    e.add_argument("--methods", nargs="+", choices=METHODS, metavar="METHOD",
                   help=f"default: all ({', '.join(METHODS)})")
    e.add_argument("--max-queries", type=int, metavar="K", help="sample K task combinations per n(Q) (default: all)")
    e.add_argument("--max-tasks", type=int, default=5, metavar="N", help="largest n(Q) (default 5)")
    e.add_argument("--pool", help="an existing pool of this data set and preset (default: build one in --work)")
    e.add_argument("--out", help="results directory (default docs/results/DATASET)")
    e.add_argument("--work", help="working files: cell cache, ablation pools (default OUT/work)")
    e.add_argument("--seed", type=int, default=0, help="query sampling and baselines' seeds")
    e.add_argument("--data-root")
    e.add_argument("--device", default="auto")
    e.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    e.add_argument("--no-ablation", dest="ablation", action="store_false",
                   help="skip the L_soft / L_scale expert pools")
    e.add_argument("--no-progress", dest="progress", action="store_false")
