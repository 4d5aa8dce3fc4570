import sys

from lambda_split.cli import main

sys.exit(main())
