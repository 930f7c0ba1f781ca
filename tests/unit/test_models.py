import pytest
import torch
from torch import nn

from dcgan.config import ModelConfig
from dcgan.gan.models import Discriminator, Generator, count_parameters


def test_parameter_counts_match_pytorch_examples_dcgan() -> None:
    config = ModelConfig(resolution=64, nz=100, ngf=64, ndf=64, channels=3)
    assert count_parameters(Generator(config)) == 3_576_704
    assert count_parameters(Discriminator(config)) == 2_765_568


@pytest.mark.parametrize("resolution", [16, 32, 64, 128])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes(resolution: int, channels: int) -> None:
    config = ModelConfig(resolution=resolution, nz=10, ngf=4, ndf=4, channels=channels)
    g, d = Generator(config), Discriminator(config)
    images = g(torch.randn(3, 10))
    assert images.shape == (3, channels, resolution, resolution)
    assert images.min() >= -1 and images.max() <= 1
    assert d(images).shape == (3,)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == resolution.bit_length() - 3 + 1  # log2(R) - 2 strided blocks + the 4x4 output conv


def test_paper_initialisation_statistics() -> None:
    torch.manual_seed(0)
    config = ModelConfig()
    for model in (Generator(config), Discriminator(config)):
        conv = torch.cat(
            [m.weight.flatten() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
        )
        bn_w = torch.cat([m.weight for m in model.modules() if isinstance(m, nn.BatchNorm2d)])
        bn_b = torch.cat([m.bias for m in model.modules() if isinstance(m, nn.BatchNorm2d)])
        assert abs(conv.mean().item()) < 1e-3 and abs(conv.std().item() - 0.02) < 5e-4
        assert abs(bn_w.mean().item() - 1) < 5e-3 and abs(bn_w.std().item() - 0.02) < 5e-3
        assert torch.count_nonzero(bn_b) == 0
    assert not any(m.bias is not None for m in Generator(config).modules() if isinstance(m, nn.ConvTranspose2d))


def test_discriminator_returns_logits_not_probabilities() -> None:
    d = Discriminator(ModelConfig(resolution=16, ndf=4, channels=1))
    with torch.no_grad():
        d.main[-1].weight.mul_(1000)
    out = d(torch.randn(8, 1, 16, 16))
    assert (out.abs() > 1).any()
