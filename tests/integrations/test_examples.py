"""The Lightning and Hugging Face examples of docs/training-loop.md run as documented."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.integrations._env import require

require("lightning")
require("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "training_loop"))


def test_lightning_example_runs() -> None:
    import lightning_example

    trainer = lightning_example.main(max_steps=6)
    assert trainer.global_step == 6
    assert "qlr/alpha" in trainer.logged_metrics


def test_hf_example_runs() -> None:
    import hf_trainer

    trainer = hf_trainer.main(max_steps=4)
    assert trainer.state.global_step == 4
    assert trainer.optimizer.optimizer.step_count == 4
