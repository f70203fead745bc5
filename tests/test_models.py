"""oni.models: the paper's MLP (and that oni.shapley takes its first-layer path on it), the
seeded initialisation, and model files: round trip, atomic saves, and clear errors on
missing, corrupt or mismatched files."""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import oni
from oni import models
from oni.models import MLP, PAPER_HIDDEN, build_model, init_parameters_, load_model, save_model
from oni.shapley import _split_first_linear
from helpers import drop_first_bias, swap_in_tanh


def _linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[key], sb[key]) for key in sa)


@pytest.fixture
def small():
    return init_parameters_(MLP(6, 3, (8, 5)), seed=1).eval()


@pytest.fixture(params=["state_dict", "safetensors"])
def weights_format(request, monkeypatch):
    """Runs a test with each weights format (safetensors only where it is installed)."""
    if request.param == "safetensors":
        pytest.importorskip("safetensors")
        return models.SAFETENSORS_FILE
    monkeypatch.setattr(models, "_safetensors", lambda: None)
    return models.STATE_DICT_FILE


# ============================================================================ MLP

def test_mlp_is_the_papers_network_by_default():
    model = MLP(600, 100)
    widths = [(m.in_features, m.out_features) for m in _linears(model)]
    assert widths == [(600, 1024), (1024, 512), (512, 256), (256, 128), (128, 100)]
    kinds = [type(m) for m in model]
    assert kinds == [nn.Linear, nn.ReLU] * 4 + [nn.Linear]
    assert model.hidden == PAPER_HIDDEN == (1024, 512, 256, 128)
    assert model.config == {"kind": "mlp", "d": 600, "k": 100, "hidden": [1024, 512, 256, 128]}
    json.dumps(model.config)  # JSON-able


def test_mlp_widths_are_configurable():
    model = MLP(7, 2, hidden=[5])
    assert [(m.in_features, m.out_features) for m in _linears(model)] == [(7, 5), (5, 2)]
    linear = MLP(7, 2, hidden=())
    assert len(linear) == 1 and isinstance(linear[0], nn.Linear)
    assert linear(torch.zeros(3, 7)).shape == (3, 2)


def test_mlp_keeps_the_sequential_contract_shapley_relies_on(small):
    assert isinstance(small, nn.Sequential) and isinstance(small[0], nn.Linear)
    assert type(small).forward is nn.Sequential.forward
    split = _split_first_linear(small)
    assert split is not None and split[0] is small[0]
    tail = small[1:]
    assert type(tail) is nn.Sequential and len(tail) == len(small) - 1
    x = torch.randn(4, 6)
    assert torch.equal(tail(small[0](x)), small(x))


def test_shapley_values_run_on_the_mlp(small):
    x = torch.rand(5, 6, generator=torch.Generator().manual_seed(0))
    res = oni.shapley_values(small, x, n_permutations=8, seed=0)
    assert res.values.shape == (5, 6)
    # efficiency: sum_i phi_i = v(N) - v(empty), on every walk
    torch.testing.assert_close(res.values.sum(1), res.fx - res.f_baseline, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("args, error, match", [
    ((0, 3), ValueError, "d must be >= 1"),
    ((6, 0), ValueError, "k must be >= 1"),
    ((6.0, 3), TypeError, "d must be an int"),
    ((6, True), TypeError, "k must be an int"),
    ((6, 3, [8, 0]), ValueError, r"hidden\[1\] must be >= 1"),
    ((6, 3, "128"), TypeError, "hidden must be a sequence"),
    ((6, 3, 128), TypeError, "hidden must be a sequence"),
    ((6, 3, [8.5]), TypeError, r"hidden\[0\] must be an int"),
])
def test_mlp_rejects_bad_widths(args, error, match):
    with pytest.raises(error, match=match):
        MLP(*args)


# ============================================================================ build_model

def test_build_model_rebuilds_the_architecture(small):
    rebuilt = build_model(small.config)
    assert isinstance(rebuilt, MLP) and rebuilt.config == small.config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in small.state_dict().items()}


