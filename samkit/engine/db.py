"""The project database: one SQLite file (stdlib ``sqlite3``) in WAL mode.

Every write is one short ``BEGIN IMMEDIATE`` transaction, and ``synchronous=FULL`` makes a
commit durable before it returns: an accept answered with 200 survives a ``kill -9`` or a power
cut. WAL lets the annotation server, ``samkit engine auto`` shards and ``retrain`` read and
write the same file at once (``busy_timeout`` makes a writer wait for another instead of
failing).

Masks are stored as compressed COCO RLE (``{"size": [h, w], "counts": str}``), the form both
export formats use. An annotation's ``status`` records the review: stage-2 *candidates* become
*accepted* (kept) or *rejected*; accepted masks can be *deleted*; both removals can be undone.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samkit.errors import SamkitError

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    file_name TEXT NOT NULL UNIQUE,       -- inside the project's images/ folder
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    added_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS model_versions (
    id INTEGER PRIMARY KEY,
    model TEXT NOT NULL,                  -- registry name (samkit.registry.MODEL_CONFIGS)
    checkpoint TEXT,                      -- relative to the project, or absolute; NULL: bundled
    parent_id INTEGER REFERENCES model_versions(id),
    note TEXT NOT NULL DEFAULT '',        -- JSON: how it was made (retrain steps, data, loss)
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS annotations (
    id INTEGER PRIMARY KEY,
    image_id INTEGER NOT NULL REFERENCES images(id),
    stage INTEGER NOT NULL CHECK (stage IN (1, 2, 3)),
    status TEXT NOT NULL CHECK (status IN ('accepted', 'candidate', 'rejected', 'deleted')),
    segmentation TEXT NOT NULL,           -- JSON COCO RLE, counts as str
    area INTEGER NOT NULL,
    bbox TEXT NOT NULL,                   -- JSON [x, y, w, h]
    prompts TEXT,                         -- JSON {"points": [[x, y, label]], "box": [...] | null}
    score REAL,                           -- the model's predicted IoU
    stability REAL,
    annotator TEXT NOT NULL,
    seconds REAL NOT NULL,                -- annotation time spent on this mask
    model_version INTEGER REFERENCES model_versions(id),
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS annotations_by_image ON annotations (image_id, status);
CREATE TABLE IF NOT EXISTS image_runs (   -- automatic passes: 'prefill' (stage 2), 'auto' (3)
    image_id INTEGER NOT NULL REFERENCES images(id),
    kind TEXT NOT NULL CHECK (kind IN ('prefill', 'auto')),
    model_version INTEGER NOT NULL REFERENCES model_versions(id),
    masks INTEGER NOT NULL,
    seconds REAL NOT NULL,
    done_at REAL NOT NULL,
    PRIMARY KEY (image_id, kind)
);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL                   -- JSON
);
"""

# Review actions: (action, status now) -> new status. A deleted candidate is 'rejected', so
# that undoing the delete brings it back as a candidate rather than as an accepted mask.
TRANSITIONS: dict[tuple[str, str], str] = {
    ("keep", "candidate"): "accepted",
    ("delete", "accepted"): "deleted",
    ("delete", "candidate"): "rejected",
    ("restore", "deleted"): "accepted",
    ("restore", "rejected"): "candidate",
}
VISIBLE_STATUSES = ("accepted", "candidate")


class Conflict(SamkitError):
    """The request clashes with the project's state (a taken name, a review that does not
    apply to the annotation's status): HTTP 409."""


@dataclass(frozen=True)
class ImageRow:
    id: int
    file_name: str
    width: int
    height: int


@dataclass(frozen=True)
class ModelVersion:
    id: int
    model: str
    checkpoint: str | None
    parent_id: int | None
    note: str
    created_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "model": self.model, "checkpoint": self.checkpoint,
            "parent_id": self.parent_id, "note": json.loads(self.note or "{}"),
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class NewAnnotation:
    """An annotation to insert; ``segmentation`` is a validated COCO RLE (str counts)."""

    image_id: int
    stage: int
    status: str
    segmentation: dict[str, Any]
    area: int
    bbox: list[int]
    prompts: dict[str, Any] | None
    score: float | None
    stability: float | None
    annotator: str
    seconds: float
    model_version: int | None


