"""``python -m cloakonnx``: the same as the ``cloakonnx`` command."""
from .cli import main

if __name__ == "__main__":
    main()
