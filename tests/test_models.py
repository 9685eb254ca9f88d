"""The paper's models: output shapes, exact parameter counts, channels_last, the authors' init."""

import pytest
import torch

from vsgd.models import MODELS, build_model

# (model, classes, image size) -> trainable parameters. The heads differ only by
# (features + 1) * 100 parameters between the two datasets; the bodies are size-agnostic.
PARAM_COUNTS = {
    ("vgg16", 100, 32): 14_774_436,
    ("vgg16", 200, 64): 14_825_736,
    ("vgg19", 100, 32): 20_086_692,
    ("vgg19", 200, 64): 20_137_992,
    ("convmixer_256_8", 100, 32): 617_316,
    ("convmixer_256_8", 200, 64): 643_016,
    ("resnext18", 100, 32): 11_086_756,
    ("resnext18", 200, 64): 11_189_256,
}


def test_registry_matches_contract():
    assert MODELS == ("vgg16", "vgg19", "convmixer_256_8", "resnext18")


@pytest.mark.parametrize("name,classes,size", sorted(PARAM_COUNTS))
def test_shapes_params_and_channels_last(name, classes, size):
    torch.manual_seed(0)
    model = build_model(name, classes, size).eval()
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name, classes, size]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        y = model(x)
        model_cl = model.to(memory_format=torch.channels_last)
        y_cl = model_cl(x.contiguous(memory_format=torch.channels_last))
    assert y.shape == (2, classes) and y.dtype == torch.float32
    torch.testing.assert_close(y_cl, y, rtol=1e-3, atol=1e-4)


def test_feature_widths_before_the_head():
    heads = {"vgg16": 512, "vgg19": 512, "convmixer_256_8": 256, "resnext18": 1024}
    for name, width in heads.items():
        linear = [m for m in build_model(name, 10, 32).modules() if isinstance(m, torch.nn.Linear)]
        assert [(m.in_features, m.out_features) for m in linear] == [(width, 10)]


def test_authors_init():
    torch.manual_seed(0)
    vgg = build_model("vgg16", 100, 32)
    assert abs(vgg.classifier.weight.std().item() - 0.01) < 1e-3
    first = vgg.features[0]
    assert abs(first.weight.std().item() - (2.0 / (9 * 64)) ** 0.5) < 5e-3
    assert torch.all(first.bias == 0)
    resnext = build_model("resnext18", 100, 32)
    assert abs(resnext.classifier.weight.std().item() - (2.0 / 1024) ** 0.5) < 3e-3
    assert torch.all(resnext.classifier.bias == 0)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet18", 100, 32)
    with pytest.raises(ValueError, match="divisible"):
        build_model("vgg16", 100, 40)
