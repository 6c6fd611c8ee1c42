"""``python -m polish3d …``: the same as the ``polish3d`` command."""

from polish3d.cli import main

if __name__ == "__main__":
    main()
