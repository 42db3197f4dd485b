"""The ``capi-backbones`` command line. Each ``*_commands`` module registers its subcommands."""
