"""Bad input gets exit code 2 and a message naming the field and the fix, never a traceback
or a silent acceptance (issue 15). The cases are those of ``benchmarks/bad_inputs.py``, which
runs them in fresh processes and counts the outcomes; here each is asserted in-process."""

from __future__ import annotations

import errno
import importlib.util
from pathlib import Path

import pytest
import torch

from qlrlab.cli import main

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bad_inputs", ROOT / "benchmarks" / "bad_inputs.py")
assert _spec is not None and _spec.loader is not None
bad_inputs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bad_inputs)

#: text each message must hold (besides "fix:"), per case
NAMES = {
    "misspelt preset override": ["damping.intial", "did you mean initial"],
    "non-UTF-8 spec file": ["spec.yaml:7", "UTF-8"],
    "--out on a read-only file system": ["--out", "/sys/qlrlab-bad-input"],
    "--out under a file": ["--out", "Not a directory"],
    "seed 10^23": ["seed", "9223372036854775807"],
    "duplicate YAML key": ["spec.yaml:7", "duplicate key 'batch_size'", "line 3"],
    "duplicate variant label": ["variants.A", "duplicate key 'A'"],
    "seeds: []": ["seeds", "at least 1"],
    "grid: {k: []}": ["grid.optimizer.step_size.lr", "empty"],
    "seeds and repeats": ["seeds and repeats"],
    "min_resource > max_resource": ["min_resource 10 exceeds max_resource 2"],
    "--workers 0": ["--workers"],
    "--workers -3": ["--workers"],
    "budget seconds .inf": ["budget.seconds", "finite"],
    "budget seconds .nan": ["budget.seconds", "finite"],
    "logspace 1e8 points": ["grid", "100000000"],
    "unknown component, no --plugin": ["my_damping", "--plugin"],
    "missing dataset, download on": ["could not download", "the download failed"],
}


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def _prepare(name: str, tmp_path: Path) -> tuple[list[str], Path]:
    cmd, text, extra = bad_inputs.CASES[name]
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(text.encode() if isinstance(text, str) else text)
    if b"{nodata}" in spec.read_bytes():
        spec.write_text(spec.read_text().replace("{nodata}", str(tmp_path / "nodata")))
    (tmp_path / "file").write_text("x")
    args = [a.replace("{file}", str(tmp_path / "file")) for a in extra]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    return [cmd, str(spec), "-q", *args], tmp_path / "out"


@pytest.mark.parametrize("name", sorted(NAMES))
def test_bad_input_is_a_clear_error(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QLRLAB_DATA", str(tmp_path / "nodata"))
    monkeypatch.setenv("QLRLAB_MIRROR", "http://127.0.0.1:9/")  # nothing listens: offline
    argv, out = _prepare(name, tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "fix:" in err
    for text in NAMES[name]:
        assert text in err, (text, err)
    assert not (out / "runs").exists()


def test_missing_dataset_without_download_suggests_download(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        bad_inputs.BASE.replace(
            "{name: uci_energy, subset: 64}",
            f"{{name: uci_protein, download: false, data_dir: '{tmp_path / 'nodata'}'}}",
        )
    )
    assert main(["run", str(spec), "-q", "--out", str(tmp_path / "out")]) == 2
    assert "set task.download: true" in capsys.readouterr().err


@pytest.mark.slow
def test_disk_full_is_a_message_not_a_traceback(tmp_path, capsys, monkeypatch):
    """The coordinator's writes failing with ENOSPC (disk full): a message, exit 2."""
    from qlrlab.engine import storage

    real = storage.atomic_write_bytes

    def full(path, data):
        if Path(path).name == "index.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(storage, "atomic_write_bytes", full)
    spec = tmp_path / "abl.yaml"
    spec.write_text(bad_inputs._abl("variants: {a: adam, b: adamqlr}\n"))
    code = main(["ablate", str(spec), "-q", "--workers", "1", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert "No space left on device" in err and "index.json" in err and "fix:" in err


@pytest.mark.slow
def test_huge_damping_run_reports(tmp_path, capsys):
    """damping.initial 1e308: the run completes and its report is written (it crashed in the
    λ plot's log axis)."""
    argv, out = _prepare("damping.initial 1e308", tmp_path)
    assert main(argv) == 0, capsys.readouterr().err
    assert (out / "report" / "table.md").exists()
    assert (out / "report" / "trajectories_uci_energy.png").exists()
