"""Mixes of named sources in one dataset: ``wr.RefreshingWebDataset({name: source, ...},
weights=..., epoch_size=...)``. ``config`` checks the arguments, ``plan`` fixes the counts and
the schedule, ``rotation`` which samples each source gives, ``snapshot`` the MixSnapshot,
``source`` the pipeline stage, ``resume`` its checkpoints, ``stats`` what it reports."""
