"""The hub: pushing a run's model/ (and adapter/) with its card, through huggingface_hub's own client."""

from __future__ import annotations

import sys
from pathlib import Path

from finetune.errors import FinetuneError

KEEP_REMOTE = {".gitattributes"}  # the hub's own file: which extensions are stored as large files


def _local_files(run_dir: Path) -> dict[str, Path]:
    """path in the repo -> local file: model/ at the root (so the repo loads like the folder), adapter/ under
    adapter/."""
    files = {}
    for folder, prefix in ((run_dir / "model", ""), (run_dir / "adapter", "adapter/")):
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            if path.is_file() and not any(part.startswith(".") for part in relative.parts):
                files[prefix + relative.as_posix()] = path
    return files


def _card_for_repo(card: Path, repo_id: str) -> bytes:
    """The card with its usage snippet loading the repo instead of the local folder (the local file is unchanged)."""
    from finetune.model_folder import for_hub

    return for_hub(card.read_text(encoding="utf-8"), repo_id).encode()


def _transport_errors() -> tuple[type[Exception], ...]:
    """Network failures as the installed huggingface_hub's HTTP client raises them (httpx2, httpx or requests)."""
    import importlib

    found = []
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _hub_failure(error: Exception, token: str | None) -> str:
    """One line for a hub failure, never with the token in it."""
    from huggingface_hub.errors import HfHubHTTPError

    status = getattr(getattr(error, "response", None), "status_code", None)
    first = (str(error).strip().splitlines() or [error.__class__.__name__])[0]
    if token:
        first = first.replace(token, "<token>")
    if isinstance(error, HfHubHTTPError) and status in (401, 403):
        hint = "the token is missing, invalid or has no write access to it; set HF_TOKEN or run `hf auth login`"
        return f"the hub refused the upload ({status}): {hint} ({first})"
    if isinstance(error, HfHubHTTPError) and status is not None:
        return f"the hub answered {status} ({first})"
    return f"cannot reach the hub ({error.__class__.__name__}: {first}); check the network, then push again"


class PushResult(str):
    """The commit's URL (what push_run returned before), with the repo's visibility on the hub after the push."""

    private: bool | None  # None: the hub's answer did not say


def _step(name: str, token: str | None, call):
    """One hub call; its failure (network, HTTP status, or an answer of a shape huggingface_hub cannot read) is one
    line naming the step."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

    try:
        return call()
    except HFValidationError as error:  # refused before any request: the repo id or revision is malformed
        raise FinetuneError(f"{name}: {(str(error).strip().splitlines() or [''])[0]}") from None
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError, *_transport_errors()) as error:
        raise FinetuneError(f"{name}: {_hub_failure(error, token)}") from None
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as error:  # the answer, not the request
        first = (str(error).strip().splitlines() or [""])[0]
        if token:
            first = first.replace(token, "<token>")
        raise FinetuneError(
            f"{name}: the hub's answer was not what huggingface_hub expects ({error.__class__.__name__}: {first}); "
            "is HF_ENDPOINT a Hugging Face hub? Nothing was changed locally; push again later"
        ) from None


def push_run(run_dir: Path, repo_id: str, private: bool, revision: str | None = None) -> PushResult:
    """Upload model/ (at the repo root) and adapter/ (when present) in one commit; returns the commit's URL.

    private: the visibility of a repo this push creates; an existing repo keeps its own (the result says which).
    The token comes from HF_TOKEN or the hub login, read by huggingface_hub itself; it is never written anywhere.
    A second push of the same files sends no data and makes no commit (the hub reports the files it already has),
    so a retry after a failure only uploads what is missing. Nothing in the run folder is changed.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token
    from huggingface_hub.utils import disable_progress_bars

    run_dir = Path(run_dir)
    model_dir = run_dir / "model"
    if not (model_dir / "config.json").is_file():
        raise FinetuneError(f"{run_dir}: no model/ folder with a config.json to push; is it a finished run folder?")
    if "/" not in repo_id:
        raise FinetuneError(f"--repo-id: '{repo_id}' should be owner/name, e.g. me/{run_dir.name}")
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise FinetuneError("HF_HUB_OFFLINE is set: pushing needs the network; unset it for this command")
    try:
        token = get_token()
    except Exception as error:  # noqa: BLE001 — an opted-in OIDC exchange that failed raises instead of guessing
        first = str(error).splitlines()[0] if str(error) else ""
        raise FinetuneError(f"hub token: {error.__class__.__name__}: {first}") from None
    if token is None:
        raise FinetuneError(
            "no hub token: set HF_TOKEN to a write token or run `hf auth login`; the run is kept as it is"
        )
    files = _local_files(run_dir)
    if not sys.stderr.isatty():
        disable_progress_bars()  # byte-level bars help at a terminal, not in logs
    api = HfApi()
    where = f"push to {repo_id}"
    _step(f"{where}: create the repo", token, lambda: api.create_repo(repo_id, private=private, exist_ok=True))
    details = _step(f"{where}: read the repo's visibility", token, lambda: api.repo_info(repo_id, revision="main"))
    is_private = getattr(details, "private", None)
    if private and is_private is False:  # an existing public repo: never publish what the user asked to keep private
        raise FinetuneError(
            f"{where}: the repo exists and is public, but the push asks for a private repo (hub.private: true); "
            "pass --public to push to it anyway, or make it private on the hub first"
        )
    if revision is not None:
        _step(f"{where}: create branch {revision}", token,
              lambda: api.create_branch(repo_id, branch=revision, exist_ok=True))
    remote = set(_step(f"{where}: list the repo's files", token,
                       lambda: list(api.list_repo_files(repo_id, revision=revision))))
    operations = [
        CommitOperationAdd(
            path_in_repo=name,
            path_or_fileobj=_card_for_repo(path, repo_id) if name == "README.md" else str(path),
        )
        for name, path in files.items()
    ]
    # files of an earlier push that this model does not have (a kit-format finetune.json, say) would change how
    # the repo loads: they go in the same commit
    operations += [CommitOperationDelete(path_in_repo=name) for name in sorted(remote - set(files) - KEEP_REMOTE)]
    info = _step(f"{where}: commit", token, lambda: api.create_commit(
        repo_id, operations, commit_message=f"finetune: {run_dir.name}", revision=revision,
    ))
    result = PushResult(_step(f"{where}: commit", token, lambda: str(info.commit_url)))
    result.private = is_private
    return result
