"""``python -m medad_monai.apps.label init <app_dir> <bundle>...`` (see :mod:`medad_monai.apps.label.setup_app`)."""

import sys

from .setup_app import main

sys.exit(main())
