"""The paper's training augmentation, applied to whole uint8 batches on the training device.

torchvision's v2 transforms draw one set of random parameters per call, i.e. per batch when
given a batch; the paper's pipeline (PIL transforms per image) draws them per image. This module
draws them per image, all at once, from the caller's `torch.Generator`, so a run that restores
the generator's state continues with the same augmentations.

CIFAR-100:     RandomCrop(32, padding=4) -> RandomHorizontalFlip -> Normalize.
Tiny ImageNet: RandomCrop(64, padding=4) -> RandomHorizontalFlip
               -> RandomAffine(degrees=45, translate=(0.1, 0.1), scale=(0.9, 1.1))
               -> ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2) -> Normalize.
Like torchvision: zero padding and zero fill, nearest-neighbour affine resampling, integer
translations. Unlike torchvision: ColorJitter applies brightness, contrast, saturation always in
this order (torchvision shuffles the order per image), and works in float rather than on
rounded uint8 intermediates.
"""

import torch
import torch.nn.functional as F

from .registry import get_dataset

PAD = 4
DEGREES = 45.0
TRANSLATE = 0.1
SCALE = (0.9, 1.1)
JITTER = 0.2
GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as PIL's and torchvision's grayscale


def crop_flip(x: torch.Tensor, offset: torch.Tensor, flip: torch.Tensor,
              pad: int = PAD) -> torch.Tensor:
    """Per-image zero-padded crop and optional horizontal flip of uint8 NHWC images.

    `offset` (N, 2) in [0, 2*pad] is the crop corner (row, col) in the padded image and `flip`
    (N,) is boolean. One gather with computed indices; the padding is never materialised.
    """
    n, h, w, _ = x.shape
    rows = torch.arange(h, device=x.device) + offset[:, :1] - pad            # (N, H)
    cols = torch.arange(w, device=x.device).expand(n, w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + offset[:, 1:] - pad  # (N, W)
    inside = (((rows >= 0) & (rows < h))[:, :, None]
              & ((cols >= 0) & (cols < w))[:, None, :])
    out = x[torch.arange(n, device=x.device)[:, None, None],
            rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]
    return out.masked_fill_(~inside[..., None], 0)


def affine(img: torch.Tensor, angle_deg: torch.Tensor, translate_px: torch.Tensor,
           scale: torch.Tensor) -> torch.Tensor:
    """Per-image rotation about the centre, scaling and translation (pixels, (N, 2) as x, y)
    of float NCHW square images; nearest-neighbour, zero fill."""
    n, c, h, w = img.shape
    a = torch.deg2rad(angle_deg)
    cos, sin = torch.cos(a) / scale, torch.sin(a) / scale
    # affine_grid wants output -> input coordinates: the inverse of scale*R(a) x + t.
    tx, ty = 2 * translate_px[:, 0] / w, 2 * translate_px[:, 1] / h
    theta = torch.stack([
        torch.stack([cos, sin, -(cos * tx + sin * ty)], 1),
        torch.stack([-sin, cos, -(-sin * tx + cos * ty)], 1),
    ], 1)
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
    return F.grid_sample(img, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def color_jitter(img: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
                 saturation: torch.Tensor, gray_w: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image factors, (N,) each, on float NCHW images in [0, 1]. `gray_w`: GRAY as a
    (1, 3, 1, 1) tensor like `img` (an Augmenter's, built once: building it from the tuple
    is a host-to-device copy per call); made here when not given."""
    if gray_w is None:
        gray_w = img.new_tensor(GRAY).view(1, 3, 1, 1)
    b, c, s = (f.view(-1, 1, 1, 1) for f in (brightness, contrast, saturation))
    img = (img * b).clamp_(0, 1)
    mean = (img * gray_w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    img = torch.lerp(mean, img, c).clamp_(0, 1)
    gray = (img * gray_w).sum(1, keepdim=True)
    return torch.lerp(gray, img, s).clamp_(0, 1)


class Augmenter:
    """`train(x, generator)` / `test(x)`: uint8 NHWC batch -> normalised float32 NCHW.

    Pass a generator on `device` to keep the whole step on the device (parameters drawn on
    another device are copied over). With `channels_last=True` the output has channels-last
    strides, which is the layout the uint8 NHWC input gives for free.
    """

    def __init__(self, dataset: str, device="cpu", *, channels_last: bool = False):
        info = get_dataset(dataset)
        self.size = info.image_size
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.geometric = dataset == "tinyimagenet"  # affine + colour jitter
        mean = torch.tensor(info.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(info.std, device=self.device).view(1, 3, 1, 1)
        self.mean, self.std = mean, std
        self.gray_w = torch.tensor(GRAY, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        # uint8 -> normalised in one multiply-add: (x / 255 - mean) / std.
        self._scale, self._shift = 1 / (255 * std), -mean / std

    def test(self, x) -> torch.Tensor:
        x = self._input(x)
        return self._output(x.permute(0, 3, 1, 2).float() * self._scale + self._shift)

    def train(self, x, generator: torch.Generator) -> torch.Tensor:
        x = self._input(x)
        n = x.shape[0]
        u = torch.rand(n, 10 if self.geometric else 3, generator=generator,
                       device=generator.device).to(self.device, non_blocking=True)
        offset = (u[:, :2] * (2 * PAD + 1)).long()
        x = crop_flip(x, offset, u[:, 2] < 0.5)
        img = x.permute(0, 3, 1, 2).float()
        if not self.geometric:
            return self._output(img * self._scale + self._shift)
        max_t = TRANSLATE * self.size
        img = affine(img / 255,
                     angle_deg=(2 * u[:, 3] - 1) * DEGREES,
                     translate_px=torch.round((2 * u[:, 4:6] - 1) * max_t),
                     scale=SCALE[0] + (SCALE[1] - SCALE[0]) * u[:, 6])
        factors = 1 + JITTER * (2 * u[:, 7:10] - 1)
        img = color_jitter(img, factors[:, 0], factors[:, 1], factors[:, 2], self.gray_w)
        return self._output((img - self.mean) / self.std)

    def _input(self, x) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.dtype != torch.uint8 or x.dim() != 4 or tuple(x.shape[1:]) != (
                self.size, self.size, 3):
            raise ValueError(f"expected uint8 (N, {self.size}, {self.size}, 3) images, got "
                             f"{x.dtype} {tuple(x.shape)}")
        return x.to(self.device, non_blocking=True)

    def _output(self, img: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return img.contiguous(memory_format=fmt)
