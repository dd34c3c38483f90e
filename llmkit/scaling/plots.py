"""The picture of a fit, written by `llmkit scale fit` next to fit.json (fit.png).

    llmkit scale fit runs/scale-cpu-tiny       # -> runs/scale-cpu-tiny/fit.png

For L(N, D), three panels: loss against compute C = 6 N D with the fitted compute-optimal frontier and
the fitted curve of each swept model size; IsoFLOP curves (loss against N at fixed C, with the optimum
N* marked, and the points of each budget of an IsoFLOP sweep); loss against N for each token budget
with the fitted L(N, D). For a one-variable law, one panel: the points and the fitted curve.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from llmkit.errors import LlmkitError
from llmkit.scaling import laws
from llmkit.scaling.fit import Points, compute_optimal, predict

MAX_SERIES = 8  # colours and legend entries per panel; more distinct sizes or budgets are binned


def require_matplotlib() -> None:
    """LlmkitError (before anything is written) when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LlmkitError("llmkit scale fit draws its plot with matplotlib: pip install matplotlib") from None


def _groups(values: np.ndarray, rel_tol: float = 0.05) -> list[np.ndarray]:
    """Indices of the points whose values agree within rel_tol (token budgets rounded to whole steps), smallest first."""
    order = np.argsort(values, kind="stable")
    groups: list[list[int]] = []
    for i in order:
        if groups and values[i] <= values[groups[-1][0]] * (1 + rel_tol):
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    return [np.asarray(g) for g in groups]


def _bounded_groups(values: np.ndarray, limit: int = MAX_SERIES) -> list[np.ndarray]:
    """The groups of equal values when there are at most `limit`, else `limit` log-spaced bins (many distinct sizes,
    e.g. a digitised figure, would otherwise draw one series and one legend entry each, which takes matplotlib hours)."""
    groups = _groups(values, rel_tol=1e-9)
    if len(groups) <= limit:
        return groups
    edges = np.geomspace(values.min(), values.max() * (1 + 1e-12), limit + 1)
    which = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, limit - 1)
    return [np.flatnonzero(which == k) for k in range(limit) if np.any(which == k)]


