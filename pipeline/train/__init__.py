"""Researcher tools for the learned lesion model: dataset import, training, evaluation, export.

Only ``loop.py`` and ``export.py`` import torch (the ``train`` extra); import, evaluation and
the intensity mapping run on the screening runtime (numpy, SimpleITK, onnxruntime).
"""
