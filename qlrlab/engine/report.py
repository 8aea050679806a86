"""Tables and plots from an output directory (paper §5.1).

For each group of runs (task × variant, plus grid point or sweep value) over seeds, the table
gives the **median** and a **bootstrap standard error** of the median (the standard deviation of
the medians of bootstrap resamples) of the final train loss, test loss, test accuracy, steps and
training time, in Markdown, CSV and LaTeX, with ``n`` (the number of runs, i.e. seeds) per row.
Plots (PNG and PDF, matplotlib's Agg canvas) show the median curve with a band of ± one
bootstrap SE of that median against steps and against time, the α and λ trajectories, and
sensitivity sweeps. Conventions (each figure states them in its caption):

* Line and band are the same statistic: on a log axis both are computed from log values (the
  line is the median of log values, the band ± its bootstrap SE, exponentiated), on a linear
  axis from the values themselves; so the line always lies inside its band.
* Time is training time excluding evaluation (``time_axis="wall"``: including it) **and
  excluding warm-up**, the first optimiser step of each process (allocation and kernel
  selection: tenths of a second against milliseconds later), as logged in ``warmup_time``.
* α is drawn on a symmetric-log axis, so negative step sizes are shown (marked ▼), not masked.
* λ is drawn on a log axis; variants whose damping is identically zero cannot appear there and
  are named in the panel instead.

Besides the tables, ``report/metrics.parquet`` is one tidy table of every logged step of every
run: run identity (hash, kind, task, variant, seed, grid, sweep, value), every setting that
varies between the runs (dotted spec keys), then the per-step metrics; each run's rows equal its
``runs/<hash>/metrics.parquet``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from qlrlab.engine.storage import (
    RunStore,
    atomic_write_text,
    confined,
    safe_name,
    write_parquet_atomic,
)

__all__ = ["bootstrap_se", "build_report", "collect_runs", "summary_table", "tidy_metrics"]

#: (summary key, column title, is it a loss/accuracy shown in scientific notation)
TABLE_METRICS: list[tuple[str, str]] = [
    ("final_train_loss", "train loss"),
    ("final_train_accuracy", "train accuracy"),
    ("final_test_loss", "test loss"),
    ("final_test_accuracy", "test accuracy"),
    ("generalisation_gap", "gen. gap"),
    ("steps", "steps"),
    ("time_excl_warmup", "time (s)"),
    ("wall_time", "wall time (s)"),
]
GROUP_KEYS = ["task", "variant", "grid", "sweep", "value"]
ID_KEYS = ["hash", "kind", *GROUP_KEYS, "seed"]

#: what the tables' numbers are (written under every table)
TABLE_CAPTION = (
    "Each cell: median ± bootstrap standard error of the median over the n runs (seeds) of its "
    "row; time (s) = training time excluding evaluation and the first (warm-up) optimiser step."
)

#: values beyond this magnitude are not drawn (matplotlib's log/symlog tick locators overflow)
_DRAW_MAX = 1e300


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
    return _with_time(pd.DataFrame(rows))


def _with_time(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``time_excl_warmup`` = ``train_time`` − ``warmup_time`` (runs stored before warm-up
    was logged: ``train_time``) and the generalisation gap ``generalisation_gap`` = final test
    loss − final train loss (the paper's ``FinalLosses`` table)."""
    if {"final_test_loss", "final_train_loss"} <= set(df) and "generalisation_gap" not in df:
        df = df.copy()
        df["generalisation_gap"] = pd.to_numeric(
            df["final_test_loss"], errors="coerce"
        ) - pd.to_numeric(df["final_train_loss"], errors="coerce")
    if "train_time" in df and "time_excl_warmup" not in df:
        df = df.copy()
        warm = pd.to_numeric(df.get("warmup_time", 0.0), errors="coerce")
        warm = warm.fillna(0.0) if isinstance(warm, pd.Series) else warm
        df["time_excl_warmup"] = pd.to_numeric(df["train_time"], errors="coerce") - warm
    return df


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
    df = _with_time(df)
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
    if key in ("final_test_accuracy", "final_train_accuracy"):
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
    return "\n".join(lines) + "\n\n" + TABLE_CAPTION + "\n"


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
    return "% " + TABLE_CAPTION + "\n" + "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _new_figure(ncols: int, nrows: int = 1, caption_lines: int = 0) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    extra = 0.14 * caption_lines * max(1.0, 8.4 / (4.2 * ncols))  # narrow figures wrap more
    height = 3.2 * nrows + 0.4 + extra
    fig = Figure(figsize=(4.2 * ncols, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    # a fixed layout: the constrained/tight layout engines cost seconds per figure
    fig.subplots_adjust(
        left=0.8 / (4.2 * ncols),
        right=0.98,
        bottom=(0.55 + extra) / height,
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
    """``(x, y)`` of one run, finite points only, sorted by ``x``; time axes exclude the
    warm-up logged in ``warmup_time`` (the first optimiser step of each process)."""
    if y not in df or x not in df:
        return np.array([]), np.array([])
    warm = x in ("time", "wall_time") and "warmup_time" in df
    sub = df[[x, y, "warmup_time"] if warm else [x, y]].apply(pd.to_numeric, errors="coerce")
    if warm:
        sub[x] = sub[x] - sub["warmup_time"].ffill().fillna(0.0)
    sub = sub[[x, y]].dropna()
    sub = sub[np.isfinite(sub[y]) & np.isfinite(sub[x]) & (sub[y].abs() < _DRAW_MAX)]
    sub = sub.drop_duplicates(subset=x, keep="last").sort_values(x)
    return sub[x].to_numpy(float), sub[y].to_numpy(float)


def _group_styles(n: int) -> list[tuple[Any, str]]:
    """One (colour, line style) per group, all distinct: matplotlib's ten default colours, then
    the same colours dashed, then dotted (a suite of 13 variants must not draw two alike)."""
    from matplotlib import rcParams

    colours = rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    dashes = ["-", "--", ":", "-."]
    return [(colours[i % len(colours)], dashes[(i // len(colours)) % len(dashes)]) for i in range(n)]


def _plot_groups(
    ax: Any,
    groups: list[tuple[str, list[pd.DataFrame]]],
    x: str,
    y: str,
    *,
    scale: str = "linear",
) -> dict[str, Any]:
    """Draw each group's median line with a band of ± one bootstrap SE of that median.

    ``scale`` is ``linear``, ``log`` (line and band from log values; points <= 0 cannot be
    drawn) or ``symlog`` (signed values; points below zero are marked ▼).

    Returns:
        ``{"drawn": bool, "absent": [labels with nothing drawable], "negative": number of
        points < 0, "linthresh": the symlog threshold or None, "bands": {label: (x, line,
        lower, upper)}}``.
    """
    info: dict[str, Any] = {
        "drawn": False,
        "absent": [],
        "negative": 0,
        "linthresh": None,
        "bands": {},
    }
    everything = [c for _, fr in groups for f in fr for c in _curve(f, x, y)[1]]
    styles = _group_styles(len(groups))
    for (label, frames), (color, dash) in zip(groups, styles):
        curves = [_curve(f, x, y) for f in frames]
        if scale == "log":
            curves = [(cx[cy > 0], np.log(cy[cy > 0])) for cx, cy in curves]
        band = _median_band(curves)
        if band is None or not np.isfinite(band[1]).any():
            info["absent"].append(label)
            continue
        grid, med, se = band
        lower, upper = med - se, med + se
        if scale == "log":
            med, lower, upper = np.exp(med), np.exp(lower), np.exp(upper)
        info["bands"][label] = (grid, med, lower, upper)
        (line,) = ax.plot(
            grid, med, label=f"{label} (n={len(frames)})", lw=1.3, color=color, ls=dash
        )
        ax.fill_between(grid, lower, upper, color=line.get_color(), alpha=0.25, lw=0)
        if scale == "symlog":
            for cx, cy in curves:
                neg = cy < 0
                info["negative"] += int(neg.sum())
                if neg.any():
                    ax.plot(cx[neg], cy[neg], "v", ms=3, color=line.get_color(), alpha=0.7)
        info["drawn"] = True
    if info["drawn"] and scale == "log":
        ax.set_yscale("log", nonpositive="mask")
    if info["drawn"] and scale == "symlog":
        mags = np.abs(np.asarray(everything, dtype=float))
        mags = mags[mags > 0]
        lt = 10.0 ** math.floor(math.log10(float(np.percentile(mags, 10)))) if len(mags) else 1.0
        info["linthresh"] = lt
        ax.set_yscale("symlog", linthresh=lt)
        ax.axhline(0.0, color="0.6", lw=0.6)
    return info


def _caption(fig: Any, text: str) -> None:
    fig.text(0.01, 0.01, text, fontsize=6.5, ha="left", va="bottom", wrap=True)


def _stat_text(groups: list[tuple[str, list[pd.DataFrame]]]) -> str:
    ns = sorted({len(fr) for _, fr in groups})
    n = str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
    return (
        f"Lines: median over n = {n} runs (seeds) per group (n in the legend); bands: ± 1 "
        "bootstrap SE of that median; on log axes both are computed from log values."
    )


def _curve_plots(
    df: pd.DataFrame, store: RunStore, root: Path, time_col: str, captions: dict[str, str]
) -> list[Path]:
    paths: list[Path] = []
    time_text = (
        "training time excluding evaluation"
        if time_col == "time"
        else "wall time including evaluation"
    ) + " and excluding the first (warm-up) optimiser step of each process"
    for task, tdf in df.groupby("task", sort=False):
        base = tdf[tdf["sweep"].isna()] if "sweep" in tdf else tdf
        if base.empty:
            continue
        groups: list[tuple[str, list[pd.DataFrame]]] = []
        for labels, g in _groups(base.drop(columns=["task"])):
            frames = [m for m in (store.metrics(h) for h in g["hash"]) if m is not None]
            groups.append((" ".join(str(v) for v in labels.values() if v != "") or "run", frames))
        classification = bool(tdf.get("classification", pd.Series([False])).fillna(False).any())
        ys = [("loss", "train batch loss", "log"), ("test_loss", "test loss", "log")]
        if classification:
            ys.append(("test_accuracy", "test accuracy", "linear"))
        t_label = "training time (s)" if time_col == "time" else "wall time (s)"
        xs = [("step", "steps"), (time_col, f"{t_label}, warm-up excluded")]
        fig, axes = _new_figure(len(ys), len(xs), caption_lines=2)
        for i, (xc, xl) in enumerate(xs):
            for j, (yc, yl, scale) in enumerate(ys):
                ax = axes[i][j]
                _plot_groups(ax, groups, xc, yc, scale=scale)
                ax.set_xlabel(xl)
                ax.set_ylabel(yl)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(str(task))
        stem = f"curves_{safe_name(task)}"
        captions[stem] = f"{task}: {_stat_text(groups)} Time: {time_text}."
        _caption(fig, captions[stem])
        paths += _save(fig, root, stem)
        # alpha and lambda trajectories
        fig, axes = _new_figure(2, caption_lines=3)
        a_info = _plot_groups(axes[0][0], groups, "step", "alpha", scale="symlog")
        axes[0][0].set_ylabel("step size α (symlog)")
        l_info = _plot_groups(axes[0][1], groups, "step", "damping", scale="log")
        axes[0][1].set_ylabel("damping λ (log)")
        for ax in axes[0]:
            ax.set_xlabel("steps")
        if l_info["absent"]:
            axes[0][1].text(
                0.02,
                0.02,
                "not drawn (λ ≡ 0): " + ", ".join(l_info["absent"]),
                transform=axes[0][1].transAxes,
                fontsize=7,
                va="bottom",
            )
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{task}: trajectories")
        stem = f"trajectories_{safe_name(task)}"
        lt = a_info["linthresh"]
        text = f"{task}: α on a symmetric-log axis" + (
            f" (linear for |α| < {lt:.0e})" if lt is not None else ""
        )
        text += f"; ▼ marks the {a_info['negative']} steps with α < 0 (all runs)."
        text += " λ on a log axis" + (
            f"; not drawn because λ ≡ 0: {', '.join(l_info['absent'])}."
            if l_info["absent"]
            else "."
        )
        captions[stem] = text + " " + _stat_text(groups)
        _caption(fig, captions[stem])
        paths += _save(fig, root, stem)
    return paths


def _sensitivity_plots(
    df: pd.DataFrame, root: Path, captions: dict[str, str] | None = None
) -> list[Path]:
    paths: list[Path] = []
    if "sweep" not in df or df["sweep"].isna().all():
        return paths
    sw = df[df["sweep"].notna()]
    for (task, sweep), g in sw.groupby(["task", "sweep"], sort=False):
        metrics = [("final_train_loss", "final train loss"), ("final_test_loss", "final test loss")]
        if g.get("classification", pd.Series([False])).fillna(False).any():
            metrics.append(("final_test_accuracy", "final test accuracy"))
        fig, axes = _new_figure(len(metrics), caption_lines=1)
        n_per = sorted({int(n) for n in g.groupby(["variant", "value"]).size()})
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
        stem = f"sensitivity_{safe_name(task)}_{safe_name(sweep)}"
        n = str(n_per[0]) if len(n_per) == 1 else f"{n_per[0]}-{n_per[-1]}"
        text = (
            f"{task}: points: median over n = {n} runs (seeds) per value; error bars: ± 1 "
            "bootstrap SE of the median."
        )
        if captions is not None:
            captions[stem] = text
        _caption(fig, text)
        paths += _save(fig, root, stem)
    return paths


def build_report(
    out_dir: str | Path,
    *,
    kinds: Sequence[str] = ("run", "repeat"),
    time_axis: str = "train",
    plots: bool = True,
    variants: Sequence[str] | None = None,
    name: str = "report",
) -> dict[str, Any]:
    """Write ``OUT/report/``: ``table.md``, ``table.csv``, ``table.tex``, ``runs.csv`` and plots.

    Args:
        out_dir: the output directory of a run, ablation or study.
        kinds: run kinds to include.
        time_axis: ``train`` (training time, excluding evaluation) or ``wall``.
        plots: also draw the plots.
        variants: only these variants, in this order (e.g. one ablation's subset of a suite);
            ``None``: all.
        name: the report's folder under ``out_dir`` (``report``; another name keeps a subset's
            report beside the full one).

    Returns:
        ``{"dir", "table_md", "table_csv", "table_tex", "runs_csv", "plots": [...], "table"}``.

    Raises:
        FileNotFoundError: ``out_dir`` has no ``index.json``.
        ValueError: a name in ``variants`` matches no run (the message lists the variants).
    """
    store = RunStore(out_dir)
    if not store.index_path.exists():
        raise FileNotFoundError(f"{store.root} has no index.json: not a qlrlab output directory")
    root = confined(store.root, safe_name(name))
    df = collect_runs(store.root, kinds)
    if variants is not None and not df.empty:
        have = [str(v) for v in dict.fromkeys(df["variant"].dropna())]
        missing = [v for v in variants if v not in have]
        if missing:
            raise ValueError(
                f"no runs of variant(s) {missing}; the variants in {store.root} are {have}"
            )
        order = {v: i for i, v in enumerate(variants)}
        df = df[df["variant"].isin(order)]
        df = df.iloc[np.argsort([order[v] for v in df["variant"]], kind="stable")]
    root.mkdir(parents=True, exist_ok=True)
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
    tidy = tidy_metrics(store, df)
    write_parquet_atomic(tidy, root / "metrics.parquet")
    out["metrics"] = root / "metrics.parquet"
    if plots:
        ok = df[df["status"].isin(["completed", "diverged", "pruned"])] if "status" in df else df
        time_col = "time" if time_axis == "train" else "wall_time"
        captions: dict[str, str] = {}
        out["plots"] += _curve_plots(ok, store, root, time_col, captions)
        out["plots"] += _sensitivity_plots(ok, root, captions)
        out["captions"] = captions
        atomic_write_text(
            root / "captions.md",
            "".join(f"- `{stem}`: {text}\n" for stem, text in captions.items()),
        )
    return out


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    key = prefix[:-1]
    return {key: json.dumps(obj) if isinstance(obj, list) else obj}


def tidy_metrics(store: RunStore | str | Path, runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """One long table of every logged step of every run, for ``pd.read_parquet`` in one call.

    Columns: the run's identity (``hash``, ``kind``, ``task``, ``variant``, ``grid``, ``sweep``,
    ``value``, ``seed``), every spec setting that differs between the runs (as dotted keys,
    e.g. ``optimizer.damping.initial``), then the run's own per-step metrics (``step``,
    ``time``, ``loss``, ``alpha``...). Restricting it to one ``hash`` gives exactly that run's
    ``runs/<hash>/metrics.parquet``.

    Args:
        store: the output directory (or its :class:`RunStore`).
        runs: :func:`collect_runs` of it (default: all kinds, trials included).
    """
    store = store if isinstance(store, RunStore) else RunStore(store)
    if runs is None:
        runs = collect_runs(store.root, kinds=("run", "repeat", "trial"))
    settings: dict[str, dict[str, Any]] = {}
    for h in runs["hash"] if "hash" in runs else []:
        try:
            rec = json.loads((store.run_dir(h) / "spec.json").read_text(encoding="utf-8"))
            spec = rec.get("spec", rec) if isinstance(rec, dict) else {}
        except (OSError, ValueError):
            spec = {}
        flat = _flatten(spec) if isinstance(spec, dict) else {}
        for k in ("name", "output_dir"):
            flat.pop(k, None)
        settings[h] = flat
    keys = sorted({k for f in settings.values() for k in f})
    varying = [
        k for k in keys if len({json.dumps(f.get(k), default=str) for f in settings.values()}) > 1
    ]
    frames = []
    for _, r in runs.iterrows():
        m = store.metrics(r["hash"])
        if m is None or m.empty:
            continue
        ident = {k: r.get(k) for k in ID_KEYS}
        ident.update({k: settings.get(r["hash"], {}).get(k) for k in varying})
        head = pd.DataFrame({k: [v] * len(m) for k, v in ident.items()}, index=m.index)
        frames.append(pd.concat([head, m], axis=1))
    if not frames:
        return pd.DataFrame(columns=[*ID_KEYS, *varying, "step"])
    out = pd.concat(frames, ignore_index=True)
    for k in [*ID_KEYS, *varying]:  # mixed types (None with numbers) do not fit Parquet
        if out[k].map(type).nunique() > 1 and not pd.api.types.is_numeric_dtype(out[k]):
            out[k] = out[k].map(lambda v: None if v is None else str(v))
    return out
