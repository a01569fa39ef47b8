"""Per-subcommand modules of the headscope CLI; each exposes ``register(subparsers)``."""
