"""The two datasets of the paper: shapes, classes, normalisation and official archives."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Archive:
    url: str  # official location; a mirror replaces everything before `filename`
    filename: str
    md5: str


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    image_size: int
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    counts: dict  # official split sizes, also the synthetic default
    archive: Archive

    def __getitem__(self, key: str):
        # The contract names the fields (`DATASETS[name]["image_size"]` or `.image_size`);
        # both spellings work so callers need not care which one was meant.
        return getattr(self, key)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DATASETS = {
    # URL and md5 as in torchvision.datasets.CIFAR100.
    "cifar100": DatasetInfo(
        name="cifar100",
        image_size=32,
        num_classes=100,
        mean=(0.5071, 0.4867, 0.4408),
        std=(0.2675, 0.2565, 0.2761),
        counts={"train": 50_000, "test": 10_000},
        archive=Archive(
            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            "cifar-100-python.tar.gz",
            "eb9058c3a382ffc7106e4002c42a8d85",
        ),
    ),
    # The CS231n zip (248,100,043 bytes); its labelled val/ split is the paper's test set.
    "tinyimagenet": DatasetInfo(
        name="tinyimagenet",
        image_size=64,
        num_classes=200,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        counts={"train": 100_000, "test": 10_000},
        archive=Archive(
            "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
            "tiny-imagenet-200.zip",
            "90528d7ca1a48142e341f4ef8d21d0de",
        ),
    ),
}


def get_dataset(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]
