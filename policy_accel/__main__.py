import sys

from policy_accel.cli import main

sys.exit(main())
