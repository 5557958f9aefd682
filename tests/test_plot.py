"""`wdsrefresh stats --plot`: every quantity visible, no legend on the data, no outlier flattening a panel."""

import json

import matplotlib.pyplot as plt
import pytest

from wdsrefresh.cli import main
from wdsrefresh.observe.plot import figure
from wdsrefresh.epoch.stats import EpochStats
from wdsrefresh.observe.stats_log import read_jsonl

OUTLIER = 160_000.0


@pytest.fixture
def growing_run(tmp_path):
    """A stats.jsonl of 10 epochs x 2 ranks: shards growing (samples in proportion, so on one
    scale the two lines coincide), churn every epoch, one epoch of 160k samples/s on rank 0."""
    path = tmp_path / "stats.jsonl"
    with open(path, "w") as f:
        for epoch in range(10):
            shards = 4 + 2 * epoch
            for rank in (0, 1):
                speed = OUTLIER if (epoch, rank) == (4, 0) else (4000 + 150 * epoch) / (1 + rank)
                row = EpochStats(epoch=epoch, rank=rank, world_size=2, shards=shards, samples=300 * shards,
                                 added=2, changed=int(epoch % 3 == 2), removed=int(epoch > 6), yielded=150 * shards,
                                 samples_per_second=speed, lag_seconds=1.0, loop_seconds=10.0,
                                 wait_seconds=4.0 - 0.3 * epoch + rank)
                f.write(json.dumps(row.to_dict()) + "\n")
    return path


def axes_titled(fig, start):
    [ax] = [ax for ax in fig.axes if ax.get_title().startswith(start)]
    return ax


def test_plot_shows_shards_and_samples_apart_legend_off_the_data_outlier_off_scale(growing_run, tmp_path, capsys):
    png = tmp_path / "growth.png"
    assert main(["stats", str(growing_run), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_jsonl(str(growing_run))
    fig = figure(rows)
    try:
        fig.canvas.draw()
        shards, samples = axes_titled(fig, "shards in the snapshot"), axes_titled(fig, "samples in the snapshot")
        first = [r for r in rows if r.rank == 0]
        assert [list(line.get_ydata()) for line in shards.get_lines()] == [[r.shards for r in first]]
        assert [list(line.get_ydata()) for line in samples.get_lines()] == [[r.samples for r in first]]
        assert not shards.get_window_extent().overlaps(samples.get_window_extent())

        speed = axes_titled(fig, "samples/s per rank")
        bottom, top = speed.get_ylim()
        others = [r.samples_per_second for r in rows if r.samples_per_second != OUTLIER]
        assert bottom == 0 and max(others) <= top < OUTLIER and top < 2 * max(others)  # the others fill it
        assert any(OUTLIER == float(t.get_text().replace(",", "")) for t in speed.texts)  # its value still told

        assert all(ax.get_legend() is None for ax in fig.axes)
        [legend] = fig.legends
        labels = [t.get_text() for t in legend.get_texts()]
        assert {"rank 0", "rank 1", "shards added", "shards changed", "shards removed"} <= set(labels)
        box = legend.get_window_extent()
        assert not [ax.get_title() for ax in fig.axes if box.overlaps(ax.get_window_extent())]
    finally:
        plt.close(fig)
