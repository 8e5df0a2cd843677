"""A training workdir on disk, its one owner: the files' names and configs (``files``), the
Orbax checkpoints (``checkpoints``, their failures told apart in ``checkpoint_errors``), the
one-writer lock (``lock``) and reading a model back (``restore``: ``load``,
``restore_params``). Below training and decoding, above the model, data and runtime."""
