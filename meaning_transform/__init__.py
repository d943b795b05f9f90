"""mtx: a command-line doctor for VAE training losses and gradients.

Importing this package is cheap on purpose: it must not import torch, so that
``mtx --help`` answers instantly. Import ``meaning_transform.losses`` for the loss library.
"""

__version__ = "0.1.0"
