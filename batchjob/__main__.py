import sys

try:
    from batchjob.cli import main
except KeyboardInterrupt:  # Ctrl-C while Python imports the CLI
    print("batchjob: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
