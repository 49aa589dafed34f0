"""`python -m arcface.from_folder IMAGES OUT ...`: the command of tools/from_folder.py, by its older name."""
import sys

from tools.from_folder import main

sys.exit(main())