@pytest.mark.parametrize("config, error, match", [
    ([("kind", "mlp")], TypeError, "config must be a dict"),
    ({"kind": "cnn", "d": 2, "k": 2, "hidden": []}, ValueError, r"config\['kind'\]"),
    ({"d": 2, "k": 2, "hidden": []}, ValueError, r"config\['kind'\]"),
    ({"kind": "mlp", "d": 2, "hidden": []}, ValueError, r"missing \['k'\]"),
    ({"kind": "mlp", "d": 2, "k": 2, "hidden": [], "act": "relu"}, ValueError,
     r"unknown \['act'\]"),
    ({"kind": "mlp", "d": -1, "k": 2, "hidden": []}, ValueError, "d must be >= 1"),
])
def test_build_model_rejects_bad_configs(config, error, match):
    with pytest.raises(error, match=match):
        build_model(config)


# ============================================================================ init_parameters_

def test_init_is_deterministic_per_seed_and_leaves_the_global_rng_alone():
    a, b, c = MLP(6, 3, (8, 5)), MLP(6, 3, (8, 5)), MLP(6, 3, (8, 5))  # global-RNG init
    state = torch.get_rng_state()
    init_parameters_(a, 7)
    init_parameters_(b, 7)
    init_parameters_(c, 8)
    assert torch.equal(torch.get_rng_state(), state)
    assert _same_weights(a, b)
    assert not any(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_init_follows_the_documented_convention():
    """weight then bias of each Linear, in module order, uniform_(-b, b) from one generator
    seeded with the seed, b = 1/sqrt(in_features): what a batched trainer reproduces."""
    model = init_parameters_(MLP(6, 3, (8, 5)), 11)
    gen = torch.Generator().manual_seed(11)
    for lin in _linears(model):
        b = 1 / math.sqrt(lin.in_features)
        for param in (lin.weight, lin.bias):
            expected = torch.empty(param.shape).uniform_(-b, b, generator=gen)
            assert torch.equal(param, expected)


def test_init_has_pytorchs_default_distribution():
    model = init_parameters_(MLP(400, 300, ()), 3)
    w = model[0].weight.detach().double()
    bound = 1 / math.sqrt(400)
    assert w.abs().max() <= bound
    assert abs(w.mean()) < 0.01 * bound
    assert w.var().item() == pytest.approx(bound ** 2 / 3, rel=0.02)  # U(-b, b)


def test_init_returns_the_model_keeps_dtype_and_handles_nesting():
    nested = nn.Sequential(nn.Sequential(nn.Linear(4, 3, bias=False), nn.ReLU()),
                           nn.Linear(3, 2)).double()
    assert init_parameters_(nested, 0) is nested
    assert nested[0][0].weight.dtype == torch.float64
    again = init_parameters_(nn.Sequential(nn.Sequential(nn.Linear(4, 3, bias=False), nn.ReLU()),
                                           nn.Linear(3, 2)).double(), 0)
    assert _same_weights(nested, again)


def test_init_rejects_parameters_outside_linear_layers():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    with pytest.raises(TypeError, match=r"'1' \(BatchNorm1d\)"):
        init_parameters_(model, 0)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        init_parameters_(lambda z: z, 0)


@pytest.mark.parametrize("seed, error", [(-1, ValueError), (2 ** 63, ValueError),
                                         (1.0, TypeError), (None, TypeError)])
def test_init_rejects_bad_seeds(seed, error):
    with pytest.raises(error, match="seed"):
        init_parameters_(MLP(2, 2, ()), seed)


# ============================================================================ save / load

def test_save_load_round_trip(tmp_path, small, weights_format):
    path = save_model(small, tmp_path / "m", extra={"epochs": 3, "acc": [0.5, 0.75], "n": None})
    assert sorted(p.name for p in path.iterdir()) == sorted([models.CONFIG_FILE,
                                                             weights_format])
    loaded, extra = load_model(path)
    assert isinstance(loaded, MLP) and loaded.config == small.config
    assert not loaded.training
    assert _same_weights(loaded, small)
    x = torch.randn(9, 6)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))
    assert extra == {"epochs": 3, "acc": [0.5, 0.75], "n": None}
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary leftovers


