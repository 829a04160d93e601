from modelcache.cli import main

raise SystemExit(main())
