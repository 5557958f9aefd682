"""The write side: packing files into shards, publishing them, ingesting an inbox, verifying.

The read path (sources, snapshot, split, reading, dataset) never imports this package.
"""
