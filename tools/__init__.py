"""Command-line tools around a trained model: evaluate, search, visualize, export."""
