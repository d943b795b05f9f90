"""``python -m meaning_transform`` is the same as ``mtx``."""

from meaning_transform.cli import main

if __name__ == "__main__":
    main()
