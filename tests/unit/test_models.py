import pytest
import torch
from torch import nn

from dcgan.config import ModelConfig
from dcgan.gan.models import Discriminator, Generator, count_parameters, spectral_norm_vectors


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


def test_spectral_norm_keeps_the_papers_init_and_parameter_counts_and_normalizes_the_convs() -> None:
    plain_config = ModelConfig(resolution=32, nz=10, ngf=8, ndf=8, channels=3)
    both = ModelConfig(resolution=32, nz=10, ngf=8, ndf=8, channels=3, spectral_norm="both")
    torch.manual_seed(0)
    plain = (Generator(plain_config), Discriminator(plain_config))
    torch.manual_seed(0)
    normalized = (Generator(both), Discriminator(both))
    for a, b in zip(plain, normalized, strict=True):
        assert count_parameters(a) == count_parameters(b)
    # the paper's init draws the same weights: G's first layer comes before any spectral-norm vector
    g_plain, g_norm = (dict(m.named_parameters()) for m in (plain[0], normalized[0]))
    assert torch.equal(g_plain["main.0.weight"], g_norm["main.0.parametrizations.weight.original"])
    assert len(spectral_norm_vectors(normalized[1])) == 2 * 4  # D: 4 convs at 32x32, a u and a v each
    assert spectral_norm_vectors(plain[1]) == []
    for model in normalized:
        for layer in model.modules():
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
                dim = 1 if isinstance(layer, nn.ConvTranspose2d) else 0
                matrix = layer.weight.detach().movedim(dim, 0).flatten(1)
                assert torch.linalg.matrix_norm(matrix, ord=2).item() == pytest.approx(1.0, rel=0.05)
    only_d = ModelConfig(resolution=32, nz=10, ngf=8, ndf=8, channels=3, spectral_norm="d")
    assert spectral_norm_vectors(Generator(only_d)) == [] and spectral_norm_vectors(Discriminator(only_d))


def test_making_images_in_train_mode_leaves_the_power_iteration_where_training_left_it() -> None:
    from dcgan.evaluation.generators import generate, standing_statistics

    g = Generator(ModelConfig(resolution=16, nz=10, ngf=4, channels=1, spectral_norm="both"))
    before = [v.clone() for v in spectral_norm_vectors(g)]
    noise = torch.randn(8, 10)
    generate(g, noise, "batch")
    generate(g, noise, "standing", standing_statistics(g))
    assert all(torch.equal(a, b) for a, b in zip(before, spectral_norm_vectors(g), strict=True))
    g.train()
    g(noise)  # a training forward does move them
    assert not all(torch.equal(a, b) for a, b in zip(before, spectral_norm_vectors(g), strict=True))


def test_the_weight_average_loaded_at_a_resume_takes_g_s_power_iteration_vectors() -> None:
    """A resume loads G's vectors in place, then the average's state (which has none): images made before
    the next update must use G's sigma, not the fresh G's the average was built from."""
    from dcgan.gan.ema import GeneratorEMA

    model = ModelConfig(resolution=16, nz=10, ngf=8, ndf=8, channels=1, spectral_norm="both")
    g = Generator(model)
    average = GeneratorEMA(g, model, decay=0.9)
    saved = average.state_dict()
    g.train()
    g(torch.randn(4, 10))  # as the loaded checkpoint does: G's vectors move on, in place

    def same_vectors() -> bool:
        pairs = zip(spectral_norm_vectors(average.module), spectral_norm_vectors(g), strict=True)
        return all(torch.equal(a, b) for a, b in pairs)

    assert not same_vectors()
    average.load_state_dict(saved)
    assert same_vectors()


def test_a_d_without_batchnorm_has_biases_instead_starting_at_zero_and_the_papers_conv_weights() -> None:
    """model.d_norm=none (SN-GAN's D): no BatchNorm layer, each inner conv with a bias (the shift BatchNorm
    gave) starting at 0, the weights drawn by the paper's init."""
    paper = ModelConfig(resolution=32, nz=10, ngf=8, ndf=8, channels=3)
    bare = ModelConfig(resolution=32, nz=10, ngf=8, ndf=8, channels=3, d_norm="none", spectral_norm="d")
    torch.manual_seed(0)
    with_bn = Discriminator(paper)
    torch.manual_seed(0)
    without = Discriminator(bare)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in without.modules())
    biases = [m.bias for m in without.modules() if isinstance(m, nn.Conv2d) and m.bias is not None]
    assert len(biases) == 2 and all(torch.equal(b, torch.zeros_like(b)) for b in biases)  # 2 inner convs at 32x32
    bn_params = sum(p.numel() for m in with_bn.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    assert count_parameters(without) == count_parameters(with_bn) - bn_params // 2  # a bias per BN's (weight, bias)
    widest = [m.parametrizations.weight.original for m in without.modules() if isinstance(m, nn.Conv2d)][-2]
    assert widest.std().item() == pytest.approx(0.02, rel=0.05)  # N(0, 0.02), 32 x 16 x 4 x 4 draws
    assert without(torch.randn(4, 3, 32, 32)).shape == (4,)
