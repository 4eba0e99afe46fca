# `python -m pneumoscope` and `torchrun -m pneumoscope` both land here.
from pneumoscope.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
