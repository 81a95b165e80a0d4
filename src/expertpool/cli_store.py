"""Pool maintenance commands: add-task, remove-task, import-checkpoints, pool strip (issue 3)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from .errors import UserError


@dataclass
class AddTaskConfig:
    pool: str
    name: str
    classes: list[str]
    data_root: str | None = None
    device: str = "auto"
    precision: str | None = None
    progress: bool = True


def cmd_add_task(cfg: AddTaskConfig) -> int:
    from .build import add_task

    print(json.dumps(add_task(cfg.pool, cfg.name, cfg.classes, cfg.data_root, cfg.device, cfg.precision,
                              cfg.progress)))
    return 0


@dataclass
class RemoveTaskConfig:
    pool: str
    name: str


def cmd_remove_task(cfg: RemoveTaskConfig) -> int:
    from .build import remove_task

    r = remove_task(cfg.pool, cfg.name)
    print(f"pool {r['pool']}: removed task {r['removed']}"
          + (f" (expert {r['sha256'][:12]})" if r["sha256"] else " (it had no expert)"))
    return 0


@dataclass
class ImportConfig:
    pool: str
    library: str
    expert: list[str]
    hierarchy: str
    dataset: str | None = None
    first_stride: int | None = None


def cmd_import(cfg: ImportConfig) -> int:
    from .checkpoints import import_checkpoints

    experts: dict[str, str] = {}
    for spec in cfg.expert:
        task, sep, path = spec.partition("=")
        if not sep or not task or not path:
            raise UserError(f"--expert takes TASK=FILE, got {spec!r}")
        if task in experts:
            raise UserError(f"task {task!r} given twice")
        experts[task] = path
    print(json.dumps(import_checkpoints(cfg.pool, cfg.library, experts, cfg.hierarchy, cfg.dataset,
                                        cfg.first_stride)))
    return 0


@dataclass
class StripConfig:
    pool: str
    out: str


def cmd_strip(cfg: StripConfig) -> int:
    from .store import strip

    print(json.dumps(strip(cfg.pool, cfg.out)))
    return 0


def add_commands(sub, pool_sub) -> None:
    """Register this module's sub-commands on the top-level ``sub`` (and ``pool_sub`` for ``pool ...``)."""
    a = sub.add_parser("add-task", help="extract the expert of a new primitive task into a pool")
    a.set_defaults(run=cmd_add_task, config=AddTaskConfig)
    a.add_argument("--pool", required=True)
    a.add_argument("--name", required=True, help="the new task's name")
    a.add_argument("--classes", nargs="+", required=True, metavar="CLASS", help="class names or indices")
    a.add_argument("--data-root", help="where the pool's data set is (default: as recorded in the pool)")
    a.add_argument("--device", default="auto")
    a.add_argument("--precision", choices=["auto", "bf16", "fp32"],
                   help="default: the precision the pool was built with (needed for bit-identical experts)")
    a.add_argument("--no-progress", dest="progress", action="store_false")

    r = sub.add_parser("remove-task", help="remove a primitive task and its expert from a pool")
    r.set_defaults(run=cmd_remove_task, config=RemoveTaskConfig)
    r.add_argument("--pool", required=True)
    r.add_argument("--name", required=True)

    i = sub.add_parser("import-checkpoints", help="make a pool from the research code's library and expert files")
    i.set_defaults(run=cmd_import, config=ImportConfig)
    i.add_argument("--pool", required=True, help="the new pool file")
    i.add_argument("--library", required=True, help="the library's state dict (WideResNet_EX, torch.save)")
    i.add_argument("--expert", nargs="+", required=True, metavar="TASK=FILE",
                   help="an expert's state dict (WideResNet_CL) and its primitive task")
    i.add_argument("--hierarchy", required=True, help="built-in name or JSON/YAML file of primitive tasks")
    i.add_argument("--dataset", help="data set of the checkpoints (default: the hierarchy's)")
    i.add_argument("--first-stride", type=int, help="stride of the library's first conv (default: 2 for "
                   "tinyimagenet, else 1)")

    s = pool_sub.add_parser("strip", help="copy a pool without the oracle's weights, for shipping")
    s.set_defaults(run=cmd_strip, config=StripConfig)
    s.add_argument("--pool", required=True)
    s.add_argument("--out", required=True, help="the stripped copy (replaced if it exists)")
