"""Adapters for training loops other than Lightning's.

``prunekit.integrations.transformers.PruningCallback`` drives pruning inside a Hugging Face
``Trainer`` (install with ``pip install prunekit[transformers]``). Each adapter imports its
library only when its own module is imported.
"""
