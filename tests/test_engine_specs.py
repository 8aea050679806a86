"""Specs of the experiment engine: overrides, value generators, planning, hashing, YAML errors."""

from __future__ import annotations

import math

import pytest

from qlrlab.engine.specs import (
    AblationSpec,
    RunSpec,
    SpecError,
    TuneSpec,
    apply_overrides,
    expand_values,
    load_yaml,
    parse_override,
    parse_value,
    plan_ablation,
    run_hash,
)

BASE = {
    "task": {"name": "uci_energy", "subset": 64},
    "optimizer": "adamqlr",
    "batch_size": 32,
    "budget": {"steps": 5},
    "device": "cpu",
}


def test_parse_value_types():
    assert parse_value("1e-3") == pytest.approx(1e-3)
    assert parse_value("3") == 3 and isinstance(parse_value("3"), int)
    assert parse_value("true") is True
    assert parse_value("null") is None
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("{name: hessian}") == {"name": "hessian"}
    assert parse_value("hessian") == "hessian"
    assert parse_override("a.b=2") == ("a.b", 2)
    with pytest.raises(SpecError, match="no '='"):
        parse_override("a.b")


def test_preset_resolution_and_dotted_override():
    spec = apply_overrides(BASE, [("optimizer.damping.initial", 1e-2)])
    assert spec.optimizer["damping"]["initial"] == pytest.approx(1e-2)
    assert spec.optimizer["direction"]["name"] == "adam"
    assert spec.task["subset"] == 64
    # preset with arguments and nested overrides
    spec = apply_overrides({**BASE, "optimizer": {"preset": "sgd", "args": {"lr": 0.5}}}, [])
    assert spec.optimizer["step_size"]["lr"] == pytest.approx(0.5)


def test_component_swap_by_name_and_one_minus():
    spec = apply_overrides(BASE, [("optimizer.curvature.name", "hessian")])
    assert spec.optimizer["curvature"]["name"] == "hessian"
    spec = apply_overrides(BASE, [("optimizer.damping.name", "constant")])
    assert spec.optimizer["damping"] == {"name": "constant", "value": 0.0}
    spec = apply_overrides(BASE, [("1-optimizer.direction.beta1", 0.01)])
    assert spec.optimizer["direction"]["beta1"] == pytest.approx(0.99)


def test_unknown_key_names_field_and_suggests():
    with pytest.raises(SpecError) as err:
        apply_overrides(BASE, [("optimizer.damping.initail", 1.0)])
    msg = str(err.value)
    assert "optimizer.damping.initail" in msg and "initial" in msg
    with pytest.raises(SpecError, match=r"budget\.stepz"):
        apply_overrides(BASE, [("budget.stepz", 3)])


def test_type_error_in_override():
    with pytest.raises(SpecError) as err:
        apply_overrides(BASE, [("batch_size", "abc")])
    assert "batch_size" in str(err.value) and "integer" in str(err.value)
    with pytest.raises(SpecError, match="initial"):
        apply_overrides(BASE, [("optimizer.damping.initial", -1.0)])


def test_unknown_preset_and_task():
    with pytest.raises(SpecError, match="adamqlr"):
        apply_overrides({**BASE, "optimizer": "adamqrl"}, [])
    with pytest.raises(SpecError, match="task"):
        apply_overrides({**BASE, "task": {"name": "mnits"}}, [])


def test_run_hash_stable_and_ignores_labels():
    a = RunSpec.model_validate(BASE)
    b = RunSpec.model_validate({**BASE, "name": "other", "output_dir": "x", "checkpoint_every": 3})
    c = RunSpec.model_validate({**BASE, "seed": 1})
    assert run_hash(a) == run_hash(b) != run_hash(c)
    assert len(run_hash(a)) == 16


def test_expand_values_generators():
    assert expand_values([1, 2]) == [1, 2]
    lam = expand_values({"logspace": [-8, 0, 17]})
    assert len(lam) == 17 and lam[0] == pytest.approx(1e-8) and lam[-1] == pytest.approx(1.0)
    inc = expand_values({"logspace": [0, 2, 11], "base": 2})
    dec = expand_values({"logspace": [0, 2, 11], "base": 2, "reciprocal": True})
    assert all(math.isclose(i * d, 1.0) for i, d in zip(inc, dec))
    assert expand_values({"linspace": [0, 1, 3], "one_minus": True}) == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="unknown value generator"):
        expand_values({"range": [1, 2]})


