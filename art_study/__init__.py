"""art-study: which defense really protects an image classifier against adversarial attacks."""

__version__ = "0.1.0"
