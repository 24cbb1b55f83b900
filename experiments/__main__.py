from experiments._cli import main

raise SystemExit(main())
