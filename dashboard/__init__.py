"""meshgate's control server and operator command line.

For now this package holds only the `meshgate` command (`cli.py`), which dispatches to the gateway's
subcommands. The control server (config store, CA, span store, UI) arrives with the control-server issue.
"""
