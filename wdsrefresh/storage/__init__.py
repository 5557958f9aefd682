"""Where shards are: local files (``local/``) or objects in a store (``objects/``).

``backend.make_source`` is the one place a source argument picks one of them; ``resolver``
turns any source into a snapshot by asking each candidate whether it is ready.
"""
