"""The shard format at rest: names, the tar reader and writer, digests, the manifest.

Nothing here imports the rest of wdsrefresh: both the read path and the write side build on it.
"""
