"""Integrations with training frameworks; each is an optional extra.

- :mod:`meaning_transform.integrations.lightning`: :class:`DoctorCallback`, the Doctor as
  a ``lightning.pytorch.Callback`` (``pip install "meaning-transform[lightning]"``).

The core never imports these modules, and this package imports none of them: importing
``meaning_transform.integrations`` does not import lightning.
"""
