"""ArcFace image retrieval: model, head, data, metrics and evaluation for the DDP training series."""
