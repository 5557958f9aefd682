"""``wdsrefresh stats --plot``: a figure of a run's ``stats.jsonl``.

Four panels over epochs: the snapshot's shards and samples; shards added, changed and removed;
samples/s per rank with the share of the training loop spent waiting for data (when the loop
ran under ``wr.timed``); and lag, the age of the newest shard when each epoch was resolved.
matplotlib is optional (``pip install 'wdsrefresh[plot]'``) and imported only here.
"""

from __future__ import annotations

from collections.abc import Sequence

from .stats import EpochStats

FIGSIZE = (9.0, 6.5)  # inches
DPI = 100  # so the PNG is 900 x 650 pixels


class PlotUnavailable(RuntimeError):
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


def plot(stats: Sequence[EpochStats], path: str, title: str | None = None, dpi: int = DPI) -> None:
    """Writes the figure of ``stats`` (lines of a stats.jsonl, any ranks) to ``path`` (PNG, SVG or
    PDF by extension), ``FIGSIZE`` inches at ``dpi``. Raises PlotUnavailable without matplotlib,
    ValueError without lines."""
    if not stats:
        raise ValueError("no epochs to plot")
    plt = _pyplot()
    by_epoch: dict[int, EpochStats] = {}
    for s in sorted(stats, key=lambda s: (s.epoch, s.rank)):
        by_epoch.setdefault(s.epoch, s)  # the snapshot is the same on every rank: take the lowest rank's
    epochs = sorted(by_epoch)
    first = [by_epoch[e] for e in epochs]
    ranks = sorted({s.rank for s in stats})

    fig, axes = plt.subplots(2, 2, figsize=FIGSIZE, dpi=dpi, sharex=True)
    (growth, churn), (speed, lag) = axes

    growth.plot(epochs, [s.shards for s in first], marker="o", color="tab:blue", label="shards")
    growth.set_ylabel("shards", color="tab:blue")
    samples_axis = growth.twinx()
    samples_axis.plot(epochs, [s.samples for s in first], marker="s", color="tab:green", label="samples")
    samples_axis.set_ylabel("samples", color="tab:green")
    growth.set_title("snapshot: shards and samples")

    width = 0.27
    for offset, (key, color) in zip((-width, 0.0, width),
                                    (("added", "tab:green"), ("changed", "tab:orange"), ("removed", "tab:red"))):
        churn.bar([e + offset for e in epochs], [getattr(s, key) for s in first], width=width, color=color, label=key)
    churn.set_title("shards added / changed / removed")
    churn.legend(loc="upper right", fontsize="small")

    waited = any(s.wait_share is not None for s in stats)
    share = speed.twinx() if waited else None
    handles = []
    for rank in ranks:
        rows = sorted((s for s in stats if s.rank == rank), key=lambda s: s.epoch)
        (line,) = speed.plot([s.epoch for s in rows], [s.samples_per_second or 0.0 for s in rows], marker="o",
                             label=f"rank {rank}: samples/s")
        handles.append(line)
        timed = [s for s in rows if s.wait_share is not None]
        if share is not None and timed:
            (dashed,) = share.plot([s.epoch for s in timed], [100 * s.wait_share for s in timed], linestyle="--",
                                   color=line.get_color(), label=f"rank {rank}: % waiting")
            handles.append(dashed)
    speed.set_ylabel("samples/s")
    speed.set_ylim(bottom=0)
    speed.set_title("samples/s per rank" + (" and loop time waiting for data" if waited else ""))
    if share is not None:
        share.set_ylabel("waiting for data (% of loop)")
        share.set_ylim(0, 100)
    speed.legend(handles=handles, loc="lower left", fontsize="small")

    lag.plot(epochs, [s.lag_seconds if s.lag_seconds is not None else float("nan") for s in first], marker="o",
             color="tab:purple")
    lag.set_ylabel("seconds")
    lag.set_title("lag: age of the newest shard at resolve")
    for ax in (speed, lag):
        ax.set_xlabel("epoch")
    from matplotlib.ticker import MaxNLocator

    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (growth, samples_axis, churn):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(bottom=0)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