def test_save_load_keeps_float64_and_empty_extra(tmp_path, weights_format):
    model = init_parameters_(MLP(3, 2, (4,)), 0).double()
    loaded, extra = load_model(save_model(model, str(tmp_path / "sub" / "m")))  # str, parents
    assert extra == {}
    assert loaded[0].weight.dtype == torch.float64 and _same_weights(loaded, model)


def test_weights_pt_is_a_plain_state_dict_loaded_weights_only(tmp_path, small, monkeypatch):
    monkeypatch.setattr(models, "_safetensors", lambda: None)
    path = save_model(small, tmp_path / "m")
    state = torch.load(path / models.STATE_DICT_FILE, weights_only=True)
    assert set(state) == set(small.state_dict())
    meta = json.loads((path / models.CONFIG_FILE).read_text())
    assert meta["format"] == "oni-model" and meta["config"] == small.config


def test_save_replaces_a_previous_model(tmp_path, small):
    path = tmp_path / "m"
    save_model(init_parameters_(MLP(6, 3, (4,)), 0), path, extra={"v": 1})
    save_model(small, path, extra={"v": 2})
    loaded, extra = load_model(path)
    assert extra == {"v": 2} and _same_weights(loaded, small)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_interrupted_save_keeps_the_previous_model(tmp_path, small, monkeypatch):
    path = tmp_path / "m"
    save_model(small, path, extra={"v": 1})
    real = models._write_durably

    def killed_at_the_config(target, data):
        if target.name == models.CONFIG_FILE:
            raise KeyboardInterrupt  # as if the process died mid-save
        real(target, data)

    monkeypatch.setattr(models, "_write_durably", killed_at_the_config)
    with pytest.raises(KeyboardInterrupt):
        save_model(init_parameters_(MLP(6, 3, (8, 5)), 99), path, extra={"v": 2})
    loaded, extra = load_model(path)
    assert extra == {"v": 1} and _same_weights(loaded, small)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_load_points_at_a_model_left_aside_by_an_interrupted_overwrite(tmp_path, small):
    save_model(small, tmp_path / "m")
    os.replace(tmp_path / "m", tmp_path / ".m.old-1234abcd")  # killed between the renames
    with pytest.raises(FileNotFoundError, match=r"no saved model at .*m; an interrupted "
                                                r"save_model left the previous model at "
                                                r".*\.m\.old-1234abcd"):
        load_model(tmp_path / "m")


def test_save_refuses_to_overwrite_other_files(tmp_path, small):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"refusing to overwrite .*notes.*todo.txt"):
        save_model(small, tmp_path / "notes")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        save_model(small, tmp_path / "file")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    # a user's own file that happens to bear a model file's name
    for name, text in ((models.CONFIG_FILE, "my notes"), (models.STATE_DICT_FILE, "mine")):
        (tmp_path / name).mkdir()
        (tmp_path / name / name).write_text(text)
        with pytest.raises(FileExistsError, match=r"are not a saved oni model's \(model\.json "
                                                  r"is missing or was not written by save_model"):
            save_model(small, tmp_path / name)
        assert (tmp_path / name / name).read_text() == text
    (tmp_path / "empty").mkdir()
    save_model(small, tmp_path / "empty")  # an empty directory is fine
    assert load_model(tmp_path / "empty")[0].config == small.config


