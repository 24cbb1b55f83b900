"""fnnet's experiments: the architectures trained side by side on real tasks.

``python -m experiments list | run NAME... | report``; see ``experiments/README.md``.
Each file in ``experiments/suite/`` defines one experiment; ``_models.py`` is the
model registry.
"""
