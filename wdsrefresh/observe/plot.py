"""``wdsrefresh stats --plot``: a figure of a run's ``stats.jsonl``.

Six panels over epochs, each quantity on axes of its own (no two lines share a panel's
scale): the snapshot's shards, and its samples; shards added, changed and removed; lag, the
age of the newest shard when each epoch was resolved; samples/s per rank; and the share of the
training loop spent waiting for data per rank (when the loop ran under ``wr.timed``). A mix of
sources adds a row: the samples each source delivered per epoch, stacked, and each source's
delivered share against the share its weight asks for. One legend, below the panels, covers no data. The samples/s scale is robust: a point far above
the others (an epoch whose share was tiny) is drawn as a mark at the top edge with its value
written beside it, rather than flattening every other epoch.
matplotlib is optional (``pip install 'wdsrefresh[plot]'``) and imported only here.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import WdsRefreshError
from ..epoch.stats import EpochStats

FIGSIZE = (9.0, 8.0)  # inches
DPI = 100  # so the PNG is 900 x 800 pixels
CHURN = (("added", "tab:green"), ("changed", "tab:orange"), ("removed", "tab:red"))
RANK_COLORS = ("tab:blue", "tab:purple", "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan")
SOURCE_COLORS = ("tab:cyan", "tab:olive", "tab:pink", "tab:gray", "tab:brown", "tab:purple", "tab:blue")
RANK_MARKERS = ("o", "s", "D", "v", "P", "X")  # with the colors, tells up to 42 ranks apart
OUTLIER_FENCE = 3.0  # a value above Q3 + this many interquartile ranges is off scale (Tukey's far out)
HEADROOM = 1.25  # the top of a robust scale, as a multiple of the largest value on scale


class PlotUnavailable(WdsRefreshError, RuntimeError):
    """matplotlib is not installed."""


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable(
            "plotting needs matplotlib, an optional extra: pip install 'wdsrefresh[plot]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def robust_top(values: Sequence[float]) -> float | None:
    """The top of a scale that shows ``values`` but their far outliers, or None when every value
    fits a plain scale. A value is a far outlier above Q3 + ``OUTLIER_FENCE`` x IQR; the top is
    ``HEADROOM`` x the largest other value, so only values above that are drawn off scale."""
    import numpy as np

    data = np.asarray([v for v in values if v == v], dtype=float)  # NaN: no measurement
    if len(data) < 4:
        return None
    q1, q3 = np.percentile(data, [25, 75])
    inliers = data[data <= q3 + OUTLIER_FENCE * (q3 - q1)]
    top = HEADROOM * float(inliers.max()) if len(inliers) and inliers.max() > 0 else None
    return top if top is not None and data.max() > top else None


def plot(stats: Sequence[EpochStats], path: str, title: str | None = None, dpi: int = DPI) -> None:
    """Writes the figure of ``stats`` (lines of a stats.jsonl, any ranks) to ``path`` (PNG, SVG or
    PDF by extension), ``FIGSIZE`` inches at ``dpi``. Raises PlotUnavailable without matplotlib,
    ValueError without lines."""
    plt = _pyplot()
    fig = figure(stats, title=title, dpi=dpi)
    try:
        fig.savefig(path)
    finally:
        plt.close(fig)


def figure(stats: Sequence[EpochStats], title: str | None = None, dpi: int = DPI):
    """The matplotlib Figure ``plot`` writes (close it with ``matplotlib.pyplot.close``)."""
    if not stats:
        raise ValueError("no epochs to plot")
    plt = _pyplot()
    by_epoch: dict[int, EpochStats] = {}
    for s in sorted(stats, key=lambda s: (s.epoch, s.rank)):
        by_epoch.setdefault(s.epoch, s)  # the snapshot is the same on every rank: take the lowest rank's
    epochs = sorted(by_epoch)
    first = [by_epoch[e] for e in epochs]
    per_rank = {rank: sorted((s for s in stats if s.rank == rank), key=lambda s: s.epoch)
                for rank in sorted({s.rank for s in stats})}

    mixed = any(s.sources for s in stats)  # a mix of sources: a fourth row, per source
    size = (FIGSIZE[0], FIGSIZE[1] * (4 / 3 if mixed else 1))
    fig, axes = plt.subplots(4 if mixed else 3, 2, figsize=size, dpi=dpi, sharex=True)
    (shards, samples), (churn, lag), (speed, waiting) = axes[:3]
    _snapshot(shards, samples, epochs, first)
    handles = _churn(churn, epochs, first)
    _lag(lag, epochs, first)
    handles += _speed(speed, per_rank)
    _waiting(waiting, per_rank)
    if mixed:
        handles += _sources(*axes[3], epochs, stats)
    _finish(fig, axes, handles, title)
    return fig


def _sources(stack, shares, epochs: list[int], stats: Sequence[EpochStats]) -> list:
    """A mix: the samples each source delivered per epoch (all ranks), stacked; and each source's
    delivered share of the epoch (solid) against the share its weight asks for (dashed)."""
    names = list(dict.fromkeys(name for s in stats for name in s.sources))
    delivered = {name: [0] * len(epochs) for name in names}
    asked: dict[str, list[float]] = {name: [float("nan")] * len(epochs) for name in names}
    for s in stats:
        column = epochs.index(s.epoch)
        for name, fields in s.sources.items():
            delivered[name][column] += fields.get("delivered", 0)
            if fields.get("weight") is not None:
                asked[name][column] = fields["weight"]
    totals = [sum(delivered[n][c] for n in names) for c in range(len(epochs))]
    bottom = [0] * len(epochs)
    bars = []
    for k, name in enumerate(names):
        color = SOURCE_COLORS[k % len(SOURCE_COLORS)]
        bars.append(stack.bar(epochs, delivered[name], bottom=bottom, color=color, label=name, width=0.8))
        bottom = [b + d for b, d in zip(bottom, delivered[name])]
        shares.plot(epochs, [d / t if t else float("nan") for d, t in zip(delivered[name], totals)], marker="o",
                    color=color)
        shares.plot(epochs, asked[name], linestyle="--", color=color)
    stack.set_title("samples per source (all ranks)")
    stack.set_xlabel("epoch")
    shares.set_ylim(0, 1)
    shares.set_title("share per source: delivered (solid), weight (dashed)")
    shares.set_xlabel("epoch")
    return bars


def _snapshot(shards, samples, epochs: list[int], first: list[EpochStats]) -> None:
    shards.plot(epochs, [s.shards for s in first], marker="o", color="tab:blue")
    shards.set_title("shards in the snapshot")
    samples.plot(epochs, [s.samples for s in first], marker="s", color="tab:green")
    samples.set_title("samples in the snapshot")


def _churn(ax, epochs: list[int], first: list[EpochStats]) -> list:
    width = 0.27
    bars = []
    for offset, (key, color) in zip((-width, 0.0, width), CHURN):
        bars.append(ax.bar([e + offset for e in epochs], [getattr(s, key) for s in first], width=width, color=color,
                           label=f"shards {key}"))
    ax.set_title("shards added / changed / removed")
    return bars


def _lag(ax, epochs: list[int], first: list[EpochStats]) -> None:
    ax.plot(epochs, [s.lag_seconds if s.lag_seconds is not None else float("nan") for s in first], marker="o",
            color="black")
    ax.set_ylabel("seconds")
    ax.set_title("lag: age of the newest shard at resolve")
    ax.set_ylim(bottom=0)


def _rank_color(rank: int) -> str:
    return RANK_COLORS[rank % len(RANK_COLORS)]


def _rank_marker(rank: int) -> str:
    return RANK_MARKERS[rank // len(RANK_COLORS) % len(RANK_MARKERS)]


def _speed(ax, per_rank: dict[int, list[EpochStats]]) -> list:
    """samples/s per rank, on a robust scale: far outliers drawn at the top edge, value written."""
    values = [s.samples_per_second or 0.0 for rows in per_rank.values() for s in rows]
    top = robust_top(values)
    handles = []
    for rank, rows in per_rank.items():
        xs, ys = [s.epoch for s in rows], [s.samples_per_second or 0.0 for s in rows]
        on_scale = [y if top is None or y <= top else float("nan") for y in ys]  # a gap where one is off
        (line,) = ax.plot(xs, on_scale, marker=_rank_marker(rank), color=_rank_color(rank), label=f"rank {rank}")
        handles.append(line)
        for x, y in zip(xs, ys):
            if top is not None and y > top:
                ax.plot([x], [top], marker="^", markersize=9, color=_rank_color(rank), clip_on=False)
                ax.annotate(f"{y:,.0f}", (x, top), xytext=(6, -12), textcoords="offset points", fontsize="small",
                            color=_rank_color(rank))
    ax.set_ylim(0, top)
    ax.set_ylabel("samples/s")
    off = sum(top is not None and v > top for v in values)
    ax.set_title("samples/s per rank" + (f" ({off} off scale, ^)" if off else ""))
    ax.set_xlabel("epoch")
    return handles


def _waiting(ax, per_rank: dict[int, list[EpochStats]]) -> None:
    timed = False
    for rank, rows in per_rank.items():
        rows = [s for s in rows if s.wait_share is not None]
        if rows:
            timed = True
            ax.plot([s.epoch for s in rows], [100 * s.wait_share for s in rows], marker=_rank_marker(rank),
                    linestyle="--", color=_rank_color(rank))
    ax.set_ylim(0, 100)
    ax.set_ylabel("% of the loop")
    ax.set_title("loop time waiting for data per rank")
    ax.set_xlabel("epoch")
    if not timed:
        ax.text(0.5, 0.5, "not measured: iterate wr.timed(loader)", transform=ax.transAxes, ha="center",
                va="center", color="gray")


def _finish(fig, axes, handles: list, title: str | None) -> None:
    """Grids, integer ticks, the title, and the one legend below the panels, clear of every one."""
    from matplotlib.ticker import MaxNLocator

    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes.flat[:3]:  # counts of shards and samples
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, max(1, ax.get_ylim()[1]))
    if title:
        fig.suptitle(title)
    ncol = min(len(handles), 7)
    rows = -(-len(handles) // ncol)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize="small", frameon=False)
    fig.tight_layout(rect=(0, 0.035 * rows + 0.01, 1, 1))
