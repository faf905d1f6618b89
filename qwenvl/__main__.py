"""`python -m qwenvl ...` is the `qwenvl` command."""

from qwenvl.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
