"""``python -m quantlab ...`` (also what ``torchrun -m quantlab`` runs)."""
from quantlab.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
