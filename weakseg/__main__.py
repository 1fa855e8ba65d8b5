"""`python -m weakseg ...` (the same as the `weakseg` command; `torchrun -m weakseg ...` uses it)."""

from weakseg.cli import main

if __name__ == "__main__":
    main()
