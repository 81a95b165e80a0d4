import pytest
import torch

from expertpool.nets import WRNExpert, WRNLibrary, count_params, create


def test_paper_sizes_cifar100():
    lib = WRNLibrary(16, 1, 3)
    assert count_params(lib) == 42_768
    assert lib(torch.zeros(2, 3, 32, 32)).shape == (2, 32, 16, 16)
    assert count_params(WRNExpert(5, 32, 16, 0.25)) == 12_309
    oracle = create({"arch": "wrn", "num_classes": 100, "depth": 40, "width": 4})
    assert 8.9e6 < count_params(oracle) < 9.0e6


def test_research_code_key_layout():
    keys = set(WRNLibrary(16, 1, 3).state_dict())
    assert {"conv1.weight", "block1.layer.0.bn1.weight", "block2.layer.0.convShortcut.weight",
            "block2.layer.1.conv2.weight"} <= keys
    assert "block1.layer.0.convShortcut.weight" not in keys  # 16 -> 16: identity shortcut
    ekeys = set(WRNExpert(5, 32).state_dict())
    assert {"block3.layer.0.convShortcut.weight", "bn1.running_var", "fc.weight", "fc.bias"} <= ekeys


def test_grey_any_size_and_first_stride():
    lib = WRNLibrary(16, 2, in_channels=1, first_stride=2)
    f = lib(torch.zeros(1, 1, 64, 64))
    assert f.shape == (1, 64, 16, 16)
    assert WRNExpert(3, 64)(f).shape == (1, 3)
    assert WRNExpert(3, 32)(WRNLibrary(10, 1, 1)(torch.zeros(4, 1, 28, 28))).shape == (4, 3)


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown architecture 'nope'"):
        create({"arch": "nope"})
    with pytest.raises(ValueError, match="6n\\+4"):
        WRNLibrary(depth=12)


def test_mobilenet_split_shapes():
    lib = create({"arch": "mobilenet_v2_library"})
    f = lib(torch.zeros(1, 3, 224, 224))
    assert f.shape == (1, 320, 7, 7)
    assert create({"arch": "mobilenet_v2_expert", "num_classes": 11}).eval()(f).shape == (1, 11)
