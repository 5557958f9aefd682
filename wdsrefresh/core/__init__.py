"""The values every phase shares: snapshots and their packed columns.

Frozen values, computed from the format layer; nothing here reads storage or knows an epoch.
"""
