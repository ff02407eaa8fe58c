"""Outputs that appear whole or not at all (STYLE 14): build a stage's files aside, swap at the end.

A stage writes everything into OUT/_<stage>_staging-<token>/ (the "_" keeps it out of a `*.parquet`
glob of OUT, the random token keeps runs apart). Only once all of it is written does `commit` swap:
the old marker (the stage's stats JSON) goes first, then the old part files the stage wrote, then
the new files move in and the new marker comes last. So a run that fails before the swap leaves
the previous complete result as it was (its staging folder is removed), and a marker always
describes the parts beside it. The swap itself is a few renames (copies on object stores): a
kill inside it leaves no marker, and the next run redoes the stage.

A stage deletes only what it can prove it wrote: files of its naming (part files
`part-NNNNN.parquet`, or its fixed output names) that its old marker lists or that match its part
naming, in a folder that holds its marker or one of its staging folders. A folder that holds such
names without either was not written by this stage and is refused at the door, before any work.
A successful swap also sweeps staging folders that killed runs left; a failed first run leaves no
empty OUT behind. Two runs into one OUT at the same time are not supported.
"""
from __future__ import annotations

import json
import posixpath
import re
import uuid

import fsspec

from clip_core.errors import InputError, check

PART = re.compile(r"part-\d{5}\.parquet")


class StagedOutput:
    """OUT's new content, built in a staging folder and swapped in by `commit`; `with` cleans up."""

    def __init__(self, out_uri: str, stage: str, marker: str, listed_key: str = "parts",
                 outputs: tuple[str, ...] = (), legacy: tuple[str, ...] = (), storage_options: dict | None = None,
                 parts: re.Pattern | None = PART):
        self.out_uri, self.stage, self.marker = out_uri.rstrip("/") or out_uri, stage, marker
        self.listed_key = listed_key  # the marker's list of the files it describes
        self.outputs, self.legacy = outputs, legacy  # fixed names it writes; old work folders of its own
        self.parts = parts  # its part-file naming; None for a stage that writes fixed names only
        self.fs, self.out = fsspec.core.url_to_fs(self.out_uri, **(storage_options or {}))
        self.out = self.out.rstrip("/") or self.out
        self.prefix = f"_{stage}_staging-"
        token = f"{self.prefix}{uuid.uuid4().hex[:12]}"
        self.uri, self.path = f"{self.out_uri}/{token}", f"{self.out}/{token}"
        self.committed = self.created = False

    def check(self) -> None:
        """InputError if OUT is a file, or holds this stage's file names it cannot prove it wrote."""
        if not self.fs.exists(self.out):
            return
        check(self.fs.isdir(self.out), self.out_uri, "is a file, not a folder",
              f"give OUT as a folder path, new or written by {self.stage}")
        names = self._names()
        ours = sorted(n for n in names if self._ours(n))
        if ours and not self._owned(names):
            shown = ", ".join(ours[:3]) + (", ..." if len(ours) > 3 else "")
            raise InputError(self.out_uri, f"holds {shown} but no {self.marker}: {self.stage} did not write "
                             "them and never replaces files it did not write",
                             "choose a new or empty OUT folder, or move those files away")

    def __enter__(self) -> StagedOutput:
        self.created = not self.fs.exists(self.out)
        self.fs.makedirs(self.path, exist_ok=True)
        return self

    def __exit__(self, *exc) -> None:
        if not self.committed:  # failed (or never committed): the previous result stays whole
            self._remove(self.path)
            if self.created and self.fs.exists(self.out) and not self.fs.ls(self.out, detail=False):
                self.fs.rmdir(self.out)  # nor does a failed first run leave an empty OUT

    def commit(self, keep_work: bool = False) -> list[str]:
        """Swap the staged files into OUT (marker last); the names moved in."""
        staged = sorted(posixpath.basename(p) for p in self._files(self.path))
        if self.marker not in staged:
            raise RuntimeError(f"{self.stage} staged no {self.marker} in {self.uri}")
        old = self._old_parts()
        self._remove(f"{self.out}/{self.marker}")
        for name in sorted(old - set(staged)):
            self._remove(f"{self.out}/{name}")
        for name in [n for n in staged if n != self.marker] + [self.marker]:
            self.fs.mv(f"{self.path}/{name}", f"{self.out}/{name}")
        self.committed = True
        self._sweep(keep_work)
        return staged

    def _names(self) -> set[str]:
        self.fs.invalidate_cache(self.out)
        return {posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.out, detail=False)}

    def _files(self, path: str) -> list[str]:
        self.fs.invalidate_cache(path)
        return [e["name"] for e in self.fs.ls(path, detail=True) if e["type"] == "file"]

    def _ours(self, name: str) -> bool:
        """A name of this stage's files: its part naming or one of its fixed outputs."""
        return name in self.outputs or (self.parts is not None and self.parts.fullmatch(name) is not None)

    def _owned(self, names: set[str]) -> bool:
        """OUT shows this stage's hand: its marker, a staging folder or an old work folder."""
        return self.marker in names or any(n.startswith(self.prefix) or n in self.legacy for n in names)

    def _old_parts(self) -> set[str]:
        """Files of the previous result: this stage's part naming, or listed in its old marker."""
        names = self._names()
        old = {n for n in names if self.parts is not None and self.parts.fullmatch(n)}
        return old | (self._listed() & names)

    def _listed(self) -> set[str]:
        """Names the old marker lists under listed_key (names or URIs): its outputs, and Parquet
        files for a stage that writes parts."""
        try:
            with self.fs.open(f"{self.out}/{self.marker}", "rb") as f:
                doc = json.load(f)
        except (FileNotFoundError, ValueError):
            return set()
        listed = doc.get(self.listed_key) if isinstance(doc, dict) else None
        listed = listed if isinstance(listed, list) else []
        names = {posixpath.basename(p) for p in listed if isinstance(p, str)}
        parquet = self.parts is not None
        return {n for n in names if not n.startswith(".") and (self._ours(n) or parquet and n.endswith(".parquet"))}

    def _sweep(self, keep_work: bool) -> None:
        """Remove this run's staging folder (unless kept) and leftovers of killed runs."""
        for name in self._names():
            leftover = name.startswith(self.prefix) or name in self.legacy
            if leftover and (f"{self.out}/{name}" != self.path or not keep_work):
                self._remove(f"{self.out}/{name}")

    def _remove(self, path: str) -> None:
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