class Database:
    """Thread-safe access to ``project.db``: one connection, used under a lock.

    SQLite runs one writer at a time anyway, and every statement here takes microseconds to
    milliseconds, so one shared connection costs nothing and keeps the code simple.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._conn = sqlite3.connect(
                path, check_same_thread=False, isolation_level=None, timeout=30.0
            )
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.execute("PRAGMA busy_timeout=30000")
            self._conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as err:
            raise SamkitError(f"cannot open project database {path}: {err}") from None
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, taken up front (IMMEDIATE) so it never fails half-way on a
        lock; committed (durably) on success, rolled back on any error."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def integrity_check(self) -> str:
        return str(self.query("PRAGMA integrity_check")[0][0])

    # ------------------------------------------------------------------ images
    def add_image(self, file_name: str, width: int, height: int) -> int:
        try:
            with self.transaction() as conn:
                cur = conn.execute(
                    "INSERT INTO images (file_name, width, height, added_at) VALUES (?, ?, ?, ?)",
                    (file_name, width, height, time.time()),
                )
        except sqlite3.IntegrityError:
            raise Conflict(f"the project already has an image named {file_name!r}") from None
        return int(cur.lastrowid)

    def image(self, image_id: int) -> ImageRow | None:
        rows = self.query("SELECT id, file_name, width, height FROM images WHERE id = ?",
                          (image_id,))
        return ImageRow(*rows[0]) if rows else None

    def image_by_name(self, file_name: str) -> ImageRow | None:
        rows = self.query("SELECT id, file_name, width, height FROM images WHERE file_name = ?",
                          (file_name,))
        return ImageRow(*rows[0]) if rows else None

    def images(self) -> list[ImageRow]:
        return [ImageRow(*r) for r in
                self.query("SELECT id, file_name, width, height FROM images ORDER BY id")]

    def image_summaries(self) -> list[dict[str, Any]]:
        """Every image with its number of accepted masks and open candidates."""
        rows = self.query(
            "SELECT i.id, i.file_name, i.width, i.height,"
            " COUNT(CASE WHEN a.status = 'accepted' THEN 1 END) AS accepted,"
            " COUNT(CASE WHEN a.status = 'candidate' THEN 1 END) AS candidates"
            " FROM images i LEFT JOIN annotations a ON a.image_id = i.id"
            " GROUP BY i.id ORDER BY i.id"
        )
        return [dict(r) for r in rows]

    # ------------------------------------------------------------------ annotations
    def add_annotations(
        self, items: Sequence[NewAnnotation], run: tuple[int, str, int, float] | None = None
    ) -> list[int]:
        """Insert annotations in one transaction; ``run`` = ``(image_id, kind, model_version,
        seconds)`` also records an automatic pass as done, atomically with its masks (so a
        killed ``engine auto`` never leaves an image half-filled and marked done)."""
        now = time.time()
        with self.transaction() as conn:
            ids = [
                int(conn.execute(
                    "INSERT INTO annotations (image_id, stage, status, segmentation, area, bbox,"
                    " prompts, score, stability, annotator, seconds, model_version, created_at,"
                    " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (a.image_id, a.stage, a.status, json.dumps(a.segmentation), a.area,
                     json.dumps(a.bbox), None if a.prompts is None else json.dumps(a.prompts),
                     a.score, a.stability, a.annotator, a.seconds, a.model_version, now, now),
                ).lastrowid)
                for a in items
            ]
            if run is not None:
                image_id, kind, version, seconds = run
                conn.execute(
                    "INSERT OR REPLACE INTO image_runs VALUES (?, ?, ?, ?, ?, ?)",
                    (image_id, kind, version, len(items), seconds, now),
                )
        return ids

    def annotation(self, annotation_id: int) -> dict[str, Any] | None:
        rows = self.query("SELECT * FROM annotations WHERE id = ?", (annotation_id,))
        return annotation_json(rows[0]) if rows else None

    def annotations(
        self, image_id: int | None = None, statuses: Sequence[str] = VISIBLE_STATUSES,
        stages: Sequence[int] = (1, 2, 3),
    ) -> list[dict[str, Any]]:
        """Annotations (of one image, or all) with the given statuses and stages, oldest
        first."""
        sql = (f"SELECT * FROM annotations WHERE status IN ({_marks(statuses)})"
               f" AND stage IN ({_marks(stages)})")
        params: list[Any] = [*statuses, *stages]
        if image_id is not None:
            sql += " AND image_id = ?"
            params.append(image_id)
        return [annotation_json(r) for r in self.query(sql + " ORDER BY id", params)]

    def review(self, annotation_id: int, action: str, annotator: str | None = None,
               seconds: float | None = None) -> dict[str, Any] | None:
        """Apply a review ``action`` (keep / delete / restore); None when the annotation does
        not exist. A transition not allowed from its status is a :class:`SamkitError`."""
        with self.transaction() as conn:
            row = conn.execute("SELECT status FROM annotations WHERE id = ?",
                               (annotation_id,)).fetchone()
            if row is None:
                return None
            new_status = TRANSITIONS.get((action, row["status"]))
            if new_status is None:
                raise Conflict(
                    f"cannot {action} annotation {annotation_id}: it is {row['status']}"
                )
            sets, params = ["status = ?", "updated_at = ?"], [new_status, time.time()]
            if annotator is not None:
                sets.append("annotator = ?")
                params.append(annotator)
            if seconds is not None:
                sets.append("seconds = ?")
                params.append(seconds)
            conn.execute(f"UPDATE annotations SET {', '.join(sets)} WHERE id = ?",
                         (*params, annotation_id))
        return self.annotation(annotation_id)

    def images_with_accepted(self, stages: Sequence[int] = (1, 2)) -> set[int]:
        rows = self.query(
            f"SELECT DISTINCT image_id FROM annotations WHERE status = 'accepted'"
            f" AND stage IN ({_marks(stages)})", list(stages))
        return {int(r[0]) for r in rows}

    def runs_done(self, kind: str) -> set[int]:
        return {int(r[0]) for r in
                self.query("SELECT image_id FROM image_runs WHERE kind = ?", (kind,))}

    # ------------------------------------------------------------------ model versions
    def add_model_version(self, model: str, checkpoint: str | None, parent_id: int | None,
                          note: dict[str, Any] | None = None) -> ModelVersion:
        with self.transaction() as conn:
            cur = conn.execute(
                "INSERT INTO model_versions (model, checkpoint, parent_id, note, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (model, checkpoint, parent_id, json.dumps(note or {}), time.time()),
            )
        version = self.model_version(int(cur.lastrowid))
        assert version is not None
        return version

    def model_version(self, version_id: int) -> ModelVersion | None:
        rows = self.query("SELECT * FROM model_versions WHERE id = ?", (version_id,))
        return ModelVersion(*rows[0]) if rows else None

    def model_versions(self) -> list[ModelVersion]:
        return [ModelVersion(*r) for r in self.query("SELECT * FROM model_versions ORDER BY id")]

    def find_model_version(self, model: str, checkpoint: str | None) -> ModelVersion | None:
        rows = self.query(
            "SELECT * FROM model_versions WHERE model = ? AND checkpoint IS ? ORDER BY id",
            (model, checkpoint),
        )
        return ModelVersion(*rows[0]) if rows else None

    def current_model_version(self) -> ModelVersion:
        version_id = self.get_setting("model_version")
        version = None if version_id is None else self.model_version(int(version_id))
        if version is None:
            raise SamkitError(f"project database {self.path} has no current model version")
        return version

    # ------------------------------------------------------------------ settings
    def get_setting(self, key: str, default: Any = None) -> Any:
        rows = self.query("SELECT value FROM settings WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else default

    def set_settings(self, values: dict[str, Any]) -> None:
        with self.transaction() as conn:
            conn.executemany("INSERT OR REPLACE INTO settings VALUES (?, ?)",
                             [(k, json.dumps(v)) for k, v in values.items()])


def annotation_json(row: sqlite3.Row) -> dict[str, Any]:
    """A database row as the API and the exporters see it (JSON columns parsed)."""
    out = dict(row)
    out["segmentation"] = json.loads(out["segmentation"])
    out["bbox"] = json.loads(out["bbox"])
    out["prompts"] = None if out["prompts"] is None else json.loads(out["prompts"])
    return out


def _marks(values: Sequence[Any]) -> str:
    return ", ".join("?" * len(values))
