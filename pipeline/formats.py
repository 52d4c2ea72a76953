"""Format numbers shared by the doit wiring, the stages and the CI helpers.

A leaf module (imports nothing from the package) so that ``tasks``, ``stages``
and ``ci`` can all read these without importing each other.
"""

PIPELINE_FORMAT = 1  # bump when an artifact's meaning changes: invalidates caches and tasks
SIDECAR_FORMAT = 1  # dist/<target>/<name>.json and dist/models.lock.json
ANALYSIS_FORMAT = 1  # build/<name>/<target>/analysis.json
RESOLUTION_FORMAT = 1  # resolved.json
CONVERT_FORMAT = 1  # convert.json
