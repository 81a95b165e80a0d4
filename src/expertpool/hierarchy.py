"""Primitive tasks: named groups of classes.

A ``Hierarchy`` holds a data set's class names (in label order) and its primitive tasks, each a list of
class indices. Built-ins follow the paper (DESIGN.md); users can give their own JSON or YAML file::

    {"classes": ["cat", "dog", "car", "bus"],           # optional when the data set names them
     "tasks": [{"name": "pets", "classes": ["cat", "dog"]},
               {"name": "vehicles", "classes": [2, 3]}]}   # names or indices

or the short form ``{"tasks": {"pets": ["cat", "dog"], ...}}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError


@dataclass(frozen=True)
class Hierarchy:
    classes: list[str]
    tasks: dict[str, list[int]]  # primitive task name -> class indices, in the task's own order
    name: str = "custom"

    def __post_init__(self):
        validate(self.classes, self.tasks)

    def task_classes(self, task: str) -> list[int]:
        if task not in self.tasks:
            raise UserError(f"unknown task {task!r}; valid tasks: {', '.join(self.tasks)}")
        return self.tasks[task]

    def to_json(self) -> dict:
        return {"name": self.name, "classes": self.classes, "tasks": self.tasks}

    @classmethod
    def from_json(cls, d: dict) -> "Hierarchy":
        return cls(list(d["classes"]), {k: list(v) for k, v in d["tasks"].items()}, d.get("name", "custom"))

    def with_task(self, name: str, classes: list[int]) -> "Hierarchy":
        if name in self.tasks:
            raise UserError(f"task {name!r} already exists")
        return Hierarchy(self.classes, {**self.tasks, name: classes}, self.name)

    def without_task(self, name: str) -> "Hierarchy":
        self.task_classes(name)
        return Hierarchy(self.classes, {k: v for k, v in self.tasks.items() if k != name}, self.name)


def validate(classes: list[str], tasks: dict[str, list[int]]) -> None:
    """Raise ``UserError`` for an empty task, an unknown class or a class in two tasks."""
    if len(set(classes)) != len(classes):
        dup = sorted({c for c in classes if classes.count(c) > 1})
        raise UserError(f"duplicate class names in hierarchy: {', '.join(dup)}")
    if not tasks:
        raise UserError("hierarchy has no tasks")
    owner: dict[int, str] = {}
    for name, members in tasks.items():
        if not name or not isinstance(name, str):
            raise UserError(f"task names must be non-empty strings, got {name!r}")
        if not members:
            raise UserError(f"task {name!r} is empty")
        for c in members:
            if not isinstance(c, int) or not 0 <= c < len(classes):
                raise UserError(f"task {name!r}: unknown class {c!r} (valid: 0..{len(classes) - 1})")
            if c in owner:
                where = "twice in it" if owner[c] == name else f"also in task {owner[c]!r}"
                raise UserError(f"class {classes[c]!r} of task {name!r} is {where}; a class belongs to one task")
            owner[c] = name


def parse(spec: dict, classes: list[str] | None = None, name: str = "custom") -> Hierarchy:
    """Build a hierarchy from a user's dict; class references may be names or indices."""
    if not isinstance(spec, dict) or "tasks" not in spec:
        raise UserError("a hierarchy file needs a 'tasks' entry")
    classes = list(spec.get("classes") or classes or [])
    if not classes:
        raise UserError("the hierarchy names no classes and the data set gives none")
    raw = spec["tasks"]
    if isinstance(raw, dict):
        raw = [{"name": k, "classes": v} for k, v in raw.items()]
    index = {c: i for i, c in enumerate(classes)}
    tasks: dict[str, list[int]] = {}
    for t in raw:
        if not isinstance(t, dict) or "name" not in t or "classes" not in t:
            raise UserError(f"each task needs 'name' and 'classes', got {t!r}")
        if t["name"] in tasks:
            raise UserError(f"duplicate task name {t['name']!r}")
        ids = []
        for c in t["classes"]:
            if isinstance(c, str):
                if c not in index:
                    raise UserError(f"task {t['name']!r}: unknown class {c!r}")
                c = index[c]
            ids.append(c)
        tasks[t["name"]] = ids
    return Hierarchy(classes, tasks, spec.get("name", name))


