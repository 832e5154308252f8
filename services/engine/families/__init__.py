"""Built-in model families: one module per family, each defining ModelAdapter subclasses."""
