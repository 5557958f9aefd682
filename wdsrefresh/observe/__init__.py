"""Observation: how what a run read leaves the process.

``stats_log.py`` (``stats_dir=``: one ``stats.jsonl`` line per epoch and rank), ``timed.py``
(``wr.timed``: the training loop's wait for data), ``tensorboard.py`` (``wr.log_stats``) and
``plot.py`` (``wdsrefresh stats --plot``). What an epoch read is ``epoch/stats.EpochStats``.
"""
