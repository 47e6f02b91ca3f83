"""TFDS builder: scikit-learn digits as images, moving-digit videos, keypad tones and text."""
