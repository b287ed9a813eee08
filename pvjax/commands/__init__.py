"""Subcommands of the `pvjax` CLI."""
