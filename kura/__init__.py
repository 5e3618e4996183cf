"""The `kura` command: a dispatcher that loads only the half a subcommand needs."""
