"""``python -m harness.export``: write a searched subnet as a standalone model that ``harness.sample`` runs.

    python -m harness.export --storage results/harness.db --study NAME --trial 12 --out exported/
    python -m harness.sample --checkpoint exported/base --prompt "a small blue circle moving up"

A chain candidate also gets ``<out>/ssr`` (pass it as ``--ssr-checkpoint``).

A trajectory schedule (issue 20: K > 1 base subnets over the sampling steps) is written as one directory,
run by ``python -m harness.sample --checkpoint <out>``: ``segment<i>/`` holds the static subnet first run
by segment ``i`` (segments with the same subnet share that folder), ``schedule.json`` the step count and
each segment's first and last step and folder, beside ``candidate.json`` (and ``ssr/``, ``autoencoder/``)
as for any export. Each distinct subnet holds its own copy of the weights it shares with the others (a
small subnet's weights are slices of a larger one's): a static network owns dense tensors of its own
shapes, so sharing them would need a loader that cuts several networks from one file, which is what the
supernet checkpoint run with ``--schedule <out>/candidate.json`` already is. The copies cost at most the
sum of the distinct subnets' sizes. A candidate with its own step count but one subnet exports as any
other (``base/``), its ``candidate.json`` recording its ``steps``.

The export is atomic: everything is written into a temporary sibling of ``--out`` and renamed into place
at the end, so ``--out`` appears whole or not at all (an error, a full disk, a kill leave nothing but,
after a kill, a hidden ``.<name>.partial-*`` sibling). An existing ``--out`` is refused unless it is an
empty directory (replaced by the rename): an export never overwrites or merges into earlier files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import TrialState
from safetensors import SafetensorError

from harness.candidates import Candidate
from harness.cli import run_cli
from harness.latent import FOLDER as LATENT_FOLDER
from harness.models import load_bundle
from harness.schedule_files import SCHEDULE_FILE, schedule_folders, write_base
from harness.store import Store, optuna_storage, validate_storage_url
from search_spaces import save_static


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness.export", description=__doc__.splitlines()[0])
    p.add_argument("--storage", required=True, help="store URL or SQLite file the search wrote")
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--trial", type=int, required=True, help="trial number to export")
    p.add_argument("--out", required=True, help="output directory (must not exist, or be empty)")
    p.add_argument("--checkpoint", default=None, help="base supernet (default: the one the study used)")
    p.add_argument("--ssr-checkpoint", default=None, help="SSR supernet (default: the one the study used)")
    return p


def measured_with(url: str, study: str, trial: int) -> dict | None:
    """The model files (``{"base": {"sha256": ...}, "ssr": {...}}``) the store says trial ``trial`` of
    ``study`` was measured with, from its trial link; ``None`` for a trial without one."""
    from sqlalchemy import select

    from harness.store._models import CandidateModel, SupernetModel, TrialLinkModel

    with Store.open_existing(url) as store, store.session() as session:
        row = session.execute(
            select(SupernetModel.metadata_json)
            .join(CandidateModel, CandidateModel.supernet_id == SupernetModel.id)
            .join(TrialLinkModel, TrialLinkModel.candidate_id == CandidateModel.id)
            .where(TrialLinkModel.study_name == study, TrialLinkModel.trial_number == trial)
        ).first()
    return json.loads(row[0]) if row else None


def check_out(out: Path) -> None:
    """Raise a one-line ``ValueError`` unless ``out`` can receive the export (nothing is created)."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise ValueError(f"--out {out} is an existing file; give a directory path that does not exist")
        if any(out.iterdir()):
            raise ValueError(
                f"--out {out} already exists and is not empty; remove it or give a new directory"
            )
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"cannot create --out {out}: {ancestor} is not a directory; give another --out")


def _make_parents(directory: Path) -> list[Path]:
    """Create the missing ancestors of ``directory``; returns them, deepest first (to remove on failure)."""
    missing = []
    for parent in directory.parents:
        if parent.exists():
            break
        missing.append(parent)
    for parent in reversed(missing):
        parent.mkdir()
    return missing