@pytest.mark.parametrize("as_directory", [False, True])
def test_save_keeps_a_users_weights_file_beside_a_saved_model(tmp_path, small, as_directory):
    """A user's own weights.pt (file or directory) beside a safetensors model bore a model
    file's name, so a re-save deleted it without a word."""
    pytest.importorskip("safetensors")
    path = save_model(small, tmp_path / "m")
    mine = path / models.STATE_DICT_FILE
    if as_directory:
        mine.mkdir()
        (mine / "notes.txt").write_text("mine")
    else:
        mine.write_bytes(b"my training state")
    match = (r"its weights\.pt is a directory" if as_directory else
             r"it holds \['weights\.pt'\], which its model\.json does not name")
    with pytest.raises(FileExistsError, match=match):
        save_model(small, path)
    assert (mine / "notes.txt").read_text() == "mine" if as_directory else \
        mine.read_bytes() == b"my training state"
    assert load_model(path)[0].config == small.config  # the old save is untouched


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_save_refuses_a_fifo_or_directory_in_place_of_model_json(tmp_path, small):
    """A FIFO named model.json made save_model block reading it; a directory of that name
    is the user's."""
    path = save_model(small, tmp_path / "m")
    (path / models.CONFIG_FILE).unlink()
    os.mkfifo(path / models.CONFIG_FILE)
    with pytest.raises(FileExistsError, match=r"its model\.json is a FIFO"):
        save_model(small, path)
    (path / models.CONFIG_FILE).unlink()
    (path / models.CONFIG_FILE).mkdir()
    with pytest.raises(FileExistsError, match=r"its model\.json is a directory"):
        save_model(small, path)


def test_save_rejects_models_it_cannot_rebuild_and_bad_extra(tmp_path, small):
    with pytest.raises(TypeError, match="an MLP, with .config"):
        save_model(nn.Sequential(nn.Linear(2, 2)), tmp_path / "a")
    with pytest.raises(TypeError, match="extra must hold only JSON-able values"):
        save_model(small, tmp_path / "b", extra={"t": torch.zeros(1)})
    with pytest.raises(TypeError, match="extra's keys must be strings"):
        save_model(small, tmp_path / "c", extra={1: "one"})
    with pytest.raises(TypeError, match="extra must be a dict"):
        save_model(small, tmp_path / "d", extra=[1, 2])
    assert list(tmp_path.iterdir()) == []  # nothing written


class _Scaled(MLP):
    def forward(self, x):
        return super().forward(x) / 100


def _appended(model):
    model.append(nn.ReLU())


def _hooked(model):
    model[0].register_forward_hook(lambda module, args, out: out * 2)


def _patched(model):
    model.forward = lambda x: x


