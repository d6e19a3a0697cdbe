"""The ``megavrl`` subcommands, one module each (registered in :data:`megavrl.cli.COMMAND_MODULES`).

The top floor of the package: a command may import any subsystem; nothing but the CLI imports a
command. Each module parses its arguments, checks what it can before starting processes, and calls
into the subsystem that does the work.
"""
