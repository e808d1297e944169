"""Small helpers the fine-tuning side (``datamodules``, ``lightning_modules``) and the merging
side (``merging``) both need; this package imports none of them.

- ``common.architectures``: the architecture record of each supported family (key prefix, head, features).
- ``common.checkpoints``: checkpoint sources (hub id or directory), family, backbone and head checks.
- ``common.reader``: a checkpoint read one tensor at a time.
- ``common.files``: atomic writes and output-location checks.
- ``common.names``: class- and task-name spellings.
- ``common.errors``: ``CheckpointError``.
"""
