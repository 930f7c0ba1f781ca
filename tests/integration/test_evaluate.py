"""Evaluation metrics: FID/KID against direct computations, SWD, the CLI, ranks, trained vs untrained."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from distributed_helpers import torchrun
from helpers import DIGITS_MODEL, TINY, completed_steps, read_stats, run_in_process, tiny_config
from scipy import linalg

from dcgan.config import ConfigError, load_config, metric_keys
from dcgan.evaluation.generators import LoadedGenerator, export_generator
from dcgan.evaluation.metrics import fid, kid, load_inception, swd
from dcgan.gan.models import Generator


def gaussian_features(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim))


def test_fid_and_kid_are_zero_for_a_set_against_itself_and_grow_with_a_shift() -> None:
    x = gaussian_features(600, 8, 0)
    assert abs(fid(x, x)) < 1e-6
    shift = np.full(8, 0.5)
    assert fid(x, x + shift) == pytest.approx(float(shift @ shift), abs=1e-6)  # same covariance: ||dmu||^2
    itself = kid(x, x, subsets=20, subset_size=300)
    small, large = kid(x, x + 0.25, subsets=20, subset_size=300), kid(x, x + 1.0, subsets=20, subset_size=300)
    assert abs(itself) < 0.2 * small and small < large / 10  # KID grows like the shift^4 here (cubic kernel)


def test_fid_matches_a_direct_numpy_scipy_computation() -> None:
    real, fake = gaussian_features(500, 6, 1), gaussian_features(400, 6, 2) * 1.3 + 0.2
    mu_r, mu_f = real.mean(0), fake.mean(0)
    s_r, s_f = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    direct = ((mu_r - mu_f) ** 2).sum() + np.trace(s_r + s_f - 2 * linalg.sqrtm(s_r @ s_f).real)
    assert fid(real, fake) == pytest.approx(direct, rel=1e-9)


@pytest.mark.slow  # long-running: SWD of 256 images three times (about 10 s on 2 cores)
def test_swd_is_near_zero_for_identical_sets_and_grows_with_blur() -> None:
    from dcgan.data.digits import digits_images

    real = digits_images(32)[:256]
    blurred = F.avg_pool2d(real.float(), 3, stride=1, padding=1).round().to(torch.uint8)
    very = F.avg_pool2d(real.float(), 7, stride=1, padding=3).round().to(torch.uint8)
    same, soft, softer = swd(real, real), swd(real, blurred), swd(real, very)
    assert same < 1e-6 < soft < softer


class TinyFeatures(torch.nn.Module):
    """Stands in for inception-2015-12-05.pt: same call signature, uint8 in, features out."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 5, stride=2)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = F.interpolate(x.float() / 127.5 - 1, size=(32, 32), mode="bilinear", align_corners=False)
        return torch.tanh(self.conv(x)).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def inception(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TorchScript file, the format of the FID network (inception-2015-12-05.pt) that load_inception reads;
    torch 2.14 deprecates torch.jit, which the file format still needs (dcgan.evaluation.metrics silences
    the notice of torch.jit.load likewise)."""
    path = tmp_path_factory.mktemp("net") / "features.pt"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
        torch.jit.script(TinyFeatures()).save(str(path))
    return path


def test_inception_loading_and_its_errors(inception: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    features = load_inception(str(inception))
    out = features(torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8))
    assert out.shape == (4, 16) and out.dtype == torch.float64
    monkeypatch.delenv("DCGAN_INCEPTION", raising=False)
    with pytest.raises(ConfigError, match="set DCGAN_INCEPTION"):
        load_inception("")
    monkeypatch.setenv("DCGAN_INCEPTION", str(inception))
    assert load_inception("")(torch.zeros(1, 3, 8, 8, dtype=torch.uint8)).shape == (1, 16)


@pytest.fixture(scope="module")
def untrained_generator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = load_config(TINY, list(DIGITS_MODEL)).model
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("untrained") / "g.pt"
    export_generator(LoadedGenerator(Generator(model), model, 0, torch.zeros(1, model.nz)), path)
    return path


def eval_cli(source: Path, out: Path, inception: Path, *, ranks: int = 1) -> dict[str, Any]:
    args = [
        "eval",
        str(source),
        "--data",
        "digits",
        "-n",
        "500",
        "--metrics",
        "fid,kid,swd,digits",
        "--inception",
        str(inception),
        "--out",
        str(out),
    ]
    if ranks == 1:
        run_in_process(*args)
    else:
        result = torchrun(ranks, *args)
        assert result.returncode == 0, result.stderr
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def untrained_eval(
    untrained_generator: Path, inception: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """`dcgan eval` of the untrained generator (four metrics, 500 images; with a cold cache): its protocol
    is one test's subject, its numbers another's baseline."""
    folder = tmp_path_factory.mktemp("untrained_eval")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DCGAN_CACHE", str(folder / "cache"))
        return eval_cli(untrained_generator, folder / "e.json", inception)


@pytest.mark.slow  # long-running: four metrics of 500 images (about 15 s on 2 cores)
def test_eval_json_records_the_protocol(
    untrained_generator: Path, untrained_eval: dict[str, Any], inception: Path, tmp_path: Path
) -> None:
    protocol = untrained_eval["protocol"]
    assert protocol["reference"] == {
        "data": "digits",
        "images": 500,
        "available": 1797,
        "selection": "seeded random subset",
        "seed": 0,
    }
    assert protocol["generator"] == {
        "step": 0,
        "weights": "raw",
        "bn": "running",
        "images": 500,
        "noise_seed": 12345,
        "batch": 250,
    }
    assert protocol["network"] == {
        "path": str(inception.resolve()),
        "sha1": hashlib.sha1(inception.read_bytes()).hexdigest(),
    }
    assert protocol["kid"] == {"subsets": 100, "subset_size": 500, "seed": 0} and protocol["swd"]["seed"] == 0
    assert protocol["ranks"] == 1
    whole = tmp_path / "all.json"  # (the digits score only: SWD of 1797 images would take most of a minute)
    run_in_process(
        "eval", str(untrained_generator), "--data", "digits", "-n", "1797", "--metrics", "digits", "--out", str(whole)
    )
    assert json.loads(whole.read_text())["protocol"]["reference"]["selection"] == "all"


def test_the_reference_is_a_seeded_random_subset_of_the_shards_not_their_first_images(digits_shards: Path) -> None:
    from dcgan.data.offline import read_images
    from dcgan.evaluation.evaluate import reference_images

    everything = read_images(str(digits_shards), 16, 1)
    assert sorted(everything) == list(range(1797))
    reference = reference_images(str(digits_shards), 100, 16, 1, seed=7)
    order = np.random.default_rng(7).permutation(1797)[:100]
    assert torch.equal(reference.images, torch.from_numpy(np.stack([everything[i] for i in order])))
    assert reference.describe()["selection"] == "seeded random subset" and reference.available == 1797
    first = torch.from_numpy(np.stack([everything[i] for i in range(100)]))
    assert not torch.equal(reference.images, first)
    assert not torch.equal(reference_images(str(digits_shards), 100, 16, 1, seed=8).images, reference.images)
    assert reference_images(str(digits_shards), 1797, 16, 1).seed is None  # the whole set: no subset


@pytest.mark.slow
def test_trained_generator_beats_untrained_on_every_metric_and_ranks_agree(
    trained_digits_run: Path,
    untrained_eval: dict[str, Any],
    inception: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trained = eval_cli(trained_digits_run, tmp_path / "trained.json", inception)
    untrained = untrained_eval
    for key in ("fid", "kid", "swd", "digits_frechet"):
        assert trained[key] < untrained[key], key
    assert trained["digits_class_balance"] > untrained["digits_class_balance"]
    cold = tmp_path / "cold_cache"
    monkeypatch.setenv("DCGAN_CACHE", str(cold))  # both ranks featurize half of the reference; rank 0 writes it
    two = eval_cli(trained_digits_run, tmp_path / "two.json", inception, ranks=2)
    assert [path.suffix for path in cold.iterdir()] == [".npy"] and "tmp" not in next(cold.iterdir()).name
    assert two["protocol"]["ranks"] == 2
    for key in ("fid", "kid", "swd", "digits_frechet"):
        assert two[key] == pytest.approx(trained[key], rel=1e-4, abs=1e-6), key
    for key in ("digits_confident", "digits_class_balance"):  # shares of 500 samples: at most one sample apart
        assert two[key] == pytest.approx(trained[key], abs=1 / 500 + 1e-9), key


def test_periodic_evaluation_logs_metrics_and_keeps_the_best_checkpoint(tmp_path: Path) -> None:
    from dcgan.errors import EXIT_OK
    from dcgan.run.checkpoint import read_best
    from dcgan.train.loop import train

    run = tmp_path / "run"
    config = tiny_config(
        run,
        "train.steps=40",
        "checkpoint.every=10",
        "checkpoint.keep=1",
        "eval.every=10",
        "eval.metrics=[swd,digits]",
        "eval.num=64",
        "eval.best=digits_frechet",
    )
    assert train(config) == EXIT_OK
    lines = read_stats(run)
    evals = [line for line in lines if "eval/swd" in line]
    assert [line["step"] for line in evals] == [10, 20, 30, 40]
    best = read_best(run / "checkpoints")
    values = {line["step"]: line["eval/digits_frechet"] for line in evals}
    assert best["metric"] == "digits_frechet" and best["value"] == min(values.values())
    assert values[best["step"]] == best["value"]
    kept = completed_steps(run)
    assert best["step"] in kept and kept[-1] == 40 and len(kept) <= 2


def test_eval_config_errors() -> None:
    with pytest.raises(ConfigError, match="eval.metrics: must be a non-empty list from fid, kid, swd, digits"):
        load_config(TINY, ["eval.metrics=[lpips]"])
    with pytest.raises(ConfigError, match=r"eval.best: must be empty or one of swd \(what eval.metrics produces"):
        load_config(TINY, ["eval.best=fid"])
    # named by what evaluate() returns: digits gives digits_frechet (lower is better), not "digits"; a
    # key that eval.metrics does not produce would crash at the first eval (KeyError) if it passed here
    for bad in (
        ["eval.metrics=[swd]", "eval.best=digits_frechet"],
        ["eval.metrics=[digits]", "eval.best=digits"],
        ["eval.metrics=[digits]", "eval.best=digits_confident"],
    ):
        with pytest.raises(ConfigError, match="eval.best: must be empty or one of"):
            load_config(TINY, bad)
    assert load_config(TINY, ["eval.metrics=[swd,digits]", "eval.best=digits_frechet"]).eval.best == "digits_frechet"
    assert metric_keys(["fid", "swd", "digits"]) == (
        "fid",
        "swd",
        "digits_frechet",
        "digits_confident",
        "digits_class_balance",
    )
