"""The paper study's files (issue 16): tuning specs as the driver writes them, suites whose
"tuned" variants carry exactly their study's best values, and no untuned variant labelled tuned."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from qlrlab.engine.specs import AblationSpec, TuneSpec, load_yaml, plan_ablation

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "examples" / "paper"
CPU_TASKS = ["rosenbrock", "uci_energy", "uci_protein", "fashion_mnist"]


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(PAPER))
    try:
        spec = importlib.util.spec_from_file_location("study", PAPER / "study.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["study"] = mod
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(PAPER))
        sys.modules.pop("study", None)
        sys.modules.pop("suites", None)


def test_committed_tuning_specs_are_what_the_driver_writes(study):
    pairs = study.studies(CPU_TASKS)
    assert len(pairs) == len(list((PAPER / "tuning").glob("*/*.yaml")))
    for task, label in pairs:
        path = study.spec_path(task, label)
        data = yaml.safe_load(path.read_text())
        assert data == study.tune_spec(task, label), path
        spec = TuneSpec.model_validate(data)
        # the paper's protocol: random search, ASHA on seconds with grace 1 s and factor 4,
        # the last validation loss (training loss on Rosenbrock), batch size searched
        assert spec.sampler == "random" and spec.scope == "last"
        assert spec.scheduler.type == "asha" and spec.scheduler.resource == "seconds"
        assert (spec.scheduler.min_resource, spec.scheduler.reduction_factor) == (1, 4)
        assert spec.metric == ("train_loss" if task == "rosenbrock" else "val_loss")
        assert ("batch_size" in spec.space) == (task != "rosenbrock")


def _variants(path: Path) -> dict[str, tuple[str, str]]:
    """name -> (the variant's line, the comment line under it, if any)."""
    lines = path.read_text().splitlines()
    start = lines.index("variants:")
    out = {}
    for i in range(start + 1, len(lines)):
        m = re.match(r"^  ([^:#][^:]*): (\{.*\})", lines[i])
        if not m:
            if not lines[i].startswith("    #"):
                break
            continue
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        out[m.group(1)] = (lines[i], nxt.strip() if nxt.startswith("    #") else "")
    return out


@pytest.mark.parametrize("task", CPU_TASKS)
def test_tuned_variants_carry_their_studys_best_values(study, task):
    path = PAPER / f"{task}.yaml"
    data, _lines = load_yaml(path)
    spec = AblationSpec.model_validate(data)
    assert plan_ablation(spec)  # every run validates
    variants = _variants(path)
    assert set(variants) == set(data["variants"])
    tuned = 0
    for label in study.SCALE[task]["tuned"]:
        record = study.spec_path(task, label).with_suffix(".best.json")
        import suites

        name = suites.display_name(task, label)
        if not record.exists():
            assert name not in variants  # no study: labelled "(defaults, not tuned)"
            continue
        tuned += 1
        best = json.loads(record.read_text())
        assert name in variants, (task, label)
        _line, comment = variants[name]
        assert comment.startswith("# tuned: examples/paper/tuning/"), (name, comment)
        got = data["variants"][name]
        for key, value in best["overrides"].items():
            assert got[key] == pytest.approx(value, rel=1e-3), (name, key)
    assert spec.repeats >= (1 if task == "rosenbrock" else 10)
    assert tuned >= 1


@pytest.mark.parametrize("path", sorted(PAPER.glob("*.yaml")), ids=lambda p: p.name)
def test_no_variant_is_labelled_tuned_without_a_study(path):
    for name, (_line, comment) in _variants(path).items():
        if "tuned" in name.lower() and "untuned" not in name.lower() and "not tuned" not in name:
            assert comment.startswith("# tuned:") or "tuned, as in" in _line, (path.name, name)


def test_a_study_without_a_result_is_labelled_not_tuned(study, tmp_path, monkeypatch):
    import suites

    monkeypatch.setattr(suites, "HERE", tmp_path)
    (tmp_path / "tuning").mkdir()
    tuned = {label: None for label in study.SCALE["uci_energy"]["tuned"]}
    tuned["Adam"] = {
        "overrides": {"optimizer.step_size.lr": 0.0123, "batch_size": 400},
        "n_trials": 7, "metric": "val_loss", "value": 0.25,
    }  # fmt: skip
    path = suites.write_suite("uci_energy", tuned, study.SCALE["uci_energy"])
    data = yaml.safe_load(path.read_text())
    assert data["variants"]["Adam"]["optimizer.step_size.lr"] == 0.0123
    assert "AdamQLR (defaults, not tuned)" in data["variants"]
    assert not any(n.endswith("(Tuned)") for n in data["variants"])
    assert "7 trials; best last val_loss 0.25" in path.read_text()
