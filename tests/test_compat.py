"""qlrlab._compat: the private torch APIs behind feature detection, and their fallbacks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from qlrlab import _compat
from qlrlab.directions.adam import AdamDirection

ROOT = Path(__file__).resolve().parents[1] / "qlrlab"
PRIVATE = ("_fused_adam_", "peek_interpreter_stack", "_global_forward_hooks", "_call_impl",
           "_compiled_call_impl", "_version", "_global_backward_hooks")  # fmt: skip


def test_private_torch_apis_only_in_compat() -> None:
    """Attribute accesses of those names live in _compat (BackPACK's table is issue 14's)."""
    found = []
    for path in ROOT.rglob("*.py"):
        if path.name == "_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in PRIVATE:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert not found, found


def test_detection_on_this_torch() -> None:
    assert _compat.fused_adam is getattr(torch, "_fused_adam_", None)
    assert not _compat.in_functorch_transform()
    seen = []
    torch.func.vmap(lambda x: seen.append(_compat.in_functorch_transform()) or x)(torch.ones(2))
    assert seen == [True]


def test_global_hooks_and_plain_calls() -> None:
    assert not _compat.global_module_hooks()
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert _compat.global_module_hooks() and _compat.global_module_hooks(backward=False)
    finally:
        handle.remove()

    class Called(nn.Linear):
        def __call__(self, *a, **k):
            return super().__call__(*a, **k)

    assert _compat.plain_module_call(nn.Linear(2, 2))
    assert not _compat.plain_module_call(Called(2, 2))


def test_version_counter_and_unknown_fallback() -> None:
    t = torch.zeros(3)
    v = _compat.version(t)
    assert not _compat.written_since(t, v)
    t.add_(1)
    assert _compat.written_since(t, v)
    assert _compat.written_since(t, None)  # unknown counts as written


def test_adam_without_the_fused_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no fused kernel (older or other torch builds) Adam falls back to foreach ops."""
    from qlrlab.interfaces import StepContext

    params = [torch.randn(3, 2, dtype=torch.float64), torch.randn(2, dtype=torch.float64)]
    grads = [torch.randn_like(p) for p in params]
    outs = []
    for kernel in (_compat.fused_adam, None):
        monkeypatch.setattr(_compat, "fused_adam", kernel)
        adam = AdamDirection()
        adam.setup(params, nn.Linear(1, 1), nn.MSELoss())
        ctx = StepContext(problem=None, grads=grads, step=1, damping=0.0, curvature=None,
                          param_groups=[], group_index=[])  # type: ignore[arg-type]  # fmt: skip
        outs.append([adam.compute(grads, ctx) for _ in range(3)][-1])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
