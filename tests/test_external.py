"""Your model, your data (issue 13): model specs through the real CLI, normalizer-free conversion of a
torchvision-style ResNet, npz data, block discovery for probes, and the run key's fingerprints."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli import cli
from torch import nn

from normlab.errors import NormlabError
from normlab.external import load_factory, spec_of
from normlab.layers import ScaledStdConv2d, to_normalizer_free
from normlab.layers.kinds import is_norm
from normlab.store import Store
from normlab.train import TrainConfig

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "my_models.py"
BAD_FACTORIES = '''
from torch import nn

def raises(num_classes=10):
    raise RuntimeError("out of coffee")

def not_a_module(num_classes=10):
    return {"weights": 1}

def three_classes():
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
'''




def write_images(path: Path, n_train: int = 128, n_test: int = 64, size: int = 8, seed: int = 0) -> Path:
    """4 classes of 3 x size x size images: Gaussian noise plus a class-specific bright channel/half."""
    rng = np.random.default_rng(seed)

    def make(n):
        y = rng.integers(0, 4, n)
        x = rng.normal(0, 0.5, (n, 3, size, size)).astype(np.float32)
        for c in range(4):
            x[y == c, c % 3, (c // 3) * (size // 2):(c // 3 + 1) * (size // 2), :] += 1.5
        return x, y

    (x_train, y_train), (x_test, y_test) = make(n_train), make(n_test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


@pytest.fixture
def user(tmp_path, monkeypatch):
    """A user's working folder: my_models.py (the README's torchvision-style ResNet), data.npz, bad.py."""
    shutil.copy(EXAMPLE, tmp_path / "my_models.py")
    (tmp_path / "bad.py").write_text(BAD_FACTORIES)
    write_images(tmp_path / "data.npz")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_compare_probe_and_nf_end_to_end_on_a_model_in_a_users_file(capsys, user):
    store = str(user / "runs.sqlite")
    common = ["--model", "my_models.py:resnet", "--dataset", "npz:data.npz"]
    code, out, err = cli(capsys, "compare", *common, "--norms", "bn,nf", "--batch-sizes", "32", "--lrs",
                         "0.4", "--seeds", "1", "--epochs", "2", "--lr-extensions", "0", "--width", "4",
                         "--depth", "10", "--workers", "1", "--store", store, "--no-report",
                         "--json")  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert report["schema"] == 1 and report["statuses"] == {"finished": 2, "diverged": 0, "failed": 0}
    rows = {row["norm"]: row for row in report["rows"]}
    assert set(rows) == {"bn", "nf"} and all(0.25 < rows[n]["accuracies"][0] <= 1.0 for n in rows)
    with Store(store) as db:
        nf_run = next(r for r in db.runs() if r.config["norm"] == "nf")
        assert nf_run.config["agc_clip"] == 0.02 and nf_run.config["model"] == "my_models.py:resnet"

    code, out, err = cli(capsys, "probe", "landscape", *common, "--batch-size", "16", "--options",
                         '{"num_points": 3}', "--json")
    assert code == 0, err
    landscape = json.loads(out)
    assert landscape["schema"] == 1 and len(landscape["losses"]) == 3 and landscape["grad_norm"] > 0

    code, out, err = cli(capsys, "probe", "residual_scale", *common, "--norm", "nf", "--batch-size", "8",
                         "--json")  # fmt: skip
    assert code == 0, err
    ratios = json.loads(out)["ratio"]
    assert list(ratios)[:2] == ["layer1.0", "layer1.1"] and set(ratios.values()) == {0.0}  # SkipInit at init

    code, out, err = cli(capsys, "train", *common, "--norm", "nf", "--agc-clip", "0.02", "--steps", "4",
                         "--batch-size", "16", "--model-options", '{"width": 4, "depth": 10}',
                         "--no-progress", "--store", store, "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["status"] == "finished"


@pytest.mark.parametrize(
    "model, message",
    [
        ("nowhere.py:resnet", "error: model spec 'nowhere.py:resnet': file 'nowhere.py' does not exist"),
        ("no_such_pkg.models:resnet", "error: model spec 'no_such_pkg.models:resnet': no module named "
                                      "'no_such_pkg'"),
        ("my_models.py:resnet50", "error: model spec 'my_models.py:resnet50': my_models.py has no attribute"),
        ("bad.py:raises", "error: model factory 'bad.py:raises' raised RuntimeError: out of coffee"),
        ("bad.py:not_a_module", "error: model factory 'bad.py:not_a_module' returned a dict, not a "
                                "torch.nn.Module"),
        ("bad.py:three_classes", "error: model 'bad.py:three_classes' outputs (2, 3) for input (2, 3, 8, 8), "
                                 "expected (2, 4)"),
        ("my_models.py", "error: model spec"),
    ],
)  # fmt: skip
def test_bad_model_is_one_line_exit_2_and_store_untouched(capsys, user, model, message):
    store = user / "runs.sqlite"
    Store(store).close()
    before = store.read_bytes()
    for command in (["train", "--steps", "2", "--no-progress"], ["compare", "--seeds", "1", "--no-report"]):
        code, out, err = cli(capsys, *command, "--model", model, "--dataset", "npz:data.npz",
                             "--store", str(store))  # fmt: skip
        if model == "my_models.py":  # a registered-name lookup: no colon, so not a spec
            assert code == 2 and err.startswith("error: unknown model 'my_models.py'")
            continue
        assert code == 2 and out == "" and "Traceback" not in err
        assert err.startswith(message) and err.count("\n") == 1, err
    assert store.read_bytes() == before


def test_code_named_in_a_checkpoint_or_config_file_is_not_imported(capsys, user):
    """A checkpoint / config file naming user code must not import it unless --model names it too."""
    from normlab.train import Trainer

    (user / "evil.py").write_text("import pathlib\npathlib.Path('imported').write_text('yes')\n"
                                  "def resnet(num_classes=10):\n    raise SystemExit\n")
    config = TrainConfig(model="my_models.py:resnet", dataset="npz:data.npz", steps=1, batch_size=16,
                         model_options={"width": 4, "depth": 10}, checkpoint_dir=str(user / "ck"))
    checkpoint = Trainer(config, progress=False).save_checkpoint()
    state = torch.load(checkpoint, weights_only=True)
    state["config"]["model"] = "evil.py:resnet"
    torch.save(state, user / "evil.pt")
    code, _, err = cli(capsys, "probe", "landscape", "--checkpoint", str(user / "evil.pt"))
    assert code == 2 and err.startswith(f"error: checkpoint {str(user / 'evil.pt')!r} names model code "
                                        "'evil.py:resnet'; normlab imports user code only when")
    (user / "run.toml").write_text('model = "evil.py:resnet"\ndataset = "npz:data.npz"\nsteps = 1\n')
    code, _, err = cli(capsys, "train", "--config", "run.toml", "--store", str(user / "s.sqlite"))
    assert code == 2 and "add --model evil.py:resnet" in err
    assert not (user / "imported").exists() and not (user / "s.sqlite").exists()
    # The checkpoint of a trusted spec loads when --model names it (and --dataset the data file it names).
    argv = ["probe", "landscape", "--checkpoint", str(checkpoint), "--model", "my_models.py:resnet",
            "--batch-size", "8", "--options", '{"num_points": 2}', "--json"]
    code, out, _ = cli(capsys, *argv)
    assert code == 2 and "sets dataset 'npz:data.npz'; normlab reads and writes only where" in out
    code, out, err = cli(capsys, *argv, "--dataset", "npz:data.npz")
    assert code == 0, err


def _spp_model(skip_gain_init: float) -> nn.Module:
    torch.manual_seed(0)
    return to_normalizer_free(load_factory(f"{EXAMPLE}:resnet")(width=32), skip_gain_init=skip_gain_init)


def test_nf_torchvision_resnet_keeps_the_nf_variance_schedule_at_init():
    """Brock et al. 2021a Fig. 2 / Sec. 4 on Gaussian input (skip gain 1, alpha 0.2): within a stage the
    block output variance grows by alpha^2 * Var(branch) (~alpha^2); at each transition it resets to
    ~1 + alpha^2 (below the last block's); with SkipInit's zero gain every block is the identity at init."""
    from normlab.probes import signal_propagation

    alpha2 = 0.2**2
    model = _spp_model(1.0)
    assert not any(is_norm(m) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(isinstance(c, ScaledStdConv2d) for c in convs) and convs[0].gamma == 1.0
    assert {c.gamma for c in convs[1:]} == {1.7139588594436646}  # relu's gamma
    assert type(model.fc) is nn.Linear and model.fc.weight.abs().sum() == 0
    betas = [b.preact.beta for n, b in model.named_modules() if hasattr(b, "preact")]
    # layer1.0 has no projection (64 -> 64): the variance grows into layer2.0; each stage's first block
    # projects, so the next block expects 1 + alpha^2.
    expected = [1.0, 1 + alpha2] + [1 + 2 * alpha2, 1 + alpha2] * 3
    assert betas == pytest.approx([v**-0.5 for v in expected])

    spp = signal_propagation(model, input_shape=(3, 32, 32), batch_size=32)
    var, res = spp.avg_var, spp.res_avg_var
    assert var["maxpool"] == pytest.approx(1.0, abs=0.06)  # stem: Scaled WS conv with gamma 1 on N(0, 1)
    names = list(var)
    for prev, block in zip(names, names[1:], strict=False):
        growth = var[block] - var[prev]
        if block in ("layer2.0", "layer3.0", "layer4.0"):
            assert growth < 0, (block, growth)  # reset by the projection shortcut
        else:
            assert growth == pytest.approx(alpha2 * res[block], abs=0.015), block
            if not block.startswith("layer4"):  # 4x4 maps: zero padding halves the branch variance there
                assert 0.5 * alpha2 < growth < 1.5 * alpha2, block
    assert var["layer2.0"] == pytest.approx(1 + alpha2, abs=0.08)

    identity = signal_propagation(_spp_model(0.0), input_shape=(3, 32, 32), batch_size=32).avg_var
    assert identity["layer1.0"] == pytest.approx(identity["maxpool"], rel=1e-6)
    assert identity["layer1.1"] == pytest.approx(identity["layer1.0"], rel=1e-6)


def test_nf_torchvision_resnet_trains_with_agc_on_a_small_image_set(tmp_path):
    from normlab.train import train_model

    data = write_images(tmp_path / "images.npz", n_train=256, n_test=128)
    config = TrainConfig(model=f"{EXAMPLE}:resnet", norm="nf", agc_clip=0.02, dataset=f"npz:{data}",
                         model_options={"width": 8, "depth": 10}, batch_size=32, steps=40, lr=0.2,
                         log_every=1, eval_train_samples=128)  # fmt: skip
    output = train_model(config, progress=False)
    result, model = output.result, output.model
    assert result.status == "finished" and not model.training
    assert result.final_train_loss < 0.5 * np.log(4)  # from ln 4 = 1.386 at init (zero classifier)
    assert result.final_test_acc > 0.8
    with torch.no_grad():
        x_test = torch.from_numpy(np.load(data)["x_test"])
        y_test = torch.from_numpy(np.load(data)["y_test"])
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy == pytest.approx(result.final_test_acc)


def test_run_key_fingerprints_retrain_changed_model_and_data_and_reuse_unchanged(tmp_path):
    """Through run_sweep with a real store: same code and data -> reused; a model whose output is multiplied
    by 0 -> retrained (the stale hit of the issue); changed arrays -> retrained; another image folder with
    the same settings -> another key."""
    from normlab.sweep import run_sweep

    shutil.copy(EXAMPLE, tmp_path / "my_models.py")
    data = write_images(tmp_path / "data.npz")
    config = TrainConfig(model=f"{tmp_path}/my_models.py:resnet", dataset=f"npz:{data}", steps=2,
                         batch_size=16, model_options={"width": 4, "depth": 10}, eval_train_samples=32)
    with Store(tmp_path / "runs.sqlite") as store:
        first = run_sweep([config], store)[0]
        again = run_sweep([config], store)[0]
        assert again.run_id == first.run_id and len(store.runs()) == 1

        source = (tmp_path / "my_models.py").read_text()
        (tmp_path / "my_models.py").write_text(
            source.replace("return self.fc(", "return 0 * self.fc(")
        )
        zeroed = run_sweep([config], store)[0]
        assert zeroed.run_id != first.run_id and zeroed.final_test_loss == pytest.approx(np.log(4), abs=1e-6)

        write_images(data, seed=1)
        new_data = run_sweep([config], store)[0]
        assert new_data.run_id not in (first.run_id, zeroed.run_id) and len(store.runs()) == 3

    for name in ("a", "b"):
        (tmp_path / name / "train" / "cat").mkdir(parents=True)
        (tmp_path / name / "train" / "cat" / "0.png").write_bytes(b"x" * (1 if name == "a" else 2))
    keys = {TrainConfig(dataset="imagefolder", data_root=str(tmp_path / n)).key() for n in ("a", "b")}
    assert len(keys) == 2
    assert TrainConfig(dataset="mnist1d", data_root="/x").key() == TrainConfig(dataset="mnist1d").key()


def test_a_factory_from_python_is_kept_as_its_spec():
    factory = load_factory(f"{EXAMPLE}:resnet")
    assert spec_of(factory) == f"{EXAMPLE}:resnet"
    assert TrainConfig(model=factory).model == f"{EXAMPLE}:resnet"
    assert TrainConfig(model=spec_of).model == "normlab.external.spec:spec_of"
    with pytest.raises(NormlabError, match="is a lambda or local function"):
        TrainConfig(model=lambda: nn.Linear(1, 1))


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x_train": np.zeros((4, 3))}, "lacks array(s) y_train, x_test, y_test"),
        ({"x_test": np.zeros((4, 2))}, "x_train examples have shape (3,) but x_test (2,)"),
        ({"y_train": np.zeros(5, dtype=np.int64)}, "y_train has shape (5,) but x_train has 4 examples"),
        ({"y_train": np.array([0, 1, -1, 0])}, "y_train has a negative label -1"),
        ({"x_train": np.full((4, 3), np.nan)}, "x_train holds NaN or inf"),
        ({"x_train": np.zeros((4,))}, "x_train has shape (4,); expected (N, D), (N, C, L) or (N, C, H, W)"),
        ({"y_test": np.zeros(2, dtype=np.float32)}, "y_train/y_test have dtypes int64/float32"),
    ],
)
def test_npz_validation_is_one_line(tmp_path, arrays, message):
    from normlab.data import load_dataset

    valid = {"x_train": np.zeros((4, 3), np.float32), "y_train": np.array([0, 1, 2, 1]),
             "x_test": np.zeros((2, 3), np.float32), "y_test": np.array([1, 0])}  # fmt: skip
    if "x_train" in arrays and arrays["x_train"].shape == (4, 3) and not np.isnan(arrays["x_train"]).any():
        valid = arrays  # the "lacks arrays" case
    else:
        valid.update(arrays)
    np.savez(tmp_path / "d.npz", **valid)
    with pytest.raises(NormlabError) as info:
        load_dataset(f"npz:{tmp_path / 'd.npz'}")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_npz_dataset_fields_and_contiguous_images(tmp_path):
    from normlab.data import Dataset, load_dataset

    x = np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4)
    np.savez(tmp_path / "u8.npz", x_train=x, y_train=np.array([0, 2]), x_test=x, y_test=np.array([1, 0]))
    data = load_dataset(f"npz:{tmp_path / 'u8.npz'}")
    assert (data.num_classes, data.in_channels, data.dims, data.input_shape) == (3, 3, 2, (3, 4, 4))
    assert data.x_train.dtype == torch.float32 and data.x_train.max().item() == pytest.approx(95 / 255)
    channels_last = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    assert not channels_last.is_contiguous()
    labels = torch.zeros(4, dtype=torch.long)
    wrapped = Dataset(channels_last, labels, channels_last, labels, 2, 3, 2, "classification", (3, 5, 5), "t")
    assert wrapped.x_train.is_contiguous() and wrapped.x_test.is_contiguous()


def test_residual_scale_on_a_torchvision_block_matches_hand_computed_ratio():
    """ratio = std(bn2 output) / std(block input) for an identity-shortcut torchvision BasicBlock."""
    from normlab.probes import residual_scale

    torch.manual_seed(0)
    model = load_factory(f"{EXAMPLE}:resnet")(width=4, depth=10).eval()
    x = torch.randn(6, 3, 8, 8)
    result = residual_scale(model, x, mode="eval")
    assert list(result.ratio) == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    with torch.no_grad():
        stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        block = model.layer1[0]
        branch = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(stem)))))
    expected = branch.double().std(unbiased=False) / stem.double().std(unbiased=False)
    assert result.ratio["layer1.0"] == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(NormlabError, match="no module named 'layer9.0'"):
        residual_scale(model, x, mode="eval", blocks=["layer9.0"])
    with pytest.raises(NormlabError, match="residual_scale needs a residual model .* Sequential has none"):
        residual_scale(nn.Sequential(nn.Conv2d(3, 3, 1)), x)


def test_runs_export_with_per_step_metrics(capsys, tmp_path):
    store = str(tmp_path / "s.sqlite")
    code, _, err = cli(capsys, "train", "--steps", "4", "--log-every", "2", "--subset", "64", "--batch-size",
                       "16", "--width", "4", "--no-progress", "--store", store, "--json")  # fmt: skip
    assert code == 0, err
    code, out, _ = cli(capsys, "runs", "export", "--format", "json", "--metrics", "--store", store)
    record = json.loads(out)[0]
    assert record["schema"] == 1 and [s for s, _ in record["metrics"]["train/loss"]] == [2, 4]
    code, out, _ = cli(capsys, "runs", "export", "--format", "csv", "--metrics", "--store", store)
    rows = list(csv.DictReader(io.StringIO(out)))
    losses = [r for r in rows if r["name"] == "train/loss"]
    assert [r["step"] for r in losses] == ["2", "4"]
    assert float(losses[0]["value"]) == pytest.approx(record["metrics"]["train/loss"][0][1])


class _Images(torch.utils.data.Dataset):
    """4 classes of 3 x 8 x 8 images stored channels-last (non-contiguous items, as some loaders give)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 4, (n,), generator=g)
        x = torch.randn(n, 3, 8, 8, generator=g) * 0.5
        for c in range(4):
            x[self.y == c, c % 3, (c // 3) * 4 : (c // 3 + 1) * 4] += 1.5
        self.x = x.to(memory_format=torch.channels_last)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def test_torch_datasets_in_memory_and_streamed_through_a_dataloader_with_workers():
    from normlab.data import StreamingDataset, load_dataset, register_torch_data
    from normlab.train import train_model

    train_set, test_set = _Images(128, 0), _Images(64, 1)
    name = register_torch_data("t13_mem", train_set, test_set)
    data = load_dataset(name)
    assert (data.num_classes, data.in_channels, data.dims, data.input_shape) == (4, 3, 2, (3, 8, 8))
    assert data.x_train.is_contiguous() and torch.equal(data.x_train, train_set.x)
    assert torch.equal(data.y_test, test_set.y)

    streamed = register_torch_data("t13_stream", train_set, test_set, num_classes=4, stream=True,
                                   num_workers=2)
    assert isinstance(load_dataset(streamed), StreamingDataset)
    config = TrainConfig(model=f"{EXAMPLE}:resnet", dataset=streamed, steps=8, batch_size=16, lr=0.2,
                         model_options={"width": 4, "depth": 10}, eval_train_samples=32)  # fmt: skip
    output = train_model(config, progress=False)
    assert output.result.status == "finished" and output.result.steps == 8
    with torch.no_grad():  # the test metrics run over the whole test set through the loader
        accuracy = (output.model(test_set.x.contiguous()).argmax(1) == test_set.y).float().mean().item()
    assert output.result.final_test_acc == pytest.approx(accuracy)

    key = config.key()
    register_torch_data("t13_stream", _Images(128, 2), test_set, num_classes=4, stream=True)
    assert config.key() != key  # other data under the same name: another run key
    with pytest.raises(NormlabError, match="'torch:nope' is not registered in this process"):
        load_dataset("torch:nope")


def test_imagefolder_image_size_and_held_out_split(capsys, tmp_path):
    from PIL import Image

    from normlab.data import load_dataset

    for label in ("cat", "dog"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(5):
            pixels = np.full((10, 12, 3), 30 * i + (100 if label == "dog" else 0), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / label / f"{i}.png")
    data = load_dataset("imagefolder", root=tmp_path / "imgs", image_size=6, test_fraction=0.4)
    assert data.x_train.shape == (6, 3, 6, 6) and data.x_test.shape == (4, 3, 6, 6)
    assert data.y_test.tolist() == [0, 0, 1, 1] and len(set(data.meta["test_files"])) == 4
    again = load_dataset("imagefolder", root=tmp_path / "imgs", image_size=6, test_fraction=0.4, seed=5)
    assert again.meta["test_files"] == data.meta["test_files"]  # one test set for every run seed
    code, out, err = cli(capsys, "train", "--dataset", "imagefolder", "--data-root", str(tmp_path / "imgs"),
                         "--image-size", "6", "--test-fraction", "0.4", "--model", f"{EXAMPLE}:resnet",
                         "--model-options", '{"width": 4, "depth": 10}', "--batch-size", "3", "--steps", "2",
                         "--no-progress", "--store", str(tmp_path / "s.sqlite"), "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["config"]["image_size"] == 6
    with pytest.raises(NormlabError, match="test_fraction must be a number in"):
        load_dataset("imagefolder", root=tmp_path / "imgs", test_fraction=1.5)


class _TimmBottleneck(nn.Module):
    """timm's ResNet Bottleneck names: conv/bn 1-3, act1-3, drop_block, aa, downsample (no se/drop_path)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        width, out = planes, planes * 4
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1, self.act1 = nn.BatchNorm2d(width), nn.ReLU()
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2, self.drop_block, self.act2 = nn.BatchNorm2d(width), nn.Identity(), nn.ReLU()
        self.aa = nn.Identity()
        self.conv3, self.bn3, self.act3 = nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU()
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
                                            nn.Conv2d(inplanes, out, 1, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        return self.act3(self.bn3(self.conv3(x)) + shortcut)


class _TimmResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        self.layer1 = nn.Sequential(_TimmBottleneck(16, 8), _TimmBottleneck(32, 8))
        self.layer2 = nn.Sequential(_TimmBottleneck(32, 16, 2), _TimmBottleneck(64, 16))
        self.fc = nn.Linear(64, 5)

    def forward(self, x):
        x = self.layer2(self.layer1(self.act1(self.bn1(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


def test_timm_bottleneck_resnet_and_other_models_become_normalizer_free():
    from normlab.layers import ScaledStdLinear
    from normlab.probes import signal_propagation

    model = to_normalizer_free(_TimmResNet(), skip_gain_init=1.0)
    blocks = [m for m in model.modules() if hasattr(m, "preact")]
    # Bottleneck layer1.0 projects (16 -> 32 channels): the variance resets after it.
    assert [b.preact.beta for b in blocks] == pytest.approx([1.0, 1.04**-0.5, 1.08**-0.5, 1.04**-0.5])
    assert [b.projects for b in blocks] == [True, False, True, False]
    assert isinstance(blocks[2].shortcut[0], nn.AvgPool2d)
    assert isinstance(blocks[2].shortcut[1], ScaledStdConv2d)
    assert len(blocks[0].branch) == 5 and not any(is_norm(m) for m in model.modules())
    spp = signal_propagation(model, input_shape=(3, 16, 16), batch_size=16)
    assert list(spp.avg_var) == ["bn1", "layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    assert isinstance(model.act1, nn.Identity)  # the stem's activation: the first block's preact has it
    assert spp.avg_var["bn1"] == pytest.approx(1.0, abs=0.1)  # WS conv, gamma 1, on N(0, 1) input

    plain = to_normalizer_free(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GELU(), nn.Flatten(),
                                             nn.Linear(8 * 6 * 6, 16), nn.GELU(), nn.Linear(16, 4)))
    assert isinstance(plain[0], ScaledStdConv2d) and plain[0].gamma == 1.0
    assert isinstance(plain[1], nn.Identity)
    assert isinstance(plain[4], ScaledStdLinear) and plain[4].gamma == 1.7015043497085571  # gelu's gamma
    assert type(plain[6]) is nn.Linear and plain[6].weight.abs().sum() == 0  # the classifier: plain, zeroed
    with pytest.raises(NormlabError, match="uses several activations"):
        to_normalizer_free(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(), nn.Conv2d(3, 3, 1), nn.Tanh()))


def test_a_streamed_run_resumes_from_its_checkpoint_bit_for_bit(tmp_path):
    from normlab.data import register_torch_data
    from normlab.train import Trainer

    name = register_torch_data("t13_resume", _Images(64, 0), _Images(32, 1), num_classes=4, stream=True)
    config = TrainConfig(model=f"{EXAMPLE}:resnet", dataset=name, steps=10, batch_size=16, lr=0.1,
                         model_options={"width": 4, "depth": 10}, eval_train_samples=16,
                         checkpoint_dir=str(tmp_path), checkpoint_every=6)  # fmt: skip
    straight = Trainer(config, progress=False)
    straight.fit()

    def stop(ctx):
        if ctx.step == 7:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        Trainer(config, callbacks=[stop], progress=False).fit()  # checkpoint at step 6 (epoch 1, batch 2)
    resumed = Trainer(config, progress=False, resume=True)
    assert resumed.step == 6
    resumed.fit()
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)

    # Peeking at the next streamed batch (ICS and landscape probes do) loads it once and serves it next;
    # the run and a resume from a checkpoint written after a peek train the same.
    seen, peeked = {}, {}

    def peek(ctx):
        seen[ctx.step], peeked[ctx.step] = ctx.batch, ctx.next_batch()
        if ctx.step == 7 and not peeked.get("interrupted"):
            peeked["interrupted"] = True
            raise RuntimeError("interrupted after a peek")

    with pytest.raises(RuntimeError, match="interrupted after a peek"):
        Trainer(config, callbacks=[peek], progress=False).fit()
    watched = Trainer(config, callbacks=[peek], progress=False, resume=True)
    watched.fit()
    for a, b in zip(straight.model.parameters(), watched.model.parameters(), strict=True):
        assert torch.equal(a, b)
    for step in range(7, 10):
        assert torch.equal(peeked[step][0], seen[step + 1][0])


USER_1D = '''
from torch import nn


def net(num_classes=10, in_channels=1):
    return nn.Sequential(
        nn.Conv1d(in_channels, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(),
        nn.AdaptiveAvgPool1d(4), nn.Flatten(), nn.Linear(32, num_classes),
    )
'''


def test_run_study_trains_the_users_model_and_depth_sweeps_refuse_it(tmp_path):
    from normlab.store import Store
    from normlab.studies import run_study

    file = tmp_path / "user_1d.py"
    file.write_text(USER_1D)
    spec = f"{file}:net"
    run_study("large-batch", scale="tiny", seeds=1, out=tmp_path / "out", model=spec)
    with Store(tmp_path / "out" / "large-batch" / "runs.sqlite", readonly=True) as store:
        runs = store.runs()
    assert runs and {r.config["model"] for r in runs} == {spec}
    assert {r.config["norm"] for r in runs} == {"bn", "nf"}  # nf with and without AGC: the net converted
    refused = "study mean-shift sweeps the depth of its own ResNets; it does not take a user model"
    with pytest.raises(NormlabError, match=refused):
        run_study("mean-shift", scale="tiny", seeds=1, out=tmp_path / "out", model=spec)
