"""Small helpers the fine-tuning side (``datamodules``, ``lightning_modules``) and the merging
side (``merging``) both need; this package imports none of them.

- ``common.checkpoints``: checkpoint sources (hub id or directory), ConvNeXt and head checks.
- ``common.reader``: a checkpoint read one tensor at a time.
- ``common.files``: atomic writes and output-location checks.
- ``common.names``: class- and task-name spellings.
- ``common.errors``: ``CheckpointError``.
"""
