"""The CORE eval bundle: find a local copy, or download and unpack the reference's `eval_bundle.zip`.

A bundle is a folder with `core.yaml` (the tasks), `eval_meta_data.csv` (their random baselines) and
`eval_data/<dataset_uri>` (the task files), as the reference lays it out. Nothing is downloaded
while evaluating: the `eval_bundle` stage fetches it once, explicitly.
"""

import os
import shutil
import zipfile

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
# The archive's sha256 as several independent projects recorded it when downloading it (2026); it
# agrees with the sha256 of its core.yaml and eval_meta_data.csv in ../shared/data/core.
EVAL_BUNDLE_SHA256 = "90a7c19e28ee7a52b4f6e1f87658deb9fde7f63deba2379045bdb1fe9ea5d200"
DEFAULT_BUNDLE_DIR = os.path.join("~", ".cache", "nanochat_jax", "eval_bundle")
REQUIRED = ("core.yaml", "eval_meta_data.csv", "eval_data")


class BundleError(RuntimeError):
    pass


def find_bundle(path: str | None) -> str:
    """The bundle folder to use (`path`, else the default download location), or a BundleError
    telling the user how to get one."""
    folder = os.path.expanduser(path or DEFAULT_BUNDLE_DIR)
    absent = [name for name in REQUIRED if not os.path.exists(os.path.join(folder, name))]
    if absent:
        where = f"{folder} lacks {', '.join(absent)}" if os.path.isdir(folder) else f"no eval bundle at {folder}"
        raise BundleError(f"{where}. Download the reference's bundle once with "
                          f"`python -m launch.stage eval_bundle`, or point --eval-bundle at a copy laid out like it "
                          f"(core.yaml, eval_meta_data.csv, eval_data/), e.g. ../shared/data/core")
    return folder


def download_bundle(dest: str | None = None, url: str = EVAL_BUNDLE_URL, sha256: str | None = EVAL_BUNDLE_SHA256,
                    attempts: int = 5, backoff_s: float = 2.0, timeout_s: float = 60.0) -> str:
    """Fetch the zip (resuming after interruptions), check its sha256 (None: skip the check, for a
    mirror whose archive differs), unpack it and move the bundle into `dest` in one rename."""
    from nanochat_jax import data  # the project's resumable HTTP fetch and file checksum

    dest = os.path.expanduser(dest or DEFAULT_BUNDLE_DIR)
    if os.path.exists(dest):
        raise BundleError(f"{dest} already exists; remove it first to download again")
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".zip.part"
    try:
        data.fetch_with_retries(url, part, attempts=attempts, backoff_s=backoff_s, timeout_s=timeout_s)
    except data.DownloadError as e:
        raise BundleError(f"download of {url}: {e}") from None
    got = data.sha256_of(part)
    if sha256 is not None and got != sha256:
        os.remove(part)  # a wrong archive cannot be resumed into a right one
        raise BundleError(f"{url}: sha256 {got} is not the expected {sha256}; the archive was removed")
    _unpack(part, dest)
    os.remove(part)
    return dest


def _unpack(zip_path: str, dest: str) -> None:
    staging = dest + ".unpacking"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(staging)  # zipfile drops absolute paths and '..' from member names
    except zipfile.BadZipFile as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise BundleError(f"{zip_path} is not a zip archive ({e})") from None
    # The reference's archive holds one top folder, eval_bundle/; accept a flat archive too.
    root = os.path.join(staging, "eval_bundle") if os.path.isdir(os.path.join(staging, "eval_bundle")) else staging
    try:
        find_bundle(root)
    except BundleError:
        shutil.rmtree(staging, ignore_errors=True)
        raise BundleError(f"the archive holds no eval bundle (needs {', '.join(REQUIRED)})") from None
    os.replace(root, dest)
    shutil.rmtree(staging, ignore_errors=True)
