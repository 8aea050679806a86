"""Tables and plots from an output directory (paper §5.1).

For each group of runs (task × variant, plus grid point or sweep value) over seeds, the table
gives the **median** and a **bootstrap standard error** of the median (the standard deviation of
the medians of bootstrap resamples) of the final train loss, test loss, test accuracy, steps and
training time, in Markdown, CSV and LaTeX. Plots (PNG and PDF, matplotlib's Agg canvas) show the
median curve with a bootstrap band against steps and against time (training time, excluding
evaluation, unless ``time_axis="wall"``), the α and λ trajectories, and sensitivity sweeps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qlrlab.engine.storage import RunStore, atomic_write_text, confined, safe_name

__all__ = ["bootstrap_se", "build_report", "collect_runs", "summary_table"]

#: (summary key, column title, is it a loss/accuracy shown in scientific notation)
TABLE_METRICS: list[tuple[str, str]] = [
    ("final_train_loss", "train loss"),
    ("final_test_loss", "test loss"),
    ("final_test_accuracy", "test accuracy"),
    ("steps", "steps"),
    ("train_time", "time (s)"),
]
GROUP_KEYS = ["task", "variant", "grid", "sweep", "value"]


def bootstrap_se(values: Sequence[float], n_boot: int = 200, seed: int = 0) -> float:
    """Bootstrap standard error of the median of ``values`` (non-finite values dropped).

    Args:
        values: the per-seed values.
        n_boot: number of bootstrap resamples.
        seed: seeds the resampling, so reports are reproducible.

    Returns:
        The standard deviation of the resampled medians (``nan`` without finite values, 0 for
        one value).
    """
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return float("nan")
    if len(x) == 1:
        return 0.0
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    return float(np.median(x[idx], axis=1).std(ddof=1))


def collect_runs(out_dir: str | Path, kinds: Sequence[str] = ("run", "repeat")) -> pd.DataFrame:
    """One row per index entry that has a summary: labels + summary fields.

    Args:
        out_dir: the output directory.
        kinds: which run kinds to include (``trial`` runs of a study are left out by default).

    Returns:
        A DataFrame (empty when nothing finished yet).
    """
    store = RunStore(out_dir)
    rows = []
    for e in store.iter_entries():
        labels = dict(e["labels"])
        if labels.get("kind", "run") not in kinds or not e["summary"]:
            continue
        s = {k: v for k, v in e["summary"].items() if k not in ("labels", "traceback")}
        row = {k: labels.get(k) for k in GROUP_KEYS}
        row["seed"] = labels.get("seed")
        row["kind"] = labels.get("kind", "run")
        row.update(s)
        rows.append(row)
    return pd.DataFrame(rows)


def _groups(df: pd.DataFrame) -> list[tuple[dict[str, Any], pd.DataFrame]]:
    keys = [k for k in GROUP_KEYS if k in df and df[k].notna().any()]
    if not keys:
        return [({}, df)]
    filled = df.copy()
    for k in keys:
        filled[k] = filled[k].map(
            lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else v
        )
    out = []
    for vals, g in filled.groupby(keys, sort=False, dropna=False):
        vals = vals if isinstance(vals, tuple) else (vals,)
        out.append((dict(zip(keys, vals)), df.loc[g.index]))
    return out


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """Median and bootstrap SE per group.

    Returns:
        One row per group: the group labels, ``n`` (runs), ``diverged``, ``failed``, and
        ``<metric>_median`` / ``<metric>_se`` for each of :data:`TABLE_METRICS`.
    """
    rows = []
    for labels, g in _groups(df):
        row: dict[str, Any] = dict(labels)
        row["n"] = len(g)
        row["diverged"] = int((g.get("status") == "diverged").sum()) if "status" in g else 0
        row["failed"] = int((g.get("status") == "failed").sum()) if "status" in g else 0
        for key, _ in TABLE_METRICS:
            vals = [float(v) for v in pd.to_numeric(g[key], errors="coerce")] if key in g else []
            finite_vals = [v for v in vals if math.isfinite(v)]
            row[f"{key}_median"] = float(np.median(finite_vals)) if finite_vals else float("nan")
            row[f"{key}_se"] = bootstrap_se(finite_vals)
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt(m: float, se: float, key: str) -> str:
    if not math.isfinite(m):
        return "—"
    if key == "steps":
        return f"{m:.0f} ± {se:.0f}"
    if key == "train_time":
        return f"{m:.3g} ± {se:.2g}"
    if key == "final_test_accuracy":
        return f"{m:.4f} ± {se:.4f}"
    return f"{m:.4g} ± {se:.2g}"


def _label_cols(table: pd.DataFrame) -> list[str]:
    return [k for k in GROUP_KEYS if k in table]


def _markdown(table: pd.DataFrame) -> str:
    label_cols = _label_cols(table)
    metrics = [(k, t) for k, t in TABLE_METRICS if table[f"{k}_median"].notna().any()]
    head = [*label_cols, "n", *[t for _, t in metrics]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        n = f"{r['n']}" + (f" ({r['diverged']} div.)" if r["diverged"] else "")
        n += f" ({r['failed']} failed)" if r["failed"] else ""
        cells = [str(r[c]) for c in label_cols] + [n]
        cells += [_fmt(r[f"{k}_median"], r[f"{k}_se"], k) for k, _ in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _latex_escape(s: str) -> str:
    for a, b in (
        ("\\", r"\textbackslash{}"),
        ("_", r"\_"),
        ("%", r"\%"),
        ("&", r"\&"),
        ("#", r"\#"),
        ("$", r"\$"),
        ("{", r"\{"),
        ("}", r"\}"),
    ):
        s = s.replace(a, b)
    return s


def _latex(table: pd.DataFrame) -> str:
    label_cols = _label_cols(table)
    metrics = [(k, t) for k, t in TABLE_METRICS if table[f"{k}_median"].notna().any()]
    cols = "l" * len(label_cols) + "r" + "r" * len(metrics)
    out = [r"\begin{tabular}{" + cols + "}", r"\toprule"]
    out.append(" & ".join([*label_cols, "n", *[t for _, t in metrics]]) + r" \\")
    out.append(r"\midrule")
    for _, r in table.iterrows():
        cells = [_latex_escape(str(r[c])) for c in label_cols] + [str(r["n"])]
        for k, _ in metrics:
            cells.append(
                _latex_escape(_fmt(r[f"{k}_median"], r[f"{k}_se"], k)).replace("±", r"$\pm$")
            )
        out.append(" & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _new_figure(ncols: int, nrows: int = 1) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    height = 3.2 * nrows + 0.4
    fig = Figure(figsize=(4.2 * ncols, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    # a fixed layout: the constrained/tight layout engines cost seconds per figure
    fig.subplots_adjust(
        left=0.8 / (4.2 * ncols),
        right=0.98,
        bottom=0.55 / height,
        top=1 - 0.5 / height,
        wspace=0.35,
        hspace=0.45,
    )
    return fig, axes


def _save(fig: Any, root: Path, stem: str) -> list[Path]:
    paths = []
    for ext in ("png", "pdf"):
        p = confined(root, f"{stem}.{ext}")
        tmp = p.with_name(f".{p.name}.tmp")
        fig.savefig(tmp, format=ext, dpi=100)
        tmp.replace(p)
        paths.append(p)
    return paths


def _median_band(
    curves: list[tuple[np.ndarray, np.ndarray]], n_grid: int = 200, n_boot: int = 50
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    curves = [(x, y) for x, y in curves if len(x) > 0]
    if not curves:
        return None
    xmax = max(float(x.max()) for x, _ in curves)
    xmin = min(float(x.min()) for x, _ in curves)
    if (
        len({len(x) for x, _ in curves}) == 1
        and all(len(x) <= n_grid for x, _ in curves)
        and all(np.array_equal(x, curves[0][0]) for x, _ in curves)
    ):
        grid = curves[0][0].astype(float)
    else:
        grid = np.linspace(xmin, xmax, n_grid)
    mat = np.full((len(curves), len(grid)), np.nan)
    for i, (x, y) in enumerate(curves):
        inside = (grid >= x.min()) & (grid <= x.max())
        mat[i, inside] = np.interp(grid[inside], x, y)
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(mat, axis=0)
            # the median is only shown where at least half of the runs still have data
            present = np.isfinite(mat).sum(axis=0)
            med[present < math.ceil(len(curves) / 2)] = np.nan
            if len(curves) > 1:
                rng = np.random.default_rng(0)
                idx = rng.integers(0, len(curves), size=(n_boot, len(curves)))
                boots = np.nanmedian(mat[idx], axis=1)
                se = np.nanstd(boots, axis=0)
            else:
                se = np.zeros_like(med)
    return grid, med, se


def _curve(df: pd.DataFrame, x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    if y not in df or x not in df:
        return np.array([]), np.array([])
    sub = df[[x, y]].apply(pd.to_numeric, errors="coerce").dropna()
    sub = sub[np.isfinite(sub[y]) & np.isfinite(sub[x])]
    sub = sub.drop_duplicates(subset=x, keep="last").sort_values(x)
    return sub[x].to_numpy(float), sub[y].to_numpy(float)


def _plot_groups(
    ax: Any,
    groups: list[tuple[str, list[pd.DataFrame]]],
    x: str,
    y: str,
    *,
    logy: bool,
) -> bool:
    drawn = False
    for label, frames in groups:
        band = _median_band([_curve(f, x, y) for f in frames])
        if band is None:
            continue
        grid, med, se = band
        lower, upper = med - se, med + se
        if logy:
            # on a log axis the band is the bootstrap SE of the median of log-values,
            # exp(log med ± se_log): multiplicative, and positive by construction
            logs = [_curve(f, x, y) for f in frames]
            logs = [(cx, np.log(cy)) for cx, cy in logs if len(cy) and bool(np.all(cy > 0))]
            log_band = _median_band(logs) if len(logs) == len(frames) else None
            if log_band is not None:
                _, lmed, lse = log_band
                lower, upper = np.exp(lmed - lse), np.exp(lmed + lse)
            else:
                lower = np.where(lower > 0, lower, np.nan)
        (line,) = ax.plot(grid, med, label=label, lw=1.3)
        ax.fill_between(grid, lower, upper, color=line.get_color(), alpha=0.25, lw=0)
        drawn = True
    if drawn and logy:
        ys = [c for _, fr in groups for f in fr for c in _curve(f, x, y)[1]]
        if any(v > 0 for v in ys):
            ax.set_yscale("log", nonpositive="mask")
    return drawn


def _curve_plots(df: pd.DataFrame, store: RunStore, root: Path, time_col: str) -> list[Path]:
    paths: list[Path] = []
    for task, tdf in df.groupby("task", sort=False):
        base = tdf[tdf["sweep"].isna()] if "sweep" in tdf else tdf
        if base.empty:
            continue
        groups: list[tuple[str, list[pd.DataFrame]]] = []
        for labels, g in _groups(base.drop(columns=["task"])):
            frames = [m for m in (store.metrics(h) for h in g["hash"]) if m is not None]
            groups.append((" ".join(str(v) for v in labels.values() if v != "") or "run", frames))
        classification = bool(tdf.get("classification", pd.Series([False])).fillna(False).any())
        ys = [("loss", "train batch loss", True), ("test_loss", "test loss", True)]
        if classification:
            ys.append(("test_accuracy", "test accuracy", False))
        xs = [("step", "steps"), (time_col, "time (s)" if time_col == "time" else "wall time (s)")]
        fig, axes = _new_figure(len(ys), len(xs))
        for i, (xc, xl) in enumerate(xs):
            for j, (yc, yl, logy) in enumerate(ys):
                ax = axes[i][j]
                _plot_groups(ax, groups, xc, yc, logy=logy)
                ax.set_xlabel(xl)
                ax.set_ylabel(yl)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(str(task))
        paths += _save(fig, root, f"curves_{safe_name(task)}")
        # alpha and lambda trajectories
        fig, axes = _new_figure(2)
        for j, (yc, yl) in enumerate((("alpha", "step size α"), ("damping", "damping λ"))):
            _plot_groups(axes[0][j], groups, "step", yc, logy=True)
            axes[0][j].set_xlabel("steps")
            axes[0][j].set_ylabel(yl)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{task}: trajectories")
        paths += _save(fig, root, f"trajectories_{safe_name(task)}")
    return paths


def _sensitivity_plots(df: pd.DataFrame, root: Path) -> list[Path]:
    paths: list[Path] = []
    if "sweep" not in df or df["sweep"].isna().all():
        return paths
    sw = df[df["sweep"].notna()]
    for (task, sweep), g in sw.groupby(["task", "sweep"], sort=False):
        metrics = [("final_train_loss", "final train loss"), ("final_test_loss", "final test loss")]
        if g.get("classification", pd.Series([False])).fillna(False).any():
            metrics.append(("final_test_accuracy", "final test accuracy"))
        fig, axes = _new_figure(len(metrics))
        for j, (key, title) in enumerate(metrics):
            ax = axes[0][j]
            for variant, vg in g.groupby("variant", sort=False):
                pts = []
                for value, pg in vg.groupby("value", sort=True):
                    vals = [float(v) for v in pd.to_numeric(pg[key], errors="coerce")]
                    vals = [v for v in vals if math.isfinite(v)]
                    if vals and isinstance(value, (int, float)):
                        pts.append((float(value), float(np.median(vals)), bootstrap_se(vals)))
                if not pts:
                    continue
                x, m, e = (np.array(c) for c in zip(*sorted(pts)))
                ax.errorbar(x, m, yerr=e, marker="o", ms=3, capsize=2, label=str(variant))
                if (x > 0).all() and x.max() / x.min() > 20:
                    ax.set_xscale("log")
            ax.set_xlabel(str(sweep))
            ax.set_ylabel(title)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{task}: sensitivity to {sweep}")
        paths += _save(fig, root, f"sensitivity_{safe_name(task)}_{safe_name(sweep)}")
    return paths


def build_report(
    out_dir: str | Path,
    *,
    kinds: Sequence[str] = ("run", "repeat"),
    time_axis: str = "train",
    plots: bool = True,
) -> dict[str, Any]:
    """Write ``OUT/report/``: ``table.md``, ``table.csv``, ``table.tex``, ``runs.csv`` and plots.

    Args:
        out_dir: the output directory of a run, ablation or study.
        kinds: run kinds to include.
        time_axis: ``train`` (training time, excluding evaluation) or ``wall``.
        plots: also draw the plots.

    Returns:
        ``{"dir", "table_md", "table_csv", "table_tex", "runs_csv", "plots": [...], "table"}``.

    Raises:
        FileNotFoundError: ``out_dir`` has no ``index.json``.
    """
    store = RunStore(out_dir)
    if not store.index_path.exists():
        raise FileNotFoundError(f"{store.root} has no index.json: not a qlrlab output directory")
    root = confined(store.root, "report")
    root.mkdir(parents=True, exist_ok=True)
    df = collect_runs(store.root, kinds)
    out: dict[str, Any] = {"dir": root, "plots": []}
    if df.empty:
        atomic_write_text(root / "table.md", "No finished runs yet.\n")
        out["table_md"] = root / "table.md"
        out["table"] = pd.DataFrame()
        return out
    table = summary_table(df)
    out["table"] = table
    atomic_write_text(root / "table.md", _markdown(table))
    atomic_write_text(root / "table.csv", table.to_csv(index=False))
    atomic_write_text(root / "table.tex", _latex(table))
    atomic_write_text(root / "runs.csv", df.to_csv(index=False))
    out.update(
        table_md=root / "table.md",
        table_csv=root / "table.csv",
        table_tex=root / "table.tex",
        runs_csv=root / "runs.csv",
    )
    best = store.root / "best.json"
    if best.exists():
        data = json.loads(best.read_text())
        lines = ["| hyperparameter | value |", "|---|---|"]
        lines += [
            f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
            for k, v in (data.get("overrides") or {}).items()
        ]
        lines.append(f"\nbest {data.get('metric')} ({data.get('scope')}): {data.get('value')}")
        atomic_write_text(root / "best_hyperparameters.md", "\n".join(lines) + "\n")
        out["best_md"] = root / "best_hyperparameters.md"
    if plots:
        ok = df[df["status"].isin(["completed", "diverged", "pruned"])] if "status" in df else df
        time_col = "time" if time_axis == "train" else "wall_time"
        out["plots"] += _curve_plots(ok, store, root, time_col)
        out["plots"] += _sensitivity_plots(ok, root)
    return out
