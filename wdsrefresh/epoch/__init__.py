"""The epoch machinery: slots, the state directory, the exact split, reading a slot's share,
checkpoints, the epoch and stream sample sources, and each epoch's EpochStats."""
