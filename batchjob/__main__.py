import sys

from batchjob.cli import main

sys.exit(main())