def test_plan_ablation_product_minus_and_sweeps():
    spec = AblationSpec.model_validate(
        {
            "base": BASE,
            "variants": {
                "adam": "adam",
                "undamped": {"optimizer": "adamqlr", "minus": ["damping"]},
                "hessian": {"optimizer.curvature.name": "hessian"},
            },
            "grid": {"batch_size": [16, 32]},
            "seeds": [0, 1],
        }
    )
    runs = plan_ablation(spec)
    assert len(runs) == 3 * 2 * 2
    und = next(r for r in runs if r.labels["variant"] == "undamped")
    assert und.spec.optimizer["damping"] == {"name": "constant", "value": 0.0}
    assert len({r.hash for r in runs}) == len(runs)
    sweep = AblationSpec.model_validate(
        {
            "base": BASE,
            "sweeps": [
                {
                    "name": "stepping",
                    "set": {
                        "optimizer.damping.increase": {"logspace": [0, 2, 3], "base": 2},
                        "optimizer.damping.decrease": {
                            "logspace": [0, 2, 3],
                            "base": 2,
                            "reciprocal": True,
                        },
                    },
                }
            ],
            "repeats": 2,
        }
    )
    runs = plan_ablation(sweep)
    assert len(runs) == 3 * 2
    last = runs[-1].spec.optimizer["damping"]
    assert last["increase"] == pytest.approx(4.0) and last["decrease"] == pytest.approx(0.25)
    assert runs[-1].labels["sweep"] == "stepping"


def test_plan_ablation_error_names_variant_and_line(tmp_path):
    path = tmp_path / "abl.yaml"
    path.write_text(
        "base:\n"
        "  task: {name: uci_energy}\n"
        "  optimizer: adamqlr\n"
        "variants:\n"
        "  bad:\n"
        "    optimizer.damping.initail: 1.0\n"
    )
    raw, lines = load_yaml(path)
    with pytest.raises(SpecError) as err:
        plan_ablation(AblationSpec.model_validate(raw), source=str(path), lines=lines)
    assert err.value.line == 6
    assert "variants.bad" in str(err.value) and "initial" in str(err.value)


def test_malformed_yaml_reports_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("base:\n  task: {name: uci_energy\n  optimizer: adam\n")
    with pytest.raises(SpecError) as err:
        load_yaml(path)
    assert err.value.line is not None and err.value.line >= 2
    assert str(path) in str(err.value) and "fix" in str(err.value)


