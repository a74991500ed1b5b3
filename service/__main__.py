"""``python -m service``: the chat service, or its ``users`` and ``models`` commands
(:mod:`service.cli.serve`)."""

from service.cli.serve import main_and_exit

if __name__ == "__main__":
    main_and_exit()
