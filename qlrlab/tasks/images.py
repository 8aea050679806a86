"""Image classification tasks: Fashion-MNIST (MLP), SVHN and CIFAR-10 (ResNet-18).

Common to all three, as the paper's code (``datasets.py`` of
``rmclarke/AdamThroughASecondOrderLens``):

* validation is the **last** part of the official training file, without shuffling
  (Fashion-MNIST 50,000/10,000 and SVHN 61,047/12,210 = last 1/6; CIFAR-10 45,000/5,000 = last
  10%); the official test file is the test split; SVHN's "extra" set is not used;
* inputs are standardised with statistics of train+val: per pixel for Fashion-MNIST (784
  features), per channel for SVHN and CIFAR-10 (std 0 → 1);
* CIFAR-10 training batches are augmented after normalisation: zero-pad 4, random 32×32 crop,
  random horizontal flip, with fresh random crops/flips for the whole training set each epoch.

Images are stored on the device as ``uint8`` and normalised (and augmented) per batch, fully
vectorised; no per-sample Python runs in the training loop.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlrlab.data import ensure_file, load_cifar10, load_svhn_mat, read_idx
from qlrlab.models import MLP, ResNet18
from qlrlab.tasks._common import ArrayTask, Split, build_model, feature_stats, to_tensor
from qlrlab.tasks.base import TASKS, TaskSpec

__all__ = [
    "CIFAR10Spec",
    "CIFAR10Task",
    "FashionMNISTSpec",
    "FashionMNISTTask",
    "ImageTask",
    "SVHNSpec",
    "SVHNTask",
    "random_crop_flip",
]


class ImageTask(ArrayTask):
    """An :class:`ArrayTask` with ``uint8`` inputs standardised per batch.

    Attributes:
        mean: train+val mean, broadcastable to a batch (float64).
        std: train+val standard deviation (float64).
    """

    mean: Tensor
    std: Tensor

    def set_stats(self, mean: Tensor, std: Tensor) -> None:
        """Store the normalisation statistics (cast to the task dtype)."""
        self.mean = mean.to(self.device)
        self.std = std.to(self.device)
        self._mean = self.mean.to(self.dtype)
        self._inv_std = (1.0 / self.std).to(self.dtype)
        self.__dict__.pop("_prepared", None)  # evaluation inputs prepared with older statistics

    def prepare(self, inputs: Tensor, split: Split, epoch_state: Any = None) -> Tensor:
        """``(x − mean) / std`` in the task dtype."""
        return (inputs.to(self.dtype) - self._mean) * self._inv_std


def random_crop_flip(x: Tensor, offsets: Tensor, flips: Tensor, pad: int = 4) -> Tensor:
    """Zero-pad, crop and optionally flip a batch of images in one gather.

    Args:
        x: ``[N, C, H, W]`` images (already normalised, so the padding is zero *after*
            normalisation, as the paper's code).
        offsets: ``[N, 2]`` integer crop offsets ``(dy, dx)`` in ``[0, 2·pad]``.
        flips: ``[N]`` booleans, flip horizontally.
        pad: padding on each side.

    Returns:
        ``[N, C, H, W]`` augmented images.
    """
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = offsets[:, 0:1] + torch.arange(h, device=x.device)  # [N, H]
    cols = offsets[:, 1:2] + torch.arange(w, device=x.device)  # [N, W]
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    return xp[
        torch.arange(n, device=x.device)[:, None, None, None],
        torch.arange(c, device=x.device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


class FashionMNISTTask(ImageTask):
    """The built ``fashion_mnist`` task."""

    name = "fashion_mnist"


class SVHNTask(ImageTask):
    """The built ``svhn`` task."""

    name = "svhn"


class CIFAR10Task(ImageTask):
    """The built ``cifar10`` task (with per-epoch augmentation when ``augment``)."""

    name = "cifar10"
    augment: bool = True

    def epoch_state(self, n: int, generator: torch.Generator) -> Any:
        """Crop offsets ``[n, 2]`` in 0..8 and flips ``[n]`` for the whole training set."""
        if not self.augment:
            return None
        dev = generator.device
        offsets = torch.randint(0, 9, (n, 2), generator=generator, device=dev)
        flips = torch.rand(n, generator=generator, device=dev) < 0.5
        return offsets.to(self.device), flips.to(self.device)

    def prepare(self, inputs: Tensor, split: Split, epoch_state: Any = None) -> Tensor:
        """Normalise; for training batches with augmentation, then pad-4 crop and flip."""
        x = super().prepare(inputs, split)
        if epoch_state is not None:
            offsets, flips = epoch_state
            x = random_crop_flip(x, offsets, flips)
        return x


def _split_last(
    x: np.ndarray, y: np.ndarray, n_train: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def _image_task(
    cls: type[ImageTask],
    spec: TaskSpec,
    device: torch.device,
    dtype: torch.dtype,
    trainval: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    n_train: int,
    stat_dims: tuple[int, ...],
    model_factory: Any,
    batch_size: int,
    epochs: int,
    eval_batch_size: int,
) -> ImageTask:
    xtv = to_tensor(trainval[0], device)
    ytv = to_tensor(trainval[1], device, torch.int64)
    mean, std = feature_stats(xtv, stat_dims)
    splits = {
        "train": (xtv[:n_train], ytv[:n_train]),
        "val": (xtv[n_train:], ytv[n_train:]),
        "test": (to_tensor(test[0], device), to_tensor(test[1], device, torch.int64)),
    }
    model: nn.Module = build_model(model_factory, spec.model_seed, device, dtype)
    task = cls(
        spec, device, dtype, model, nn.CrossEntropyLoss(), splits, True, batch_size, epochs,
        eval_batch_size,
    )  # fmt: skip
    task.set_stats(mean, std)
    return task


#: Fashion-MNIST's evaluation chunk: 1000 images (3 MB of inputs) stay in the CPU's cache through
#: the first layer; the whole 10,000-image split at once is ~20% slower on one thread
#: (benchmarks/bench_eval.py)
_FMNIST_EVAL = 1000


@TASKS.register("fashion_mnist")
class FashionMNISTSpec(TaskSpec):
    """Fashion-MNIST (Xiao et al., 2017): 50k/10k/10k, per-pixel standardisation, MLP 784-50-10.

    Paper defaults: batch 50, 10 epochs; softmax cross-entropy.
    """

    name: Literal["fashion_mnist"] = "fashion_mnist"

    def build(
        self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> FashionMNISTTask:
        """Load (or download) the IDX files onto ``device`` and build the MLP."""

        def get(name: str) -> np.ndarray:
            path = ensure_file(f"fashion_mnist/{name}", self.data_dir, download=self.download)
            return read_idx(path)

        x = get("train-images-idx3-ubyte.gz").reshape(-1, 784)
        y = get("train-labels-idx1-ubyte.gz")
        xt = get("t10k-images-idx3-ubyte.gz").reshape(-1, 784)
        yt = get("t10k-labels-idx1-ubyte.gz")
        task = _image_task(
            FashionMNISTTask, self, torch.device(device), dtype, (x, y), (xt, yt),
            len(x) * 5 // 6, (0,), lambda: MLP([784, 50, 10], init=self.init), 50, 10, _FMNIST_EVAL,
        )  # fmt: skip
        assert isinstance(task, FashionMNISTTask)
        return task


@TASKS.register("svhn")
class SVHNSpec(TaskSpec):
    """SVHN (Netzer et al., 2011) ``train_32x32``/``test_32x32`` (no "extra"); ResNet-18.

    Label 10 is mapped to 0; validation is the last 1/6 of the training file (61,047/12,210/
    26,032); per-channel standardisation. Paper defaults: batch 256, 10 epochs.

    Attributes:
        stem: ``"imagenet"`` (the paper's) or ``"cifar"`` ResNet stem.
    """

    name: Literal["svhn"] = "svhn"
    stem: Literal["imagenet", "cifar"] = "imagenet"

    def build(
        self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> SVHNTask:
        """Load (or download) the ``.mat`` files onto ``device`` and build the ResNet-18."""
        kw = {"download": self.download}
        x, y = load_svhn_mat(ensure_file("svhn/train_32x32.mat", self.data_dir, **kw))  # type: ignore[arg-type]
        xt, yt = load_svhn_mat(ensure_file("svhn/test_32x32.mat", self.data_dir, **kw))  # type: ignore[arg-type]
        task = _image_task(
            SVHNTask, self, torch.device(device), dtype, (x, y), (xt, yt), len(x) * 5 // 6,
            (0, 2, 3), lambda: ResNet18(10, 3, self.stem, self.init), 256, 10, 500,
        )  # fmt: skip
        assert isinstance(task, SVHNTask)
        return task


@TASKS.register("cifar10")
class CIFAR10Spec(TaskSpec):
    """CIFAR-10 (Krizhevsky, 2009) python batches: 45k/5k/10k; ResNet-18; pad-4 crop + flip.

    Reads ``cifar10/cifar-10-batches-py/`` if it exists in the data directory, otherwise
    ``cifar10/cifar-10-python.tar.gz`` (downloaded when missing). Paper defaults: batch 128,
    72 epochs.

    Attributes:
        stem: ``"imagenet"`` (the paper's) or ``"cifar"`` ResNet stem.
        augment: random crop and flip of training batches (the paper: on).
    """

    name: Literal["cifar10"] = "cifar10"
    stem: Literal["imagenet", "cifar"] = "imagenet"
    augment: bool = True

    def build(
        self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> CIFAR10Task:
        """Load (or download) CIFAR-10 onto ``device`` and build the ResNet-18."""
        from qlrlab.data import get_data_dir

        extracted = get_data_dir(self.data_dir) / "cifar10" / "cifar-10-batches-py"
        if extracted.is_dir():
            source = extracted
        else:
            source = ensure_file(
                "cifar10/cifar-10-python.tar.gz", self.data_dir, download=self.download
            )
        (x, y), (xt, yt) = load_cifar10(source)
        task = _image_task(
            CIFAR10Task, self, torch.device(device), dtype, (x, y), (xt, yt), len(x) * 9 // 10,
            (0, 2, 3), lambda: ResNet18(10, 3, self.stem, self.init), 128, 72, 500,
        )  # fmt: skip
        assert isinstance(task, CIFAR10Task)
        task.augment = self.augment
        return task
