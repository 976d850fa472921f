import sys

from quailora_app.cli import main

sys.exit(main())