def write_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a fresh temporary sibling of ``out``, then rename it to ``out``.

    On any failure the temporary directory and the parents created for it are removed, and an I/O
    error (a full disk, a file-size limit, permissions) becomes a one-line ``ValueError``.
    """
    created = _make_parents(out)
    tmp = None
    try:
        # A sibling, so the final rename stays on one filesystem (rename is atomic only there).
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide the export from other users
        os.replace(tmp, out)  # onto nothing or an empty directory: atomic
        tmp = None
    except (OSError, SafetensorError) as error:  # safetensors reports its I/O errors as its own type
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
        raise ValueError(
            f"cannot write the export to {out}: {reason}; nothing was written "
            "(free space or permissions, or give another --out)"
        ) from error
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            for parent in created:  # deepest first; only the ones this export made, and only if empty
                try:
                    parent.rmdir()
                except OSError:
                    break


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    check_out(out)  # before the store is read: a bad --out costs nothing
    url = validate_storage_url(args.storage)
    Store.open_existing(url).close()  # a mistyped --storage fails here and creates nothing
    try:
        study = optuna.load_study(study_name=args.study, storage=optuna_storage(url, create=False))
    except KeyError:
        raise ValueError(f"no study named '{args.study}' in the store") from None
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    trial = trials.get(args.trial)
    if trial is None or trial.state != TrialState.COMPLETE or "candidate" not in trial.user_attrs:
        raise ValueError(f"trial {args.trial} of '{args.study}' is not a completed, measured trial")
    cand = Candidate.from_json(trial.user_attrs["candidate"])
    # Everything is loaded before anything is written: a bad checkpoint fails with nothing on disk.
    base_path = args.checkpoint or study.user_attrs["checkpoint"]
    base = load_bundle(base_path)
    ssr, ssr_path = None, None
    if cand.ssr is not None:
        ssr_path = args.ssr_checkpoint or study.user_attrs["ssr_checkpoint"]
        ssr = load_bundle(ssr_path)
    measured = measured_with(url, args.study, args.trial)
    for role, bundle, path in (("base", base, base_path), ("ssr", ssr, ssr_path)):
        want = (measured or {}).get(role, {}).get("sha256")
        if bundle is not None and want is not None and bundle.checkpoint_hash != want:
            raise ValueError(
                f"{path} is not the {role} checkpoint trial {args.trial} was measured with (sha256 "
                f"{want[:12]}... in the store, {bundle.checkpoint_hash[:12]}... on disk); restore that "
                f"file or pass --{'ssr-' if role == 'ssr' else ''}checkpoint with it"
            )
    names = ["base", *([LATENT_FOLDER] if base.codec is not None else []), *(["ssr"] if ssr else [])]
    record = {
        "candidate": cand.to_dict(),
        "study": args.study,
        "trial": args.trial,
        "values": trial.values,
        "metrics": trial.user_attrs.get("metrics", {}),
    }
    if cand.steps is not None:  # the step count it was measured at: harness.sample runs it by default
        record["steps"] = cand.steps
    if cand.is_schedule:
        for seg in cand.segments:  # before writing: a subnet off this supernet fails with nothing on disk
            base.supernet.space.validate(seg.subnet)
        names = [*dict.fromkeys(schedule_folders(cand)), SCHEDULE_FILE, *names[1:]]

    def write(directory: Path) -> None:
        write_base(directory, base, cand)
        if base.codec is not None:  # a latent subnet runs with its autoencoder: found beside it by sample
            base.codec.save(directory / LATENT_FOLDER)
        if ssr is not None:
            save_static(ssr.supernet.extract(cand.ssr), directory / "ssr", extra=ssr.provenance())
        (directory / "candidate.json").write_text(json.dumps(record, indent=1))

    write_atomically(out, write)
    print(
        f"exported trial {args.trial} ({trial.user_attrs.get('description', '')}) to "
        f"{', '.join(str(out / name) for name in names)}"
    )


if __name__ == "__main__":
    run_cli(main)
