"""`python tools/fault_campaign ARGS` (from a checkout or /opt/captioning in the image) or `python -m
tools.fault_campaign ARGS` (from the folder that holds tools/)."""

import sys
from pathlib import Path

if not __package__:  # started by path: the folder itself is sys.path[0]; the checkout must be there instead
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from tools.fault_campaign.cli import main  # noqa: E402 - after the sys.path line above

sys.exit(main())