def load_file(path: str | Path, classes: list[str] | None = None) -> Hierarchy:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"hierarchy file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            spec = yaml.safe_load(text)
        else:
            spec = json.loads(text)
    except Exception as e:  # a parse error of either format
        raise UserError(f"cannot parse hierarchy file {path}: {str(e).splitlines()[0]}") from None
    return parse(spec, classes, name=path.stem)


# --------------------------------------------------------------------------- built-in hierarchies
CIFAR100_CLASSES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()
CIFAR100_SUPERCLASSES = (
    "aquatic_mammals fish flowers food_containers fruit_and_vegetables household_electrical_devices "
    "household_furniture insects large_carnivores large_man-made_outdoor_things large_natural_outdoor_scenes "
    "large_omnivores_and_herbivores medium_mammals non-insect_invertebrates people reptiles small_mammals trees "
    "vehicles_1 vehicles_2"
).split()
# The data set's own coarse label of each fine class (checked against the files when CIFAR-100 is loaded).
CIFAR100_COARSE = [4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6, 13, 15, 3,
                   15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0,
                   17, 4, 18, 17, 10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13, 16, 19, 2,
                   4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13]

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]


def from_coarse_labels(classes: list[str], coarse: list[int], coarse_names: list[str], name: str) -> Hierarchy:
    tasks = {n: [f for f, c in enumerate(coarse) if c == k] for k, n in enumerate(coarse_names)}
    return Hierarchy(classes, tasks, name)


def _rng(a: int, b: int) -> list[int]:
    return list(range(a, b + 1))


def builtin(name: str, classes: list[str] | None = None) -> Hierarchy:
    """A built-in hierarchy; ``classes`` (from the data set) replace placeholder class names."""
    if name == "cifar100":
        return from_coarse_labels(classes or CIFAR100_CLASSES, CIFAR100_COARSE, CIFAR100_SUPERCLASSES, name)
    if name == "fashion-mnist":
        tasks = {"light_tops": [0, 6], "warm_tops": [2, 4], "bottoms_dresses": [1, 3],
                 "sneakers_sandals": [5, 7], "boots_bags": [9, 8]}
        return Hierarchy(classes or FASHION_MNIST_CLASSES, tasks, name)
    if name == "tinyimagenet":
        tasks = {"arachnid": _rng(7, 10), "bird": [11, 20, 21, 22], "canine": _rng(24, 29),
                 "feline": _rng(30, 34), "ungulate": _rng(48, 53), "vertebrate_etc": _rng(0, 5)}
        return Hierarchy(classes or [f"class_{i:03d}" for i in range(200)], tasks, name)
    if name == "imagenet-birds":
        tasks = {"bird_passerine": _rng(10, 20), "bird_aquatic1": _rng(97, 100) + _rng(127, 134),
                 "bird_aquatic2": _rng(135, 146), "bird_Etc1": _rng(87, 96)}
        return Hierarchy(classes or [f"class_{i:04d}" for i in range(1000)], tasks, name)
    if name == "synthetic":
        from .data import SYNTHETIC_CLASSES, SYNTHETIC_TASKS

        return Hierarchy(classes or SYNTHETIC_CLASSES, SYNTHETIC_TASKS, name)
    raise UserError(f"unknown hierarchy {name!r}; built-ins: {', '.join(BUILTINS)}")


BUILTINS = ["cifar100", "fashion-mnist", "tinyimagenet", "imagenet-birds", "synthetic"]


def resolve(spec: str | None, default: str | None, classes: list[str] | None = None) -> Hierarchy:
    """``spec`` is a built-in name or a file path; without one, the data set's default hierarchy."""
    spec = spec or default
    if spec is None:
        raise UserError("this data set has no built-in hierarchy; pass --hierarchy FILE")
    if spec in BUILTINS:
        return builtin(spec, classes)
    return load_file(spec, classes)
