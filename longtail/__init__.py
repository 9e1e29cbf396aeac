"""longtail: long-tailed image recognition with one engine for every method."""

__version__ = "0.1.0"
