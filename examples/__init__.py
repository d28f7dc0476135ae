"""Runnable examples for npas_fx (``python examples/digits_cnn.py``)."""
