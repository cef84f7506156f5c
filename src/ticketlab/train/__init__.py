"""How networks train: K masked networks side by side, dense or sparse, and supermasks."""
