"""``python -m harness.export``: write a searched subnet as a standalone model that ``harness.sample`` runs.

    python -m harness.export --storage results/harness.db --study NAME --trial 12 --out exported/
    python -m harness.sample --checkpoint exported/base --prompt "a small blue circle moving up"

A chain candidate also gets ``<out>/ssr`` (pass it as ``--ssr-checkpoint``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import optuna
from optuna.trial import TrialState

from harness.candidates import Candidate
from harness.cli import run_cli
from harness.latent import FOLDER as LATENT_FOLDER
from harness.models import load_bundle
from harness.store import optuna_storage, validate_storage_url
from search_spaces import save_static


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness.export", description=__doc__.splitlines()[0])
    p.add_argument("--storage", required=True, help="store URL or SQLite file the search wrote")
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--trial", type=int, required=True, help="trial number to export")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--checkpoint", default=None, help="base supernet (default: the one the study used)")
    p.add_argument("--ssr-checkpoint", default=None, help="SSR supernet (default: the one the study used)")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    url = validate_storage_url(args.storage)
    try:
        study = optuna.load_study(study_name=args.study, storage=optuna_storage(url))
    except KeyError:
        raise ValueError(f"no study named '{args.study}' in the store") from None
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    trial = trials.get(args.trial)
    if trial is None or trial.state != TrialState.COMPLETE or "candidate" not in trial.user_attrs:
        raise ValueError(f"trial {args.trial} of '{args.study}' is not a completed, measured trial")
    cand = Candidate.from_json(trial.user_attrs["candidate"])
    base = load_bundle(args.checkpoint or study.user_attrs["checkpoint"])
    out = Path(args.out)
    save_static(base.supernet.extract(cand.base), out / "base", extra=base.provenance())
    written = [out / "base"]
    if base.codec is not None:  # a latent subnet runs with its autoencoder: found beside it by harness.sample
        base.codec.save(out / LATENT_FOLDER)
        written.append(out / LATENT_FOLDER)
    if cand.ssr is not None:
        ssr = load_bundle(args.ssr_checkpoint or study.user_attrs["ssr_checkpoint"])
        save_static(ssr.supernet.extract(cand.ssr), out / "ssr", extra=ssr.provenance())
        written.append(out / "ssr")
    (out / "candidate.json").write_text(
        json.dumps(
            {
                "candidate": cand.to_dict(),
                "study": args.study,
                "trial": args.trial,
                "values": trial.values,
                "metrics": trial.user_attrs.get("metrics", {}),
            },
            indent=1,
        )
    )
    print(
        f"exported trial {args.trial} ({trial.user_attrs.get('description', '')}) to "
        f"{', '.join(str(w) for w in written)}"
    )


if __name__ == "__main__":
    run_cli(main)
