"""Checking a model argument before any weights load: a local directory, a packaged model or `.gguf` file
(`route.models.pretrained`), or a Hub id looked up once (`check_model_path`)."""

from __future__ import annotations

import functools
from pathlib import Path

from route.models.pretrained import check_source, handles
from route.utils.errors import UsageError, looks_local


def check_model_path(flag: str, path: str | None, hub: bool = False) -> None:
    """A model argument must name something that exists, checked before any weights load. A short name of a
    packaged model or a `.gguf` file: `route.models.pretrained.check_source` (the packages are installed, the file is a
    complete causal LM; no conversion). A local-looking path (`looks_local`) must be a directory (no network). With
    `hub` (command lines, just before loading), a Hub id (`org/name`) that is neither in the Hub cache nor wanted
    offline (HF_HUB_OFFLINE) is looked up once, without the loader's retries, so that a typo or an unreachable Hub is
    one line naming `flag` instead of a minute of retries; a gated or private model, or any other answer, is left to
    the loader."""
    if path is None:
        return
    path = str(path)

    if handles(path):  # a short name (`smollm2-135m-instruct`) or a .gguf file: packages and file, no conversion
        check_source(flag, path)
        return
    if looks_local(path):
        if not Path(path).expanduser().is_dir():
            raise UsageError(f"{flag}: no such directory: {path} (a local checkpoint directory, or a Hub id org/name)")
        return
    if hub:
        _check_hub_model(flag, path)


@functools.lru_cache(maxsize=64)
def _check_hub_model(flag: str, repo_id: str) -> None:
    import httpx
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE or huggingface_hub.try_to_load_from_cache(repo_id, "config.json"):
        return
    try:
        huggingface_hub.model_info(repo_id, timeout=10)
    except GatedRepoError:
        return
    except RepositoryNotFoundError:
        raise UsageError(
            f"{flag}: {repo_id}: no such local directory, nor a model on the Hub (a private one needs HF_TOKEN)"
        ) from None
    except httpx.TransportError:  # no answer: DNS, connection refused, timeout
        raise UsageError(
            f"{flag}: {repo_id} is not a local directory, and the Hub cannot be reached to look it up; give a local "
            "checkpoint directory, or set HF_HUB_OFFLINE=1 to use the Hub cache"
        ) from None
    except Exception:  # any other answer is the loader's to report
        return


__all__ = ["check_model_path"]
