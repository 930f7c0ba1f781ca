"""`dcgan probe`: D's features as a representation (the paper's section 5.1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_in_process

from dcgan.evaluation.probe import features, labelled_images, load_discriminator, split, untrained_like


def test_the_labelled_split_takes_n_per_class_and_tests_on_the_rest() -> None:
    labels = np.repeat(np.arange(3), 5)
    train, test = split(labels, 2, seed=0)
    assert np.bincount(labels[train]).tolist() == [2, 2, 2] and len(test) == 9
    assert not set(train) & set(test) and sorted([*train, *test]) == list(range(15))
    assert not np.array_equal(split(labels, 2, seed=1)[0], train)
    with pytest.raises(Exception, match="class 0 has only 5 images"):
        split(labels, 5, seed=0)


def test_probe_on_a_trained_discriminator_beats_its_untrained_twin_on_the_digits(
    trained_digits_run: Path, tmp_path: Path
) -> None:
    loaded = load_discriminator(trained_digits_run)
    images, labels = labelled_images("digits", loaded.model.resolution, 1)
    # 32x32, ndf 32: every hidden layer max-pooled to 4x4 (32 + 64 + 128 channels x 16)
    assert features(loaded.discriminator, images[:4]).shape == (4, (32 + 64 + 128) * 16)
    twin = untrained_like(loaded)
    assert not torch.equal(next(twin.parameters()), next(loaded.discriminator.parameters()))
    out = tmp_path / "probe.json"
    printed = run_in_process(
        "probe", str(trained_digits_run), "--labels", "5", "--draws", "3", "--out", str(out)
    ).stdout
    result = json.loads(out.read_text())
    gains = [t - u for t, u in zip(result["trained"], result["untrained"], strict=True)]
    assert min(gains) > 0 and np.mean(gains) > 0.03, result  # measured: +0.09 +- 0.02 over 6 draws
    assert np.mean(result["trained"]) > 0.8 and "gain (paired)" in printed
