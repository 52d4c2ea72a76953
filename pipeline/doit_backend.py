"""The dependency database backend: doit's sqlite3 one, opened on first use.

doit creates its backend (and so the ``.doit.db`` file) before it loads any
task, which is when this package reads the manifest. With the stock backend a
manifest that is refused at load still leaves an empty database in the user's
tree. This one connects the first time doit asks for or stores a task's state,
which only happens once every task was generated, i.e. once the manifest was
accepted. Registered as ``rknn-sqlite3`` through the ``doit.BACKEND`` entry
point (see pyproject.toml); same file format as ``sqlite3``, so an existing
``.doit.db`` keeps working.
"""

from __future__ import annotations

from doit.dependency import SqliteDB


class LazySqliteDB(SqliteDB):
    """``SqliteDB`` whose file is created by the first read or write, not by the constructor."""

    def __init__(self, name, codec, *, module_name=None):  # noqa: D107 - same signature as SqliteDB
        self.name = name
        self.codec = codec
        self._connection = None
        self._cache = {}
        self._dirty = set()

    @property
    def _conn(self):
        if self._connection is None:
            self._connection = self._sqlite3(self.name)
        return self._connection

    @_conn.setter
    def _conn(self, value):
        self._connection = value

    def dump(self):
        if self._connection is None and not self._dirty:
            return  # never used: nothing to save, and no file to create
        super().dump()
        self._connection = None
