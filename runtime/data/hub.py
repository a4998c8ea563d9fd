"""Reach the Hugging Face Hub for an hf:// model (or dataset), or find out quickly that it cannot be reached.

Left to itself, huggingface_hub retries a request that gets no answer five times, up to 8 s
apart, for every file of a model, before it looks in its cache: without egress a model of four
files takes about 95 s to fail, with a message that says nothing of the hub's address. Here one
request tells whether the hub answers (tried `HUB_ATTEMPTS` times, each retry logged). When it
does not, the model loads from the cache alone, or fails at once with a ModelUnavailableError that
names the hub. The hub's address, offline mode and the cache come from huggingface_hub's own
variables (HF_ENDPOINT, HF_HUB_OFFLINE, HF_HUB_CACHE or HF_HOME), which kubetune's pods get from
`spec.storage.huggingFace` and the runtime image. Datasets (hf://datasets/) take the same path in
`hub_datasets`.
"""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.client import HTTPException

from kubetune.runtime.contract.report import Unavailable
from kubetune.runtime.io.errors import ModelUnavailableError

LOGGER = logging.getLogger(__name__)
# Attempts of the reachability request, and the waits between them: a few seconds in all, so a hub
# that is down fails the run fast and the operator retries the run within backoffLimit.
HUB_ATTEMPTS = 3
HUB_RETRY_WAITS_S = (1.0, 2.0)
# Longest wait for the hub's answer to one request (HF_HUB_ETAG_TIMEOUT, if lower, wins).
HUB_TIMEOUT_S = 10.0
# Every model repository has it; the hub's answer for it says the hub is there.
PROBE_FILE = "config.json"
# Answers that mean the hub is there but cannot serve now.
UNAVAILABLE_STATUS = frozenset({408, 429})


@dataclass(frozen=True)
class HubSetup:
    """How this process reaches the hub, as huggingface_hub read it from the environment."""

    endpoint: str
    offline: bool
    cache: str


def hub_setup() -> HubSetup:
    from huggingface_hub import constants

    return HubSetup(constants.ENDPOINT, constants.is_offline_mode(), constants.HF_HUB_CACHE)


def is_cached(repo_id: str, revision: str | None) -> bool:
    """Whether the Hugging Face cache holds the repository at `revision` (its config file, at least)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, PROBE_FILE, revision=revision), str)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # a redirect is an answer: the hub is there


def unreachable_reason(url: str, timeout_s: float) -> str | None:
    """None when a HEAD request to `url` gets an answer other than a server error; else what went wrong.

    Any answer below 500 (a redirect, 401 for a private repository, 404 for a missing one) means the
    hub is there: loading the model then says precisely what is wrong. No credentials are sent.
    """
    opener = urllib.request.build_opener(_NoRedirects)
    try:
        with opener.open(urllib.request.Request(url, method="HEAD"), timeout=timeout_s):
            return None
    except urllib.error.HTTPError as error:
        if error.code >= 500 or error.code in UNAVAILABLE_STATUS:
            return f"HTTP {error.code} {error.reason}"
        return None
    except urllib.error.URLError as error:
        return str(error.reason)
    except (OSError, HTTPException) as error:  # timeouts, resets, malformed answers
        return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def hub_unreachable(
    repo_id: str,
    revision: str | None,
    setup: HubSetup,
    *,
    repo_type: str = "model",
    probe_file: str = PROBE_FILE,
    attempts: int = HUB_ATTEMPTS,
    waits_s: tuple[float, ...] = HUB_RETRY_WAITS_S,
    sleep: Callable[[float], None] = time.sleep,
) -> str | None:
    """None as soon as the hub answers for the repository; after `attempts` without an answer, the last reason.

    `repo_type` is huggingface_hub's ("model" or "dataset"); `probe_file` a file such a repository usually has.
    """
    from huggingface_hub import constants, hf_hub_url

    url = hf_hub_url(repo_id, probe_file, repo_type=repo_type, revision=revision, endpoint=setup.endpoint)
    timeout = min(HUB_TIMEOUT_S, float(constants.HF_HUB_ETAG_TIMEOUT))
    reason: str | None = None
    for attempt in range(1, attempts + 1):
        reason = unreachable_reason(url, timeout)
        if reason is None:
            return None
        if attempt < attempts:
            wait = waits_s[min(attempt - 1, len(waits_s) - 1)] if waits_s else 0.0
            LOGGER.warning(
                "%s hub %s did not answer for %s (attempt %d of %d: %s); retrying in %.0f s",
                repo_type,
                setup.endpoint,
                repo_id,
                attempt,
                attempts,
                reason,
                wait,
            )
            sleep(wait)
    return reason


def offline_message(uri: str, setup: HubSetup) -> str:
    return (
        f"{uri} is not in the Hugging Face cache at {setup.cache}, and offline mode (HF_HUB_OFFLINE) never "
        "asks a hub: put the model into the runtime image's cache (HF_HUB_CACHE, outside /home/ray/.cache), "
        "use an s3:// or pvc:// copy, or let the run reach a hub or mirror (spec.storage.huggingFace)"
    )


def unreachable_message(uri: str, setup: HubSetup, reason: str, what: str = "model") -> str:
    """Why a `what` (model or dataset) the cache does not hold cannot be had now: the run is retried."""
    return (
        f"cannot reach the {what} hub at {setup.endpoint} for {uri} ({reason}), and the Hugging Face cache at "
        f"{setup.cache} does not hold it: check the cluster's egress or set spec.storage.huggingFace.endpoint "
        "to a mirror; the run is retried within backoffLimit"
    )


def local_files_only(repo_id: str, revision: str | None, uri: str) -> bool:
    """Whether `from_pretrained` must keep to the cache; ModelUnavailableError when the model is nowhere.

    Offline, or with a hub that does not answer, a cached model loads from the cache alone (no request,
    so no retries); one that is not cached fails now, naming the hub or offline mode.
    """
    setup = hub_setup()
    if setup.offline:
        if not is_cached(repo_id, revision):
            raise ModelUnavailableError(Unavailable.MODEL_HUB, "model.uri", offline_message(uri, setup))
        return True
    reason = hub_unreachable(repo_id, revision, setup)
    if reason is None:
        return False
    if is_cached(repo_id, revision):
        LOGGER.warning("model hub %s did not answer (%s): loading %s from the cache", setup.endpoint, reason, uri)
        return True
    raise ModelUnavailableError(Unavailable.MODEL_HUB, "model.uri", unreachable_message(uri, setup, reason))


def is_unavailable(error: BaseException) -> bool:
    """Whether a failed `from_pretrained` of a hub model failed for want of the hub, not for a wrong name.

    A repository, revision or file the hub does not have, or a gated one, stays an invalid spec.
    """
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    # huggingface_hub's HTTP client, under the name it keeps exporting across its major versions.
    from huggingface_hub.utils import httpx  # type: ignore[attr-defined]

    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (LocalEntryNotFoundError, httpx.TransportError)):
            return True  # no answer, and the files are not in the cache
        if isinstance(current, HfHubHTTPError) and not isinstance(current, EntryNotFoundError):
            status = current.response.status_code
            return status >= 500 or status in UNAVAILABLE_STATUS
        current = current.__cause__ or current.__context__
    return False
