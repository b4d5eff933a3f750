"""`python -m route COMMAND ...`: the `route` command (route.cli)."""

from route.cli import main

if __name__ == "__main__":
    main()
