"""rknn-pipeline: declarative, incremental rknn-toolkit2 conversion driven by doit.

Stages, each a module with plain JSON-serialisable data in and out:
manifest -> analysis -> resolution -> conversion -> export.
"""

__version__ = "0.1.0"
