"""``python -m server.ihctl``: the same as the ``ihctl`` console script."""

from server.ihctl import main

raise SystemExit(main())
