"""MegaMoM: distributed pretraining of Mixture-of-Memories linear sequence models."""
__version__ = "0.1.0"