def test_yaml_is_safe_loaded(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("x: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(SpecError, match="malformed YAML"):
        load_yaml(path)


def test_tune_space_one_minus():
    spec = TuneSpec.model_validate(
        {
            "base": BASE,
            "space": {
                "1-optimizer.direction.beta1": {"type": "log_uniform", "low": 1e-4, "high": 0.3},
                "optimizer.direction.beta2": {
                    "type": "log_uniform",
                    "low": 1e-4,
                    "high": 0.1,
                    "one_minus": True,
                },
                "batch_size": {"type": "choice", "choices": [16, 32]},
            },
        }
    )
    over = dict(
        spec.params_to_overrides(
            {
                "1-optimizer.direction.beta1": 0.1,
                "optimizer.direction.beta2": 0.01,
                "batch_size": 16,
            }
        )
    )
    assert over["optimizer.direction.beta1"] == pytest.approx(0.9)
    assert over["optimizer.direction.beta2"] == pytest.approx(0.99)
    assert over["batch_size"] == 16


def test_run_hash_leaves_later_fields_out_at_their_default():
    """nan_padding (added later) is part of a run's identity only when it is switched on, so
    result directories from before it keep their hashes."""
    import hashlib
    import json

    from qlrlab.engine.specs import NON_IDENTITY_FIELDS

    a = RunSpec.model_validate(BASE)
    b = RunSpec.model_validate({**BASE, "nan_padding": True})
    assert run_hash(a) != run_hash(b)
    old = a.model_dump(mode="json", exclude=set(NON_IDENTITY_FIELDS) | {"nan_padding"})
    old["eval"].pop("every_seconds")  # a nested field added later (eval.every_seconds)
    text = json.dumps(old, sort_keys=True, separators=(",", ":"), default=str)
    assert run_hash(a) == hashlib.sha256(text.encode()).hexdigest()[:16]
    timed = RunSpec.model_validate({**BASE, "eval": {"every_seconds": 0.5}})
    assert run_hash(timed) != run_hash(a)


@pytest.mark.parametrize(
    "optimizer, words",
    [
        ("kfac", "BackPACK"),
        ({"preset": "adamqlr", "curvature.backend": "curvlinops"}, "curvlinops"),
        ({"preset": "adamqlr", "curvature": {"name": "empirical_fisher"}}, "empirical_fisher"),
    ],
)
def test_nan_padding_rejects_optimizers_it_cannot_emulate(optimizer, words):
    with pytest.raises(SpecError, match=f"nan_padding.*{words}"):
        apply_overrides({**BASE, "optimizer": optimizer, "nan_padding": True}, [])
    for ok in ("adamqlr", "adamqlr_hessian", "adam"):
        RunSpec.model_validate({**BASE, "optimizer": ok, "nan_padding": True})


def test_nan_padding_support_is_declared_by_the_components():
    """The engine asks each component (its ``supports_nan_padding``, or its family's default when
    it declares nothing) instead of keeping a table of component names."""
    from typing import ClassVar, Literal

    from qlrlab.curvature.ggn import GGNSpec
    from qlrlab.directions.adam import AdamSpec
    from qlrlab.registry import CURVATURES, DIRECTIONS

    @DIRECTIONS.register("no_padding_adam")
    class NoPaddingAdam(AdamSpec):
        name: Literal["no_padding_adam"] = "no_padding_adam"  # type: ignore[assignment]
        supports_nan_padding: ClassVar[bool] = False

    @CURVATURES.register("undeclared_ggn")
    class UndeclaredGGN(GGNSpec):
        name: Literal["undeclared_ggn"] = "undeclared_ggn"  # type: ignore[assignment]
        supports_nan_padding: ClassVar[bool | None] = None

    @CURVATURES.register("declared_ggn")
    class DeclaredGGN(GGNSpec):
        name: Literal["declared_ggn"] = "declared_ggn"  # type: ignore[assignment]

    try:
        run = {**BASE, "nan_padding": True}
        with pytest.raises(ValueError, match="nan_padding: direction 'no_padding_adam' has no NaN"):
            RunSpec.model_validate(
                {
                    **run,
                    "optimizer": {"preset": "adamqlr", "direction": {"name": "no_padding_adam"}},
                }
            )
        # a curvature that declares nothing takes its family's default: not supported
        with pytest.raises(ValueError, match="nan_padding: curvature 'undeclared_ggn' has no NaN"):
            RunSpec.model_validate(
                {**run, "optimizer": {"preset": "adamqlr", "curvature": {"name": "undeclared_ggn"}}}
            )
        # ... one that inherits GGN's declaration (and its back-end rule) is
        RunSpec.model_validate(
            {**run, "optimizer": {"preset": "adamqlr", "curvature": {"name": "declared_ggn"}}}
        )
        with pytest.raises(ValueError, match="curvlinops back-end"):
            RunSpec.model_validate(
                {
                    **run,
                    "optimizer": {
                        "preset": "adamqlr",
                        "curvature": {"name": "declared_ggn", "backend": "curvlinops"},
                    },
                }
            )
    finally:
        DIRECTIONS.unregister("no_padding_adam")
        CURVATURES.unregister("undeclared_ggn")
        CURVATURES.unregister("declared_ggn")


#: run hashes computed by the code before the GGN back-end ``own`` was renamed ``auto`` (and
#: before the engine split): result folders named by them must keep their names
STORED_HASHES = {
    "adamqlr": ("adamqlr", "c5909be1dbc98359"),
    "adamqlr, backend own": ({"preset": "adamqlr", "curvature.backend": "own"}, "c5909be1dbc98359"),
    "adamqlr, backend auto": (
        {"preset": "adamqlr", "curvature.backend": "auto"},
        "c5909be1dbc98359",
    ),
    "adamqlr, backend fast": (
        {"preset": "adamqlr", "curvature.backend": "fast"},
        "4c8d1b9385dcc379",
    ),
    "adamqlr_hessian": ("adamqlr_hessian", "feeddb1420189a13"),
    "adam": ("adam", "faa28a82f1cfce2f"),
}


@pytest.mark.parametrize("case", sorted(STORED_HASHES))
def test_stored_run_hashes_are_unchanged(case):
    optimizer, stored = STORED_HASHES[case]
    spec = RunSpec.model_validate({**BASE, "optimizer": optimizer})
    assert run_hash(spec) == stored
    # a stored spec.json reads back with the same hash
    assert run_hash(RunSpec.model_validate(spec.model_dump(mode="json"))) == stored


def test_ggn_backend_own_is_read_as_auto_and_stored_as_before():
    from qlrlab import OptimizerSpec
    from qlrlab.curvature.ggn import GGNSpec

    assert GGNSpec().backend == "auto"
    assert GGNSpec(backend="own").backend == "auto"
    assert GGNSpec.model_validate({"backend": "own"}).model_dump()["backend"] == "auto"
    # the JSON form (spec.json, run identities) keeps the former spelling
    assert GGNSpec(backend="auto").model_dump(mode="json")["backend"] == "own"
    assert GGNSpec(backend="fast").model_dump(mode="json")["backend"] == "fast"
    opt = OptimizerSpec.model_validate({"direction": "adam", "curvature": {"name": "ggn"}})
    assert opt.model_dump(mode="json")["curvature"] == {"name": "ggn", "backend": "own"}
    assert OptimizerSpec.model_validate(opt.model_dump(mode="json")).curvature.backend == "auto"
    with pytest.raises(ValueError, match="backend"):
        GGNSpec(backend="mine")
