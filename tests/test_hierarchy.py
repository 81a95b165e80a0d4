import json

import pytest

from expertpool.errors import UserError
from expertpool.hierarchy import (BUILTINS, CIFAR100_CLASSES, Hierarchy, builtin, load_file, parse)


def test_cifar100_superclasses_match_the_paper():
    h = builtin("cifar100")
    assert len(h.classes) == 100 and len(h.tasks) == 20
    assert all(len(c) == 5 for c in h.tasks.values())
    paper = {"large_omnivores_and_herbivores": [15, 19, 21, 31, 38], "medium_mammals": [34, 63, 64, 66, 75],
             "people": [2, 11, 35, 46, 98], "small_mammals": [36, 50, 65, 74, 80],
             "vehicles_1": [8, 13, 48, 58, 90], "vehicles_2": [41, 69, 81, 85, 89]}
    for name, ids in paper.items():
        assert h.tasks[name] == ids
    assert [CIFAR100_CLASSES[i] for i in h.tasks["people"]] == ["baby", "boy", "girl", "man", "woman"]


@pytest.mark.parametrize("name", BUILTINS)
def test_builtins_are_valid(name):
    h = builtin(name)
    assert h.tasks and all(h.tasks.values())


def test_fashion_mnist_grouping():
    h = builtin("fashion-mnist")
    assert h.tasks == {"light_tops": [0, 6], "warm_tops": [2, 4], "bottoms_dresses": [1, 3],
                       "sneakers_sandals": [5, 7], "boots_bags": [9, 8]}


def test_tinyimagenet_and_imagenet_groups():
    assert builtin("tinyimagenet").tasks["canine"] == [24, 25, 26, 27, 28, 29]
    assert builtin("imagenet-birds").tasks["bird_aquatic1"] == [97, 98, 99, 100, 127, 128, 129, 130, 131, 132, 133, 134]


@pytest.mark.parametrize("tasks, message", [
    ({"a": [0, 1], "b": [1, 2]}, "also in task 'a'"),
    ({"a": [0, 9]}, "unknown class 9"),
    ({"a": []}, "task 'a' is empty"),
    ({"a": [0, 0]}, "twice"),
])
def test_validation_errors(tasks, message):
    with pytest.raises(UserError, match=message):
        Hierarchy(["c0", "c1", "c2"], tasks)


def test_user_file_with_names_and_indices(tmp_path):
    f = tmp_path / "h.json"
    f.write_text(json.dumps({"classes": ["cat", "dog", "car", "bus"],
                             "tasks": [{"name": "pets", "classes": ["dog", "cat"]},
                                       {"name": "vehicles", "classes": [2, 3]}]}))
    h = load_file(f)
    assert h.tasks == {"pets": [1, 0], "vehicles": [2, 3]}


def test_user_yaml_short_form(tmp_path):
    f = tmp_path / "h.yaml"
    f.write_text("tasks:\n  pets: [cat, dog]\n  vehicles: [car]\n")
    h = load_file(f, classes=["cat", "dog", "car"])
    assert h.tasks == {"pets": [0, 1], "vehicles": [2]}


def test_user_file_errors(tmp_path):
    with pytest.raises(UserError, match="duplicate task name 'a'"):
        parse({"classes": ["x", "y"], "tasks": [{"name": "a", "classes": ["x"]}, {"name": "a", "classes": ["y"]}]})
    with pytest.raises(UserError, match="unknown class 'z'"):
        parse({"classes": ["x", "y"], "tasks": {"a": ["z"]}})
    with pytest.raises(UserError, match="does not exist"):
        load_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="cannot parse"):
        load_file(bad)
