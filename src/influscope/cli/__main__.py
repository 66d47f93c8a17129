"""``python -m influscope.cli`` runs the command-line interface (same as ``influscope``)."""

from influscope.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
