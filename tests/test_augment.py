"""Batched augmentation: shapes, per-sample parameters, padding, normalisation, determinism,
and the geometric pieces against exact references."""

import pytest
import torch
import torch.nn.functional as F

from vsgd.data import DATASETS, Augmenter
from vsgd.data.augment import PAD, affine, color_jitter, crop_flip


def images(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)


def denormalize(out, dataset):
    info = DATASETS[dataset]
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    return out * std + mean  # back to [0, 1]


@pytest.mark.parametrize("dataset", ["cifar100", "tinyimagenet"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_shapes_dtype_layout(dataset, channels_last):
    size = DATASETS[dataset].image_size
    aug = Augmenter(dataset, "cpu", channels_last=channels_last)
    x = images(8, size)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for out in (aug.train(x, torch.Generator().manual_seed(0)), aug.test(x)):
        assert out.shape == (8, 3, size, size) and out.dtype == torch.float32
        assert out.is_contiguous(memory_format=fmt)
    with pytest.raises(ValueError, match="uint8"):
        aug.test(x.float())
    with pytest.raises(ValueError, match="uint8"):
        aug.test(images(2, size + 1))


@pytest.mark.parametrize("dataset", ["cifar100", "tinyimagenet"])
def test_test_transform_is_normalisation_only(dataset):
    size = DATASETS[dataset].image_size
    x = images(64, size)
    out = Augmenter(dataset).test(x)
    torch.testing.assert_close(
        denormalize(out, dataset), x.permute(0, 3, 1, 2) / 255, atol=1e-5, rtol=0
    )
    # Uniform pixels: per-channel mean (0.5 - mean) / std and std (1/sqrt(12)) / std.
    info = DATASETS[dataset]
    mean, std = torch.tensor(info.mean), torch.tensor(info.std)
    stats_mean, stats_std = out.mean((0, 2, 3)), out.std((0, 2, 3))
    torch.testing.assert_close(stats_mean, (0.5 - mean) / std, atol=0.02, rtol=0)
    torch.testing.assert_close(stats_std, (1 / 12**0.5) / std, atol=0.02, rtol=0)


def test_cifar_train_is_a_padded_crop_with_flip_per_sample():
    n = 256
    x = images(1, 32).expand(n, -1, -1, -1)  # one image, many augmentations
    out = Augmenter("cifar100").train(x, torch.Generator().manual_seed(1))
    pixels = torch.round(denormalize(out, "cifar100") * 255)
    # Every output is exactly one of the 9 x 9 x 2 crops/flips of the zero-padded image.
    padded = F.pad(x[0].permute(2, 0, 1).float(), (PAD,) * 4)
    candidates = torch.stack(
        [
            c
            for dy in range(2 * PAD + 1)
            for dx in range(2 * PAD + 1)
            for c in (
                padded[:, dy : dy + 32, dx : dx + 32],
                padded[:, dy : dy + 32, dx : dx + 32].flip(-1),
            )
        ]
    )
    match = (pixels[:, None] == candidates[None]).flatten(2).all(-1)  # (n, 162)
    assert match.any(1).all()
    chosen = match.float().argmax(1)
    assert len(chosen.unique()) > 100  # parameters differ per sample
    flipped = (chosen % 2 == 1).float().mean().item()
    assert 0.4 < flipped < 0.6


def test_padding_is_zero_and_never_wider_than_four():
    x = torch.full((512, 32, 32, 3), 255, dtype=torch.uint8)
    out = Augmenter("cifar100").train(x, torch.Generator().manual_seed(2))
    pixels = torch.round(denormalize(out, "cifar100") * 255)
    assert set(pixels.unique().tolist()) == {0.0, 255.0}
    zero_rows = (pixels == 0).all(1).all(-1).sum(1)  # fully zero rows per sample
    zero_cols = (pixels == 0).all(1).all(-2).sum(1)
    assert zero_rows.max() <= PAD and zero_cols.max() <= PAD
    assert ((zero_rows == 0) & (zero_cols == 0)).float().mean() < 0.05  # 1/81 expected
    assert (zero_rows + zero_cols == 2 * PAD).any()


@pytest.mark.parametrize("dataset", ["cifar100", "tinyimagenet"])
def test_determinism_from_the_generator(dataset):
    size = DATASETS[dataset].image_size
    aug, x = Augmenter(dataset), images(16, size)
    a = aug.train(x, torch.Generator().manual_seed(7))
    b = aug.train(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(7)
    first = aug.train(x, g)
    state = g.get_state()
    second = aug.train(x, g)
    assert not torch.equal(first, second)
    g.set_state(state)  # a restored generator continues with the same augmentations
    assert torch.equal(aug.train(x, g), second)
    assert not torch.equal(a, aug.train(x, torch.Generator().manual_seed(8)))


def test_tinyimagenet_train_varies_per_sample_and_stays_in_range():
    x = images(1, 64).expand(64, -1, -1, -1)
    out = Augmenter("tinyimagenet").train(x, torch.Generator().manual_seed(3))
    unit = denormalize(out, "tinyimagenet")
    assert unit.min() >= -1e-5 and unit.max() <= 1 + 1e-5
    assert len(out.flatten(1).unique(dim=0)) == 64

    # Rotations up to 45 degrees leave zero-filled corners in most samples; after the
    # contrast jitter (a blend with the image's mean grey) the fill is a dark grey.
    def filled(pixel):  # (N, 3)
        return (pixel.max(1).values - pixel.min(1).values < 1e-6) & (pixel.max(1).values < 0.21)

    corners = filled(unit[:, :, 0, 0]) | filled(unit[:, :, -1, -1])
    assert corners.float().mean() > 0.3


def test_crop_flip_reference():
    x = images(2, 8).repeat(1, 1, 1, 1)
    offset = torch.tensor([[0, 8], [4, 4]])
    out = crop_flip(x, offset, torch.tensor([False, True]))
    padded = F.pad(x.permute(0, 3, 1, 2), (PAD,) * 4)
    torch.testing.assert_close(out[0], padded[0, :, 0:8, 8:16].permute(1, 2, 0))
    torch.testing.assert_close(out[1], x[1].flip(1))


def test_affine_identity_rotation_translation():
    img = torch.rand(2, 3, 64, 64)
    one, zero = torch.ones(2), torch.zeros(2)
    assert torch.equal(affine(img, zero, torch.zeros(2, 2), one), img)
    rotated = affine(img, torch.full((2,), 90.0), torch.zeros(2, 2), one)
    assert torch.equal(rotated, img.rot90(1, (2, 3))) or torch.equal(rotated, img.rot90(-1, (2, 3)))
    moved = affine(img, zero, torch.tensor([[3.0, 0.0], [0.0, -2.0]]), one)
    assert torch.equal(moved[0, :, :, 3:], img[0, :, :, :-3])
    assert torch.all(moved[0, :, :, :3] == 0)
    assert torch.equal(moved[1, :, :-2], img[1, :, 2:])


def test_color_jitter_factors():
    img = torch.rand(3, 3, 16, 16)
    one = torch.ones(3)
    torch.testing.assert_close(color_jitter(img, one, one, one), img)
    half = torch.full((3,), 0.5)
    torch.testing.assert_close(color_jitter(img, half, one, one), img * 0.5)
    gray = color_jitter(img, one, one, torch.zeros(3))
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    flat = color_jitter(img, one, torch.zeros(3), one)
    assert torch.allclose(flat, flat[..., :1, :1].expand_as(flat))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dataset", ["cifar100", "tinyimagenet"])
def test_on_cuda_with_a_device_generator(dataset):
    size = DATASETS[dataset].image_size
    aug = Augmenter(dataset, "cuda", channels_last=True)
    x = images(32, size).cuda()
    a = aug.train(x, torch.Generator("cuda").manual_seed(0))
    b = aug.train(x, torch.Generator("cuda").manual_seed(0))
    assert a.is_cuda and a.shape == (32, 3, size, size) and torch.equal(a, b)
    torch.testing.assert_close(aug.test(x).cpu(), Augmenter(dataset).test(x.cpu()))
