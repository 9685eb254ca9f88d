"""The paper's four architectures behind one constructor, `build_model(name, classes, size)`."""

from torch import nn

from .convmixer import convmixer
from .resnext import ResNeXt
from .vgg import NUM_POOLS, VGG

from ..spec import MODELS


def build_model(name: str, num_classes: int, image_size: int) -> nn.Module:
    """Build one of `MODELS` for square RGB inputs of side `image_size`.

    Every model ends in a global average pool, so `image_size` only has to be one the
    architecture can downsample: VGG halves the resolution five times.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if num_classes < 1 or image_size < 1:
        raise ValueError(f"num_classes and image_size must be positive, got "
                         f"{num_classes}, {image_size}")
    if name in ("vgg16", "vgg19"):
        if image_size % 2 ** NUM_POOLS:
            raise ValueError(f"{name} needs image_size divisible by {2 ** NUM_POOLS}, "
                             f"got {image_size}")
        return VGG("D" if name == "vgg16" else "E", num_classes)
    if name == "convmixer_256_8":
        return convmixer(dim=256, depth=8, kernel_size=5, patch_size=2, num_classes=num_classes)
    return ResNeXt(cardinality=8, depth=18, widen_factor=4, num_classes=num_classes)


__all__ = ["MODELS", "build_model"]
