"""doit tasks for rknn-pipeline.

Copy this file next to your own models.yaml; it works unchanged there.
    doit                       # build every model x target in models.yaml
    doit manifest=other.yaml   # another manifest
    doit -n 4 -P process       # four conversions at once
    doit list --all            # every task: analyze:, resolve:, convert:, export:<name>@<target>
"""

from pipeline.tasks import *  # noqa: F401,F403  (DOIT_CONFIG and the task_* generators)
