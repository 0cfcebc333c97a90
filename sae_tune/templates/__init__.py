"""Jinja2 templates of the Triton kernel family and their renderer (``render.py``)."""
