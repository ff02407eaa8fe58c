"""The `clip-pipeline` subcommands, one module per group of stages; flows/cli.py assembles them."""
