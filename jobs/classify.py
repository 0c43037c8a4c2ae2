"""Classify a dataset: ``accelerate launch jobs/classify.py --config configs/<job>.yaml``."""

import sys

from batch_classify.run.job import main

if __name__ == "__main__":
    sys.exit(main())