@pytest.mark.parametrize("change, match", [
    (swap_in_tanh, "layer '1' is a Tanh, not a ReLU"),
    (_appended, "it has 5 modules, its config's model 4"),
    (_hooked, "layer '0' has forward hooks"),
    (_patched, "the model has its own forward"),
    (drop_first_bias, r"parameters do not match its config .*: it lacks \['0\.bias'\]"),
])
def test_save_refuses_a_model_its_config_would_not_rebuild(tmp_path, change, match):
    """The weights fit the config, but the function does not: it used to be saved and reload
    as the plain MLP (probabilities off by up to 0.1)."""
    model = MLP(6, 3, (8,))
    change(model)
    with pytest.raises(ValueError, match=match):
        save_model(model, tmp_path / "m")
    with pytest.raises(ValueError, match="it is a _Scaled, not a plain MLP"):
        save_model(_Scaled(6, 3, (8,)), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []
    relu_in_place = MLP(6, 3, (8,))
    relu_in_place[1] = nn.ReLU(inplace=True)  # the same function
    save_model(relu_in_place, tmp_path / "m")


def test_save_to_dot_a_symlink_or_a_deeply_nested_file(tmp_path, small, monkeypatch):
    """"." failed with an OSError from the rename (a save replaces the directory: the
    working directory cannot be); a link was called "not a directory"; a model.json nested
    past the recursion limit raised RecursionError; NaN weights were saved, then refused
    by load_model."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for path in (".", "", "sub/..", here, tmp_path):
        with pytest.raises(FileExistsError, match="it is the working directory"):
            save_model(small, path)
    assert Path.cwd() == here and list(here.iterdir()) == []
    save_model(small, "m")
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(FileExistsError, match="it is a symbolic link"):
        save_model(small, tmp_path / "link")
    broken = MLP(4, 3, (5,))
    with torch.no_grad():
        broken[0].weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"model's parameter '0.weight'.*load_model would "
                                         r"refuse the saved file"):
        save_model(broken, here / "nan")
    assert not (here / "nan").exists()
    (here / "m" / models.CONFIG_FILE).write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match="nested too deeply"):
        load_model(here / "m")


def test_load_on_another_device_and_auto(tmp_path, small):
    path = save_model(small, tmp_path / "m")
    model, _ = load_model(path, device="auto")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert model[0].weight.device.type == expected
    with pytest.raises(ValueError, match="device='tpu9' is not a device"):
        load_model(path, device="tpu9")


# ----------------------------------------------------------------------------- bad files

@pytest.fixture
def saved(tmp_path, small, monkeypatch):
    monkeypatch.setattr(models, "_safetensors", lambda: None)
    return save_model(small, tmp_path / "m")


def _edit_meta(path: Path, **changes) -> None:
    meta = json.loads((path / models.CONFIG_FILE).read_text())
    meta.update(changes)
    (path / models.CONFIG_FILE).write_text(json.dumps(meta))


def test_load_missing_paths(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match=r"no saved model at .*nowhere$"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "f.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"f\.pt is not a saved model"):
        load_model(tmp_path / "f.pt")
    (saved / models.STATE_DICT_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"m/weights\.pt is missing"):
        load_model(saved)
    (saved / models.CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"m/model\.json is missing"):
        load_model(saved)


@pytest.mark.parametrize("kind", ["directory", "fifo"])
@pytest.mark.parametrize("name", [models.CONFIG_FILE, models.STATE_DICT_FILE])
def test_load_names_a_directory_or_fifo_in_place_of_a_model_file(saved, kind, name):
    """Both were reported as "missing"; a FIFO is refused without being read (no block)."""
    if kind == "fifo" and not hasattr(os, "mkfifo"):
        pytest.skip("needs FIFOs")
    (saved / name).unlink()
    os.mkfifo(saved / name) if kind == "fifo" else (saved / name).mkdir()
    shown = "a FIFO" if kind == "fifo" else "a directory"
    with pytest.raises(ValueError, match=rf"m/{re.escape(name)} is {shown}, not a regular "
                                         rf"file"):
        load_model(saved)


@pytest.mark.parametrize("path", [None, b"/tmp/m", 3])
def test_save_and_load_name_a_path_of_the_wrong_type(tmp_path, small, path):
    """pathlib's TypeError ("argument should be a str or an os.PathLike object ...") named
    no argument."""
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike, got "):
        save_model(small, path)
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike, got "):
        load_model(path)


def test_save_names_a_parent_that_is_a_file(tmp_path, small):
    """mkdir(parents=True) said only "[Errno 17] File exists" (or 20, further up)."""
    (tmp_path / "f").write_text("mine")
    for path in (tmp_path / "f" / "m", tmp_path / "f" / "a" / "b" / "m"):
        with pytest.raises(FileExistsError, match=rf"cannot save a model to {re.escape(str(path))}: "
                                                  rf".*/f is a file, not a directory"):
            save_model(small, path)
    assert (tmp_path / "f").read_text() == "mine"


def test_load_bounds_the_layer_count_of_a_corrupt_config(saved, small):
    """20,000 hidden layers took seconds to build and the error listed all 40,000 missing
    parameter names."""
    _edit_meta(saved, config={**small.config, "hidden": [3] * 20000})
    with pytest.raises(ValueError, match=r"hidden must have at most 100 layers, got 20000") \
            as info:
        load_model(saved)
    assert len(str(info.value)) < 400
    with pytest.raises(ValueError, match="at most 100 layers"):
        MLP(4, 2, [3] * 101)
    assert len(MLP(4, 2, [3] * 100)) == 201
    _edit_meta(saved, config={**small.config, "hidden": [3] * 100})
    with pytest.raises(ValueError, match=r"missing 196 \(\['10\.bias', '10\.weight', "
                                         r"'100\.bias', '100\.weight', \.\.\.\]\)") as info:
        load_model(saved)
    assert len(str(info.value)) < 600


def test_load_corrupt_json_names_the_file_and_line(saved):
    text = (saved / models.CONFIG_FILE).read_text()
    (saved / models.CONFIG_FILE).write_text(text[: len(text) // 2])  # truncated
    with pytest.raises(ValueError, match=r"m/model\.json, line \d+: not valid JSON"):
        load_model(saved)
    (saved / models.CONFIG_FILE).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=r"model\.json is not UTF-8"):
        load_model(saved)


@pytest.mark.parametrize("changes, match", [
    ({"format": "other"}, "is not an oni model file"),
    ({"version": 2}, "format version 2; this oni reads version 1"),
    ({"weights": "../../etc/passwd"}, r"\"weights\" must be"),
    ({"extra": [1]}, r"\"extra\" must be an object"),
    ({"config": {"kind": "mlp", "d": 6}}, r"bad \"config\""),
])
def test_load_rejects_bad_metadata(saved, changes, match):
    _edit_meta(saved, **changes)
    with pytest.raises(ValueError, match=match):
        load_model(saved)


def test_load_rejects_metadata_missing_fields(saved):
    meta = json.loads((saved / models.CONFIG_FILE).read_text())
    del meta["sha256"]
    (saved / models.CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"lacks the fields \['sha256'\]"):
        load_model(saved)


def test_load_detects_corrupt_weights(saved):
    weights = saved / models.STATE_DICT_FILE
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) - 100])  # truncated
    with pytest.raises(ValueError, match=r"m/weights\.pt is corrupt or does not belong to "
                                         r".*m/model\.json"):
        load_model(saved)
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0xFF
    weights.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="SHA-256 differs"):
        load_model(saved)


def _write_weights(path: Path, obj) -> None:
    """Replaces the weights with ``obj`` (torch.save) and records its checksum."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    (path / models.STATE_DICT_FILE).write_bytes(buffer.getvalue())
    _edit_meta(path, sha256=hashlib.sha256(buffer.getvalue()).hexdigest())


class Payload:
    """Any pickled object that is not plain tensors/containers."""


def test_load_mismatched_weights_name_both_files(saved, small):
    _edit_meta(saved, config={**small.config, "hidden": [8, 4]})
    with pytest.raises(ValueError, match=r"m/weights\.pt does not match the architecture in "
                                         r".*m/model\.json: .*wrong shapes \['2\.weight: "
                                         r"\(5, 8\) \(expected \(4, 8\)\)"):
        load_model(saved)


@pytest.mark.parametrize("width", [4 * 10 ** 12, 2 ** 63])
def test_load_checks_a_corrupt_configs_sizes_before_allocating(saved, small, width):
    """A config whose widths were corrupted meets the weights' shapes first: allocating its
    layers failed in the allocator (4e12 features: 80 TB); a width past oni's largest size
    is refused as such."""
    _edit_meta(saved, config={**small.config, "d": width})
    message = (rf"does not match the architecture in .*wrong shapes \['0\.weight: \(8, 6\) "
               rf"\(expected \(8, {width}\)\)" if width <= 2 ** 62 else
               rf"bad \"config\": invalid model config .*: d must be <= {2 ** 62}, got {width}")
    with pytest.raises(ValueError, match=message):
        load_model(saved)


def test_load_refuses_non_finite_weights(saved, small):
    """A model file holding a diverged training's weights loads as a NaN predictor: refused,
    naming the file and the tensor (save_model refuses to write one)."""
    state = {key: value.clone() for key, value in small.state_dict().items()}
    state["0.weight"][1, 2] = float("inf")
    _write_weights(saved, state)
    with pytest.raises(ValueError, match=r"weights\.\w+'s parameter '0\.weight' contains NaN "
                                         r"or Inf \(first at index \[1, 2\]\).*diverged"):
        load_model(saved)


def test_load_checks_state_dict_contents(saved, small):
    state = dict(small.state_dict())
    state.pop("4.bias")
    state["extra.weight"] = torch.zeros(1)
    _write_weights(saved, state)
    with pytest.raises(ValueError, match=r"missing \['4\.bias'\], unexpected \['extra\.weight'\]"):
        load_model(saved)
    _write_weights(saved, {key: v.long() for key, v in small.state_dict().items()})
    with pytest.raises(ValueError, match="one floating dtype"):
        load_model(saved)
    _write_weights(saved, [1, 2, 3])
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_model(saved)


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
@pytest.mark.parametrize("tamper, match", [
    (lambda t: t.to(torch.float8_e4m3fn), r"'0\.weight' is torch\.float8_e4m3fn"),
    (lambda t: t.to_sparse(), r"'0\.weight' is a torch\.sparse_coo tensor, not a dense one"),
    (lambda t: torch.empty(t.shape, device="meta"), r"'0\.weight' is on the meta device"),
])
def test_load_refuses_weights_of_other_dtypes_and_layouts(saved, small, tamper, match):
    """float8 weights passed the "one floating dtype" check, then failed inside torch
    ("aminmax_cpu" not implemented); sparse or meta tensors failed in load_state_dict."""
    _write_weights(saved, {key: tamper(v) for key, v in small.state_dict().items()})
    with pytest.raises(ValueError, match=r"m/weights\.pt must hold dense tensors of one "
                                         r"floating dtype .*: " + match):
        load_model(saved)


def test_load_refuses_weights_mixing_dtypes(saved, small):
    """save_model refuses such a model (the next test); load_model refuses such a file, by
    the same rule (oni._checks.mixed_dtypes, which training's check shares)."""
    state = dict(small.state_dict())
    state["0.weight"] = state["0.weight"].double()
    _write_weights(saved, state)
    with pytest.raises(ValueError, match=r"m/weights\.pt must hold dense tensors of one "
                                         r"floating dtype .*: it mixes \['torch\.float32', "
                                         r"'torch\.float64'\]$"):
        load_model(saved)


def test_save_refuses_weights_load_model_would_refuse(tmp_path, small, weights_format):
    """A model with one layer in float64 was saved, replacing a good save, and then
    load_model refused the file (mixed dtypes)."""
    path = save_model(small, tmp_path / "m", extra={"v": 1})
    mixed = init_parameters_(MLP(6, 3, (8, 5)), seed=2)
    mixed[0].double()
    with pytest.raises(ValueError, match=r"model's weights must be dense tensors of one "
                                         r"floating dtype .*: it mixes \['torch\.float32', "
                                         r"'torch\.float64'\]"):
        save_model(mixed, path, extra={"v": 2})
    loaded, extra = load_model(path)
    assert extra == {"v": 1} and _same_weights(loaded, small)
    for dtype in (torch.float16, torch.bfloat16):  # one dtype of those load_model reads
        model = init_parameters_(MLP(6, 3, (8, 5)), seed=3).to(dtype)
        loaded, _ = load_model(save_model(model, tmp_path / str(dtype)))
        assert loaded[0].weight.dtype == dtype and _same_weights(loaded, model)


def test_load_never_unpickles_objects(saved):
    _write_weights(saved, {"0.weight": Payload()})
    with pytest.raises(ValueError, match=r"weights\.pt is not a readable state dict .*"
                                         r"weights_only=True"):
        load_model(saved)


def test_safetensors_weights_without_the_package(saved, monkeypatch):
    (saved / models.STATE_DICT_FILE).rename(saved / models.SAFETENSORS_FILE)
    _edit_meta(saved, weights=models.SAFETENSORS_FILE)
    monkeypatch.setattr(models, "_safetensors", lambda: None)
    with pytest.raises(ImportError, match=r"m/weights\.safetensors is a safetensors file.*"
                                          r"pip install safetensors"):
        load_model(saved)
