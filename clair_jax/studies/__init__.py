"""Studies behind the ``clair-jax`` subcommands (each exposes ``add_arguments`` and ``run``)."""
