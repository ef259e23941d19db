"""Per-stream workers: the registry (streams by id), the bounded queue, the worker loop,
and one file per media kind under `formats/`."""
