"""What networks train on: the model and data-set registries."""
