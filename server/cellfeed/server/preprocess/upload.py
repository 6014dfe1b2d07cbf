"""Upload a finished dataset to the Hugging Face hub: one dataset repo per dataset, as the seed did.

Repo `<repo_id>-<dataset>`, files at data/<dataset>/{train,test}/chunks/<chunk> (or
data/<dataset>/chunks/), files already there skipped, everything in one commit. The token goes to
this client only (no global login).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi

from cellfeed.server.errors import CellfeedError
from cellfeed.server.preprocess.chunks import chunk_files
from cellfeed.server.preprocess.folders import chunk_dirs


def repo_name(repo_id: str, dataset: str) -> str:
    return f"{repo_id}-{dataset}"


def operations(folder: Path, dataset: str, existing: set[str], readme: Path | None = None) -> list[CommitOperationAdd]:
    """The additions one commit needs: every chunk not yet in the repo, plus README.md if given."""
    splits = chunk_dirs(folder)
    if not splits:
        raise CellfeedError(f"nothing to upload: {str(folder)!r} has no chunks folder (run the pipeline first)")
    ops = []
    for split, chunks in splits.items():
        prefix = f"data/{dataset}/chunks" if split == "all" else f"data/{dataset}/{split}/chunks"
        for chunk in chunk_files(chunks):
            target = f"{prefix}/{chunk.name}"
            if target not in existing:
                ops.append(CommitOperationAdd(path_in_repo=target, path_or_fileobj=str(chunk)))
    if readme is not None:
        ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(readme)))
    return ops


def upload_dataset(
    folder: Path, dataset: str, repo_id: str, token: str, *, readme: Path | None = None, api: Any = None
) -> tuple[str, list[str]]:
    """Create the repo if needed and commit the missing files; returns (repo, paths added)."""
    api = api if api is not None else HfApi(token=token)
    repo = repo_name(repo_id, dataset)
    api.create_repo(repo, repo_type="dataset", private=False, exist_ok=True)
    existing = set(api.list_repo_files(repo, repo_type="dataset"))
    ops = operations(folder, dataset, existing, readme)
    if ops:
        api.create_commit(repo, operations=ops, commit_message=f"Upload {len(ops)} data files", repo_type="dataset")
    return repo, [op.path_in_repo for op in ops]
