"""`python -m analysis SUBCOMMAND --sweep NAME ...`: see `analysis.cli`."""

from analysis.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
