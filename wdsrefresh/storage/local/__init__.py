"""Shards as local files: sources, the readiness rule, the index cache, a watched directory's
index, watchers and the inotify binding."""
