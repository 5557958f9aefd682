"""The one base class of every error wdsrefresh raises to its users.

``except wr.WdsRefreshError`` catches them all; each also keeps its builtin base
(``NoShardsError`` is a ``FileNotFoundError``, ``TarError`` a ``ValueError``,
``EpochLengthUnknown`` a ``TypeError``, which ``len()`` probes such as tqdm's rely on), so code
written against those keeps working. This module imports nothing: every layer may use it.
"""


class WdsRefreshError(Exception):
    """An error of wdsrefresh; its message names the shard, object or file, and the fix."""
