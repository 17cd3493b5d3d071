import sys

from kdforge.cli import main

sys.exit(main())
