"""Fetch one archive over HTTP(S): resumable (Range), retried, md5-verified.

The bytes go to `<dest>.part` and the file only appears under its final name once its md5 is
the expected one, so a file at `dest` is always a complete, verified archive. An interrupted
transfer keeps its `.part` and the next attempt (or the next run) asks for the remaining bytes.
"""

import http.client
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..files import file_digest
from .errors import ChecksumError, DownloadError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
PROGRESS_EVERY = 32 << 20  # bytes between progress log lines


def fetch(
    url: str,
    dest: Path,
    md5: str,
    *,
    retries: int = 5,
    backoff_s: float = 2.0,
    timeout_s: float = 60.0,
) -> Path:
    """Make `dest` a verified copy of `url`; returns `dest`. Does nothing if it already is."""
    dest = Path(dest)
    if dest.exists():
        if file_digest(dest, "md5") == md5:
            return dest
        log.warning("%s exists but its md5 is wrong; downloading it again", dest)
        dest.unlink()
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, retries + 1):
        try:
            _transfer(url, part, timeout_s)
            break
        except (OSError, http.client.HTTPException, _Incomplete) as exc:
            if (
                isinstance(exc, urllib.error.HTTPError)
                and 400 <= exc.code < 500
                and exc.code not in (408, 416, 429)
            ):
                raise DownloadError(f"GET {url} failed: HTTP {exc.code} {exc.reason}") from exc
            if attempt == retries:
                raise DownloadError(
                    f"GET {url} failed after {retries} attempts: {exc}; "
                    f"the partial file {part} is kept and a re-run "
                    f"resumes it"
                ) from exc
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning(
                "download attempt %d/%d of %s failed (%s); retrying in %.1fs",
                attempt,
                retries,
                url,
                exc,
                delay,
            )
            time.sleep(delay)
    actual = file_digest(part, "md5")
    if actual != md5:
        part.unlink()  # a wrong file must not be resumed; the next run starts afresh
        raise ChecksumError(
            f"{url}: md5 {actual} != expected {md5}; the download is corrupt "
            f"or the mirror serves a different file (deleted it)"
        )
    os.replace(part, dest)
    return dest


class _Incomplete(Exception):
    """The server closed the connection before sending the announced length."""


def _transfer(url: str, part: Path, timeout_s: float) -> None:
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "vsgd-repro"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            return  # nothing left to fetch: the md5 check decides whether the file is right
        raise
    with response:
        resumed = have and response.status == 206
        if have and not resumed:
            log.info("server ignored the Range request; downloading %s from the start", url)
            have = 0
        expected = response.headers.get("Content-Length")
        expected = int(expected) if expected is not None else None
        received = 0
        log.info(
            "downloading %s (%s bytes%s)",
            url,
            expected if expected is not None else "?",
            f", resuming at {have}" if resumed else "",
        )
        with open(part, "ab" if resumed else "wb") as f:
            for block in iter(lambda: response.read(CHUNK), b""):
                f.write(block)
                received += len(block)
                if received % PROGRESS_EVERY < len(block):
                    log.info("... %d MiB", (have + received) >> 20)
    if expected is not None and received < expected:
        raise _Incomplete(f"got {received} of {expected} bytes")
