"""``python -m asyncwatch run ...``."""

from ._cli import main

if __name__ == "__main__":
    main()
