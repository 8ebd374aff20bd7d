"""The files of an exported trajectory schedule (issue 20): one static subnet folder per distinct
segment subnet and ``schedule.json`` (steps, each segment's steps, folder and subnet). Written by
``python -m harness.export``, read by ``python -m harness.sample``."""

from __future__ import annotations

import json
from pathlib import Path

from harness.candidates import Candidate, Segment
from search_spaces import ConfigError, SubnetConfig, save_static

SCHEDULE_FILE = "schedule.json"  # marks an exported schedule directory (harness.sample looks for it)
SCHEDULE_FORMAT = "sned-schedule/1"


def schedule_folders(cand: Candidate) -> list[str]:
    """The folder of each segment of a schedule: ``segment<i>`` for the first segment ``i`` (1-based) that
    runs a subnet; later segments with the same subnet reuse it (one copy of identical weights)."""
    first_use: dict[str, str] = {}
    return [
        first_use.setdefault(seg.subnet.key, f"segment{i}") for i, seg in enumerate(cand.segments, start=1)
    ]


def schedule_record(cand: Candidate) -> dict:
    """The content of ``schedule.json``: what ``read_schedule`` needs to run the exported schedule."""
    return {
        "format": SCHEDULE_FORMAT,
        "steps": cand.steps,
        "segments": [
            {"first_step": seg.first, "last_step": seg.last, "folder": folder, "subnet": seg.subnet.to_dict()}
            for seg, folder in zip(cand.segments, schedule_folders(cand), strict=True)
        ],
    }


def read_schedule(directory: str | Path) -> tuple[int, list[tuple[Segment, Path]]]:
    """``(steps, [(segment, folder), ...])`` of the exported schedule in ``directory`` (its
    ``schedule.json``); a malformed or incomplete one is a one-line ``ConfigError``."""
    directory = Path(directory)
    f = directory / SCHEDULE_FILE
    try:
        record = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(
            f"cannot read {f} ({e}); re-export the schedule with python -m harness.export"
        ) from None
    if not isinstance(record, dict) or record.get("format") != SCHEDULE_FORMAT:
        raise ConfigError(
            f"{f} is not a schedule of format {SCHEDULE_FORMAT}; re-export it with harness.export"
        )
    try:
        pairs = [
            (Segment(int(s["first_step"]), int(s["last_step"]), SubnetConfig.from_dict(s["subnet"])),
             directory / str(s["folder"]))
            for s in record["segments"]
        ]  # fmt: skip
        steps = record["steps"]
        segments = tuple(seg for seg, _ in pairs)
        Candidate(segments[0].subnet, None, steps, segments)  # the cover check: 1 .. steps, in order
    except (KeyError, TypeError, ValueError, IndexError) as e:
        if isinstance(e, ConfigError):
            raise ConfigError(f"{f}: {e}") from None
        raise ConfigError(f"{f} is malformed ({e!r}); re-export the schedule with harness.export") from None
    for seg, folder in pairs:
        if folder.parent != directory or not (folder / "config.json").is_file():
            raise ConfigError(
                f"{f}: segment {seg.first}-{seg.last}'s folder {folder} holds no model; re-export"
            )
    return steps, pairs


def write_base(directory: Path, base, cand: Candidate) -> None:
    """The base model of ``cand``'s export: ``base/`` for one subnet; for a schedule each distinct
    segment subnet's folder (``schedule_folders``) and ``schedule.json``."""
    if not cand.is_schedule:
        save_static(base.supernet.extract(cand.base), directory / "base", extra=base.provenance())
        return
    for seg, folder in zip(cand.segments, schedule_folders(cand), strict=True):
        if not (directory / folder).exists():  # a later segment with the same subnet reuses the folder
            save_static(base.supernet.extract(seg.subnet), directory / folder, extra=base.provenance())
    (directory / SCHEDULE_FILE).write_text(json.dumps(schedule_record(cand), indent=1))
