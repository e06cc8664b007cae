"""Training: loaders, train loop, evaluation, inference, metrics, distributed helpers."""
