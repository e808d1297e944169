"""The fine-tuning side's exception type for bad input."""


class TrainingError(ValueError):
    """A fine-tuning setting outside its domain (a learning rate <= 0, a negative momentum, ...)."""
