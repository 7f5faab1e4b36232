"""``python -m imagehandler.ihctl``: the same as the ``ihctl`` console script."""

from imagehandler.ihctl import main

raise SystemExit(main())
