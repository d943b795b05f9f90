"""mtx: a command-line doctor for VAE training losses and gradients.

Importing this package is cheap on purpose: it imports no numerical library, so that
``mtx --help`` answers instantly. Import ``meaning_transform.losses`` for the loss library.
"""

__version__ = "0.1.0"
