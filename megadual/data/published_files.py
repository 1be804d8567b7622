"""A set of files published under fixed names in one atomic step (scripts/preprocess_data.py's
tokenizer, ``.bin`` and ``.idx``), so that a reader never pairs files of two runs.

Each public name ``FOLDER/NAME`` is a symlink to ``.BASE.current/NAME``, and ``.BASE.current`` a
symlink to one complete set, ``.BASE.versions/N``. A run writes its files into a fresh
``.BASE.versions/N+1`` and publishes them by replacing ``.BASE.current``: one rename, before which
every public name reads the old set and after which every one reads the new set, wherever the run
is killed. Files that are plain files (from an older run or Megatron's own tool) are first taken
under the pointer without an instant in which their name is missing or different: hard-linked into
the current version, then each name replaced by its symlink. A version folder that is not current
(a killed or failed run's, or the one just replaced) is removed by the next run.
"""

from __future__ import annotations

import contextlib
import os
import shutil


class PublishedFiles:
    """The versions under one output prefix; `path` says where this run writes a file, `publish`
    makes this run's version the current one."""

    def __init__(self, prefix: str) -> None:
        self.folder = os.path.dirname(os.path.abspath(prefix))
        base = os.path.basename(prefix)
        self.pointer_name, self.versions_name = f".{base}.current", f".{base}.versions"
        self.pointer = os.path.join(self.folder, self.pointer_name)
        self.versions = os.path.join(self.folder, self.versions_name)
        current = self._current()
        self._remove_versions_except(current)
        self.number = 1 if current is None else current + 1
        self.staging = self._version(self.number)
        os.makedirs(self.staging)

    def path(self, public_path: str) -> str:
        """Where this run writes the file published as `public_path`."""
        return os.path.join(self.staging, os.path.basename(public_path))

    def publish(self, public_paths: list[str]) -> None:
        names = [os.path.basename(path) for path in public_paths]
        current = self._current()
        if current is not None:  # files this run does not rewrite stay (not a killed link's .tmp)
            for name in sorted(set(os.listdir(self._version(current))) - set(names)):
                if name.endswith(".tmp"):
                    continue
                _link_or_copy(os.path.join(self._version(current), name), os.path.join(self.staging, name))
        self._adopt_plain_files(names)
        for name in names:
            self._point(os.path.join(self.folder, name), os.path.join(self.pointer_name, name))
        self._commit()
        self._remove_versions_except(self.number)

    def _commit(self) -> None:
        """The one rename that publishes this run's version."""
        self._point(self.pointer, os.path.join(self.versions_name, str(self.number)))

    def abandon(self) -> None:
        """Remove this run's version, unless it was published (a failure after the commit point)."""
        if self._current() != self.number:
            shutil.rmtree(self.staging, ignore_errors=True)

    def _adopt_plain_files(self, names: list[str]) -> None:
        plain = [name for name in names if self._is_foreign(name)]
        if not plain:
            return
        current = self._current()
        if current is None:
            current = 0
            os.makedirs(self._version(0), exist_ok=True)
        for name in plain:
            _link_or_copy(os.path.join(self.folder, name), os.path.join(self._version(current), name))
        self._point(self.pointer, os.path.join(self.versions_name, str(current)))
        for name in plain:
            self._point(os.path.join(self.folder, name), os.path.join(self.pointer_name, name))

    def _is_foreign(self, name: str) -> bool:
        """Whether the public name is a file (or a symlink) of its own, not one through the pointer."""
        path = os.path.join(self.folder, name)
        if os.path.islink(path):
            return os.readlink(path) != os.path.join(self.pointer_name, name) and os.path.exists(path)
        return os.path.exists(path)

    def _current(self) -> int | None:
        try:
            return int(os.path.basename(os.readlink(self.pointer)))
        except FileNotFoundError:
            return None

    def _version(self, number: int) -> str:
        return os.path.join(self.versions, str(number))

    def _remove_versions_except(self, keep: int | None) -> None:
        with contextlib.suppress(FileNotFoundError):
            for entry in os.listdir(self.versions):
                if entry != str(keep):
                    shutil.rmtree(os.path.join(self.versions, entry))

    @staticmethod
    def _point(path: str, target: str) -> None:
        """Make `path` a symlink to `target` in one rename."""
        if os.path.islink(path) and os.readlink(path) == target:
            return
        temporary = f"{path}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        os.symlink(target, temporary)
        os.replace(temporary, path)


def _link_or_copy(source: str, destination: str) -> None:
    temporary = f"{destination}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.remove(temporary)
    try:
        os.link(source, temporary)
    except OSError:  # a file system without hard links, or a symlink to another one
        shutil.copy2(source, temporary)
    os.replace(temporary, destination)