def _si(value: float) -> str:
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def plot_fit(report: dict[str, Any], points: Points, rows: list[dict[str, Any]], output: Path) -> Path:
    """Draw the fit in `report` over its points to a PNG (written atomically)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # no display needed; safe in tests and on servers
    import matplotlib.pyplot as plt

    if report["kind"] == "chinchilla":
        fig = _two_variable_figure(plt, report, points, rows)
    else:
        fig = _one_variable_figure(plt, report, points)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(output)
    return output


def _two_variable_figure(plt, report, points: Points, rows):
    law = laws.chinchilla(report["constants"])
    # A degenerate law (an exponent at 0, or a step: A overflowed to inf) has no curve worth drawing: the points only.
    curves = not report.get("degenerate")
    N, D, loss = points.N_params, points.D_tokens, points.loss
    C = 6.0 * N * D
    convention = report.get("param_convention") or "as in the points file"
    fig, (ax_c, ax_iso, ax_n) = plt.subplots(1, 3, figsize=(18, 5.2))
    sizes = _bounded_groups(N)
    cmap = plt.get_cmap("viridis")
    color = {int(g[0]): cmap(k / max(1, len(sizes) - 1)) for k, g in enumerate(sizes)}

    # 1. Loss against compute: the points, each size's fitted curve, the compute-optimal frontier.
    grid_c = np.geomspace(C.min() / 3, C.max() * 3, 200)
    for g in sizes:
        n = float(np.exp(np.log(N[g]).mean()))
        c = color[int(g[0])]
        low, high = float(N[g].min()), float(N[g].max())
        label = f"N {_si(n)}" if low == high else f"N {_si(low)}-{_si(high)}"
        ax_c.scatter(C[g], loss[g], color=c, s=28 if len(N) <= 200 else 4, zorder=3, label=label)
        if curves:
            ax_c.plot(grid_c, predict(law, n, grid_c / (6 * n)), color=c, linewidth=1, alpha=0.7)
    if curves and law.alpha > 0 and law.beta > 0:
        best = compute_optimal(law, grid_c)
        ax_c.plot(grid_c, best.loss, color="black", linewidth=2.2, label="compute-optimal frontier")
    ax_c.set(xscale="log", xlabel="compute C = 6 N D (FLOPs)", ylabel="validation loss (nats/token)",
             title="loss vs compute: fit per size and frontier")

    # 2. IsoFLOP curves: loss against N at fixed compute, the optimum marked.
    labels = [row.get("budget_flops") for row in rows]
    budgets = sorted({float(v) for v in labels if v})
    if not budgets or len(budgets) > MAX_SERIES:
        budgets = list(np.geomspace(C.min(), C.max(), 3))
    optima = [compute_optimal(law, b).N_params for b in budgets] if curves and law.alpha > 0 and law.beta > 0 else []
    low_n = min([N.min() / 4, *(n / 3 for n in optima if math.isfinite(n))])
    high_n = max([N.max() * 4, *(n * 3 for n in optima if math.isfinite(n))])
    grid_n = np.geomspace(low_n, high_n, 300)
    for k, budget in enumerate(budgets):
        c = plt.get_cmap("plasma")(k / max(1, len(budgets) - 1) * 0.85)
        if curves:
            ax_iso.plot(grid_n, predict(law, grid_n, budget / (6 * grid_n)), color=c, linewidth=1.4, label=f"C {budget:.2g}")
        mine = [i for i, v in enumerate(labels) if v and math.isclose(float(v), budget)]
        if mine:
            ax_iso.scatter(N[mine], loss[mine], color=c, s=28, zorder=3)
        if optima:
            best = compute_optimal(law, budget)
            ax_iso.scatter([best.N_params], [best.loss], marker="*", s=160, color=c, edgecolor="black", zorder=4)
    ax_iso.set(xscale="log", xlabel=f"N ({convention} parameters)", ylabel="loss (nats/token)",
               title="IsoFLOP curves of the fit (star: optimum N*)" if curves else "IsoFLOP curves: none (degenerate fit)")

    # 3. Loss against N for each token budget, with the fitted L(N, D).
    grid_n = np.geomspace(N.min() / 4, N.max() * 4, 200)
    token_groups = _groups(D)
    if len(token_groups) > 6:
        ax_n.scatter(N, loss, color="0.5", s=22, zorder=3, label="points")
        shown = [float(v) for v in np.geomspace(D.min(), D.max(), 3)]
    else:
        shown = []
        for k, g in enumerate(token_groups):
            c = plt.get_cmap("cividis")(k / max(1, len(token_groups) - 1))
            ax_n.scatter(N[g], loss[g], color=c, s=28, zorder=3)
            shown.append(float(np.exp(np.log(D[g]).mean())))
    for k, d in enumerate(shown):
        c = plt.get_cmap("cividis")(k / max(1, len(shown) - 1))
        if curves:
            ax_n.plot(grid_n, predict(law, grid_n, d), color=c, linewidth=1.2, label=f"D {_si(d)} tokens")
    if curves:
        ax_n.axhline(law.E, color="0.6", linestyle=":", linewidth=1, label=f"E = {law.E:.3g}")
    ax_n.set(xscale="log", xlabel=f"N ({convention} parameters)", ylabel="loss (nats/token)",
             title=f"loss vs N per token budget (R^2 {report['r2']:.3f})" if curves else "loss vs N (degenerate fit: no curves)")
    # A law extrapolated beyond the points can shoot off; keep the view on the measured losses.
    span = max(float(loss.max() - loss.min()), 1e-3)
    star_losses = [compute_optimal(law, b).loss for b in budgets] if optima else []
    for ax in (ax_c, ax_iso, ax_n):
        low = float(loss.min()) - 0.4 * span
        if ax is ax_iso and star_losses:
            low = min(low, min(star_losses) - 0.15 * span)  # keep every optimum in view
        ax.set_ylim(low, float(loss.max()) + 0.6 * span)
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:  # a degenerate fit's IsoFLOP panel may hold no labelled series
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _one_variable_figure(plt, report, points: Points):
    variable = report["variable"]
    x = points.N_params if variable == "N" else points.D_tokens
    E, A, alpha = (report["constants"][k] for k in ("E", "A", "alpha"))
    fig, ax = plt.subplots(figsize=(7, 5))
    grid = np.geomspace(x.min() / 2, x.max() * 2, 200)
    ax.scatter(x, points.loss, s=28, zorder=3, label="points")
    ax.plot(grid, E + A * grid ** (-alpha), linewidth=1.6, label=f"{report['law']} (R^2 {report['r2']:.3f})")
    ax.axhline(E, color="0.6", linestyle=":", linewidth=1, label=f"E = {E:.3g}")
    ax.set(xscale="log", xlabel="N (parameters)" if variable == "N" else "D (training tokens)",
           ylabel="validation loss (nats/token)", title=f"one-variable law in {variable}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
