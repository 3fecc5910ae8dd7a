"""The ``samkit`` sub-commands, one module each: argument parsing and output, on top of the
library. Each registers its parsers with ``add_cli(subparsers)`` and imports torch and the
models only when it runs (``samkit --help`` stays fast). Nothing in samkit imports these."""
