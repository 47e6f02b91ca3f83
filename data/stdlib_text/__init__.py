"""TFDS builder: English prose paragraphs from the Python standard library's docstrings."""
