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


def test_networks_built_for_loading_skip_only_their_random_init():
    import threading

    from expertpool.nets import create, weights_to_be_loaded

    cfg = {"arch": "wrn_expert", "num_classes": 3, "in_channels": 8, "depth": 10, "width": 0.25}
    torch.manual_seed(0)
    reference = create(cfg)
    seen_in_thread = {}
    with weights_to_be_loaded():
        net = create(cfg)
        # context-local: another thread building a network meanwhile still initializes it
        t = threading.Thread(target=lambda: seen_in_thread.update(net=(torch.manual_seed(0), create(cfg))[1]))
        t.start()
        t.join()
    net.load_state_dict(reference.state_dict())  # strict: every tensor is overwritten
    for k, v in reference.state_dict().items():
        assert torch.equal(net.state_dict()[k], v), k
        assert torch.equal(seen_in_thread["net"].state_dict()[k], v), k
    torch.manual_seed(0)  # the usual init is untouched outside the context (same random draws as before)
    for k, v in create(cfg).state_dict().items():
        assert torch.equal(v, reference.state_dict()[k]), k


def test_instantiate_equals_create_then_load_state_dict():
    from expertpool.nets import instantiate

    for cfg, shape in [({"arch": "wrn_library", "depth": 10, "width": 1, "in_channels": 1}, (2, 1, 12, 12)),
                       ({"arch": "wrn_expert", "num_classes": 3, "in_channels": 8, "depth": 10, "width": 0.25},
                        (2, 8, 6, 6)),
                       ({"arch": "mobilenet_v2_expert", "num_classes": 4, "in_channels": 16, "hidden": 8},
                        (2, 16, 3, 3))]:
        torch.manual_seed(0)
        reference = create(cfg)
        for m in reference.modules():  # non-trivial BatchNorm statistics
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
        reference.eval()
        state = {k: v.clone() for k, v in reference.state_dict().items()}
        a, b = instantiate(cfg, state), instantiate(cfg, state)
        assert not a.training and type(a) is type(reference)
        assert [(n, type(m)) for n, m in a.named_modules()] == [(n, type(m)) for n, m in reference.named_modules()]
        x = torch.randn(*shape)
        assert torch.equal(a(x), reference(x))
        for k, v in reference.state_dict().items():
            assert torch.equal(a.state_dict()[k], v), k
        assert all(p.requires_grad for p in a.parameters())
        # two instances (and the state dict they came from) share nothing: weights, mode, hooks
        next(a.parameters()).data.add_(1.0)
        assert torch.equal(b(x), reference(x)) and torch.equal(next(iter(state.values())), next(iter(reference.state_dict().values())))
        a.train()
        assert not b.training and not any(m.training for m in b.modules())
        calls = []
        a.register_forward_hook(lambda *args: calls.append(1))
        b(x)
        assert calls == []
        a(x)
        assert calls == [1]


def test_instantiate_with_a_foreign_state_dict_fails_as_load_state_dict_does():
    from expertpool.nets import instantiate

    cfg = {"arch": "wrn_expert", "num_classes": 3, "in_channels": 8, "depth": 10, "width": 0.25}
    state = create(cfg).state_dict()
    with pytest.raises(RuntimeError, match="Missing key"):
        instantiate(cfg, {k: v for k, v in state.items() if k != "fc.bias"})
    with pytest.raises(RuntimeError, match="size mismatch"):
        instantiate(cfg, {**state, "fc.weight": torch.zeros(4, 16)})
