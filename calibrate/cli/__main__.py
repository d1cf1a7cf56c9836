"""`python -m calibrate.cli`."""

from calibrate.cli import main

raise SystemExit(main())
