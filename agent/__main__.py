"""`python -m agent` is the `lampyre` command."""

import sys

from agent.cli import main

sys.exit(main())
