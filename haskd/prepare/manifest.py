"""Resumable dataset preparation: the manifest of finished scenes and the parallel job loop built on it.

The manifest is one JSON file in the output root (``<out>/manifest.json``)::

    {"version": 1, "dataset": "scannet",
     "scenes": {"scene0000_00": {"split": "train", "num_points": 81369,
                                 "fingerprint": "<sha256 of the options and input file sizes>",
                                 "files": {"coord.npy": "<sha256>", "frames/color/000000.jpg": "<sha256>", ...},
                                 "info": {...}}}}

A scene counts as done when its entry exists, its fingerprint matches the current run (same options, same input
sizes) and the scene folder holds exactly the listed files with the listed checksums. Anything else is redone; since
scene folders are written atomically (:func:`haskd.data.scene.write_scene`) and the manifest is rewritten atomically
after every finished scene, a run killed at any moment resumes where it stopped and ends with the same output as an
uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from ..errors import HaskdError

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


def file_sha256(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def folder_checksums(folder) -> dict:
    """{relative posix path: sha256} of every file under ``folder`` (recursively), sorted by path."""
    folder = Path(folder)
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[p.relative_to(folder).as_posix()] = file_sha256(p)
    return out


def fingerprint(options: dict, inputs: Iterable = ()) -> str:
    """Hash of the options that shape a scene's output and of its input files' sizes (a changed input is redone)."""
    sizes = {}
    for p in inputs:
        p = Path(p)
        sizes[p.name] = p.stat().st_size if p.is_file() else None
    blob = json.dumps({"options": options, "inputs": sizes}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class Manifest:
    """The record of finished scenes in ``<out>/manifest.json`` (read once, rewritten atomically on every change)."""

    def __init__(self, out_root, dataset: str):
        self.root = Path(out_root)
        self.path = self.root / MANIFEST_NAME
        self.dataset = dataset
        self.scenes: dict = {}
        self._sweep()
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError) as e:
                # A broken manifest only costs a redo of everything; never trust it.
                log.warning("%s: unreadable manifest (%s); every scene will be redone", self.path, e)
                data = {}
            if data.get("dataset", dataset) != dataset:
                raise HaskdError(f"{self.path}: output root holds a '{data.get('dataset')}' dataset, "
                                 f"not '{dataset}'; choose another --out")
            if data.get("version") == MANIFEST_VERSION:
                self.scenes = dict(data.get("scenes", {}))

    def _sweep(self):
        """Remove temp manifests (``.manifest.<pid>.<random>.json``) of runs that were killed while saving."""
        from ..io import _alive

        if not self.root.is_dir():
            return
        for p in self.root.glob(".manifest.*.json"):
            pid = p.name.split(".")[2]
            if pid.isdigit() and not _alive(int(pid)):
                p.unlink(missing_ok=True)

    def scene_dir(self, name: str, split: str) -> Path:
        return self.root / split / name

    def is_done(self, name: str, split: str, fp: str) -> bool:
        e = self.scenes.get(name)
        if not e or e.get("split") != split or e.get("fingerprint") != fp:
            return False
        d = self.scene_dir(name, split)
        if not d.is_dir():
            return False
        try:
            return folder_checksums(d) == e.get("files")
        except OSError:
            return False

    def record(self, name: str, entry: dict):
        """Store a finished scene and save. A scene that moved split loses its old folder."""
        old = self.scenes.get(name)
        if old and old.get("split") != entry["split"]:
            shutil.rmtree(self.scene_dir(name, old["split"]), ignore_errors=True)
        self.scenes[name] = entry
        self.save()

    def forget(self, name: str):
        if self.scenes.pop(name, None) is not None:
            self.save()

    def save(self):
        self.root.mkdir(parents=True, exist_ok=True)
        data = {"version": MANIFEST_VERSION, "dataset": self.dataset,
                "scenes": {k: self.scenes[k] for k in sorted(self.scenes)}}
        fd, tmp = tempfile.mkstemp(prefix=f".manifest.{os.getpid()}.", suffix=".json", dir=self.root)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@dataclass
class Job:
    """One scene to prepare. ``params`` is what the worker function needs (picklable); ``inputs`` feed the fingerprint."""
    name: str
    split: str
    params: dict
    inputs: list = field(default_factory=list)


@dataclass
class Summary:
    done: list = field(default_factory=list)      # scene names prepared in this run
    skipped: list = field(default_factory=list)   # already done (manifest + checksums)
    failed: dict = field(default_factory=dict)    # name -> one-line reason
    warnings: list = field(default_factory=list)  # one-line warnings from the workers

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def report(self, stream=None):
        stream = stream or sys.stderr
        print(f"prepared {len(self.done)} scene(s), skipped {len(self.skipped)} already done, "
              f"failed {len(self.failed)}", file=stream)
        for name, reason in sorted(self.failed.items()):
            print(f"  FAILED {name}: {reason}", file=stream)


def _call(worker: Callable, job: Job, out_dir: str) -> dict:
    """Run one job in a worker; turn any exception into a one-line failure reason instead of killing the run."""
    try:
        res = worker(job.name, job.params, out_dir)
    except HaskdError as e:
        return {"ok": False, "reason": str(e)}
    except Exception as e:  # a bug or an unforeseen input problem: fail this scene only, say what it was
        return {"ok": False, "reason": f"{type(e).__name__}: {e}"}
    res = dict(res)
    res["ok"] = True
    res["files"] = folder_checksums(out_dir)
    return res


def run_jobs(jobs: list, worker: Callable, manifest: Manifest, options: dict, workers: int = 1,
             desc: str = "prepare") -> Summary:
    """Prepare every job not yet done, in parallel, recording each finished scene in the manifest at once.

    ``worker(name, params, out_dir) -> {"num_points": int, "info": dict, "warnings": [str]}`` writes the scene
    folder ``out_dir`` (atomically) and raises :class:`HaskdError` / :class:`InputError` for bad input.
    ``workers <= 1`` runs in this process (no pool). Returns a :class:`Summary`; never raises for a bad scene.
    """
    from ..progress import progress

    summary = Summary()
    todo = []
    fps = {}
    for job in jobs:
        fp = fingerprint(options, job.inputs)
        fps[job.name] = fp
        if manifest.is_done(job.name, job.split, fp):
            summary.skipped.append(job.name)
        else:
            todo.append(job)
    _clean_stale_tmp(manifest.root, {j.split for j in jobs})

    def finish(job: Job, res: dict):
        for w in res.get("warnings", []):
            log.warning("%s", w)
            summary.warnings.append(w)
        if not res["ok"]:
            summary.failed[job.name] = res["reason"]
            manifest.forget(job.name)
            return
        manifest.record(job.name, {"split": job.split, "num_points": int(res["num_points"]),
                                   "fingerprint": fps[job.name], "files": res["files"],
                                   "info": res.get("info", {})})
        summary.done.append(job.name)

    bar = progress(total=len(todo), desc=desc, unit="scene", file=sys.stderr)
    try:
        if workers <= 1 or len(todo) <= 1:
            for job in todo:
                finish(job, _call(worker, job, str(manifest.scene_dir(job.name, job.split))))
                bar.update(1)
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                pending = {pool.submit(_call, worker, job, str(manifest.scene_dir(job.name, job.split))): job
                           for job in todo}
                try:
                    while pending:
                        finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in finished:
                            job = pending.pop(fut)
                            try:
                                res = fut.result()
                            except Exception as e:  # the worker process died (e.g. out of memory)
                                res = {"ok": False, "reason": f"worker crashed: {type(e).__name__}: {e}"}
                            finish(job, res)
                            bar.update(1)
                except BaseException:
                    for fut in pending:
                        fut.cancel()
                    raise
    finally:
        bar.close()
    return summary


def _clean_stale_tmp(root: Path, splits):
    """Remove temporary scene folders left by a killed run (write_scene names them ``.<scene>.<random>``)."""
    for split in splits:
        d = root / split
        if d.is_dir():
            for p in d.iterdir():
                if p.is_dir() and p.name.startswith("."):
                    shutil.rmtree(p, ignore_errors=True)
