"""Pretraining text: shard download, parquet/jsonl sources, and Grain pipelines that pack tokens.

A *source* is a folder of `.parquet` files (a `text` column) and/or `.jsonl[.gz]` files (a `text`
field per line). The last file in name order is the validation split, unless the folder's
`dataset.json` (written by `download`) names it: then a partial download can never promote a
training shard to validation. With no folder given, the small Wikipedia corpus shipped in
`nanochat_jax/corpus/` is used, so everything runs on a fresh machine without a download.

The pipeline (`pretrain_dataset`, `conversation_dataset`) reproduces the reference's BOS-aligned
best-fit packing: every row of seq_len+1 tokens starts at a document's BOS; the largest buffered
document that fits goes in next; only when none fits is the shortest one cropped to fill the row
(pretraining) or the row padded and masked (conversations, where nothing may be cut). Its iterator
state is a small JSON-able dict: the next chunk to read and the (chunk, document) address of every
buffered document, so a restored iterator re-reads those documents and continues bit-identically.
"""

import collections
import concurrent.futures
import dataclasses
import gzip
import hashlib
import http.client
import json
import os
import time
import urllib.error
import urllib.request

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

BUILTIN_CORPUS = os.path.join(os.path.dirname(__file__), "corpus", "wikipedia_en_2015")
MANIFEST = "dataset.json"


# ---- the reference's hosted shards ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Remote:
    base_url: str
    last_shard: int  # the highest index; that shard is the validation split

    def shard_name(self, index: int) -> str:
        return f"shard_{index:05d}.parquet"


DATASETS = {
    # nanochat's current default (since March 2026): NVIDIA ClimbMix, repackaged and shuffled
    "climbmix": Remote("https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main", 6542),
    # nanochat's original dataset: FineWeb-Edu 100B, repackaged and shuffled
    "fineweb-edu": Remote("https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main", 1822),
}


class DownloadError(RuntimeError):
    pass


def download(dest: str, remote: Remote, num_train: int = -1, workers: int = 4, attempts: int = 5,
             backoff_s: float = 2.0, timeout_s: float = 60.0, progress: bool = True) -> list[str]:
    """Fetch the first `num_train` training shards (-1: all) plus the validation shard into `dest`.

    Each shard streams into `<name>.part`, resuming from its size with an HTTP Range request after
    an interruption; is checked against the server's length and read back as parquet with a `text`
    column; then renamed into place with a `<name>.sha256` beside it, so a later run re-verifies
    finished shards cheaply and fetches a corrupted one again. Raises DownloadError naming every
    shard that could not be fetched; shards that did arrive stay.
    """
    os.makedirs(dest, exist_ok=True)
    n = remote.last_shard if num_train < 0 else min(num_train, remote.last_shard)
    names = [remote.shard_name(i) for i in range(n)] + [remote.shard_name(remote.last_shard)]
    manifest = {"base_url": remote.base_url, "val_shard": names[-1]}
    _atomic_write(os.path.join(dest, MANIFEST), json.dumps(manifest, indent=1).encode())

    def one(name):
        return _download_shard(f"{remote.base_url}/{name}", os.path.join(dest, name), attempts,
                               backoff_s, timeout_s)

    failures = {}
    from tqdm import tqdm

    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=len(names), unit="shard", desc="download", disable=not progress) as bar:
        futures = {pool.submit(one, name): name for name in names}
        for fut in concurrent.futures.as_completed(futures):
            try:
                fut.result()
            except DownloadError as e:
                failures[futures[fut]] = str(e)
            bar.update(1)
    if failures:
        lines = "\n".join(f"  {k}: {v}" for k, v in sorted(failures.items()))
        raise DownloadError(f"{len(failures)} of {len(names)} shards failed:\n{lines}")
    return [os.path.join(dest, name) for name in names]


def _download_shard(url, path, attempts, backoff_s, timeout_s):
    if os.path.exists(path):
        problem = verify_shard(path)
        if problem is None:
            return
        print(f"{os.path.basename(path)}: {problem}; fetching it again")
        os.remove(path)
    part = path + ".part"
    fetch_with_retries(url, part, attempts=attempts, backoff_s=backoff_s, timeout_s=timeout_s, validate=_check_parquet)
    with open(part + ".sha256", "w") as f:
        f.write(sha256_of(part))
    os.replace(part + ".sha256", path + ".sha256")
    os.replace(part, path)


def fetch_with_retries(url: str, part: str, *, attempts: int, backoff_s: float, timeout_s: float, validate=None) -> None:
    """Downloads `url` into `part`, resuming what earlier attempts (or runs) left there, with
    exponential backoff between attempts. `validate(part)` returns a problem or None; a file with a
    problem is deleted (corrupt content cannot be resumed) and fetched again. Raises DownloadError
    at once for a 404 (retrying cannot help), else after the last attempt."""
    last = "no attempt"
    for attempt in range(attempts):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            _fetch_resuming(url, part, timeout_s)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise DownloadError(f"not on the server (HTTP 404): {url}") from None
            last = f"HTTP {e.code}"
            continue
        except (urllib.error.URLError, http.client.HTTPException, OSError, DownloadError) as e:
            last = str(e)  # connection dropped or short: the .part file keeps what arrived
            continue
        problem = validate(part) if validate else None
        if problem is None:
            return
        last = f"downloaded file is not valid ({problem})"
        os.remove(part)
    raise DownloadError(f"failed after {attempts} attempts, last: {last}")


def _fetch_resuming(url, part, timeout_s):
    have = os.path.getsize(part) if os.path.exists(part) else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout_s)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the .part is whole; the check decides
            return
        raise
    with resp:
        if have and resp.status != 206:
            have = 0  # the server ignored the Range header: it sends the whole file
        length = resp.headers.get("Content-Length")
        expected = have + int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as f:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
    got = os.path.getsize(part)
    if expected is not None and got != expected:
        raise DownloadError(f"connection ended at {got:,} of {expected:,} bytes")


def verify_shard(path: str) -> str | None:
    """None if the shard is intact, else what is wrong with it.

    A shard we downloaded has a checksum taken right after its full parquet check: comparing it is
    enough (and much faster than decoding again). Other shards get the full check.
    """
    side = path + ".sha256"
    if os.path.exists(side):
        with open(side) as f:
            return None if f.read().strip() == sha256_of(path) else "checksum mismatch (corrupted on disk)"
    return _check_parquet(path)


def _check_parquet(path):
    try:
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            return "no 'text' column"
        for rg in range(pf.num_row_groups):  # decode every page: catches corruption inside the file
            pf.read_row_group(rg, columns=["text"])
    except (pa.ArrowException, OSError) as e:
        return f"unreadable parquet: {e}"
    return None


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path, data: bytes):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# ---- sources ----------------------------------------------------------------------------------

def source_files(source: str | None = None, split: str = "train") -> list[str]:
    """The files of one split of a source folder (None: the built-in corpus)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    folder = BUILTIN_CORPUS if source is None else source
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"data source {folder!r} is not a folder")
    files = sorted(f for f in os.listdir(folder) if f.endswith((".parquet", ".jsonl", ".jsonl.gz")))
    manifest = os.path.join(folder, MANIFEST)
    if os.path.exists(manifest):
        with open(manifest) as f:
            val = json.load(f)["val_shard"]
        if val not in files:
            raise FileNotFoundError(f"{folder}: the validation shard {val} is missing; run the "
                                    f"download again")
    elif len(files) >= 2:
        val = files[-1]
    else:
        raise FileNotFoundError(f"{folder}: need at least 2 .parquet/.jsonl[.gz] files (the last one "
                                f"is the validation split), found {len(files)}")
    picked = [f for f in files if (f == val) == (split == "val")]
    if not picked:
        raise FileNotFoundError(f"{folder}: no {split} files")
    return [os.path.join(folder, f) for f in picked]


def text_units(files: list[str]) -> list[tuple[str, int]]:
    """Reading units: (parquet file, row group) or (jsonl file, -1) for a whole jsonl file.

    Units are what gets shuffled and dealt out to processes, so big corpora should be parquet with
    modest row groups (`make_shards` writes them).
    """
    units = []
    for path in files:
        if path.endswith(".parquet"):
            units.extend((path, rg) for rg in range(pq.ParquetFile(path).num_row_groups))
        else:
            units.append((path, -1))
    return units


def read_unit(unit: tuple[str, int]) -> list[str]:
    path, rg = unit
    if rg < 0:
        return list(iter_jsonl_texts(path))
    return pq.ParquetFile(path).read_row_group(rg, columns=["text"]).column(0).to_pylist()


def iter_jsonl_texts(path: str, field: str = "text"):
    """The `field` of every line of a .jsonl or .jsonl.gz file, in file order."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                if field not in row:
                    raise ValueError(f"{path}:{n}: no {field!r} field")
                yield row[field]


def iter_texts(source: str | None = None, split: str = "train", max_chars: int | None = None,
               doc_cap: int | None = None):
    """Documents in file order, each cut to `doc_cap` chars, stopping once `max_chars` were given
    (tokenizer training, like the reference: the document that crosses the limit is included)."""
    total = 0
    for unit in text_units(source_files(source, split)):
        for text in read_unit(unit):
            text = text[:doc_cap] if doc_cap else text
            total += len(text)
            yield text
            if max_chars is not None and total > max_chars:
                return


# ---- bring your own corpus --------------------------------------------------------------------

def make_shards(inputs: list[str], out_dir: str, shard_chars: int = 250_000_000,
                row_group_docs: int = 1024, val_docs: int = 1000, text_field: str = "text",
                txt_mode: str = "file") -> list[str]:
    """Write .txt/.jsonl[.gz]/.parquet documents as parquet shards `shard_00000.parquet`, ...

    The last `val_docs` documents become the final shard, the validation split. A `.txt` file is
    one document (`txt_mode="file"`), or one per blank-line-separated paragraph ("paragraph"), or
    one per line ("line").
    """
    if txt_mode not in ("file", "paragraph", "line"):
        raise ValueError(f"txt_mode must be file, paragraph or line, not {txt_mode!r}")
    if val_docs < 1:
        raise ValueError("val_docs must be at least 1")
    files = _input_files(inputs)  # fail on a bad path before creating anything
    os.makedirs(out_dir, exist_ok=True)
    held = collections.deque()  # the newest val_docs documents: they become validation at the end
    shard, shard_size, written = [], 0, []

    def flush(docs):
        path = os.path.join(out_dir, f"shard_{len(written):05d}.parquet")
        table = pa.table({"text": pa.array(docs, pa.string())})
        pq.write_table(table, path + ".tmp", row_group_size=row_group_docs, compression="zstd")
        os.replace(path + ".tmp", path)
        written.append(path)

    for doc in _iter_input_docs(files, text_field, txt_mode):
        held.append(doc)
        if len(held) > val_docs:
            doc = held.popleft()
            shard.append(doc)
            shard_size += len(doc)
            if shard_size >= shard_chars:
                flush(shard)
                shard, shard_size = [], 0
    if shard:
        flush(shard)
    if not written:
        raise ValueError(f"only {len(held)} non-empty documents in {inputs}: not enough for "
                         f"{val_docs} validation documents plus training data (lower val_docs)")
    flush(list(held))
    return written


def _input_files(inputs):
    files = []
    for p in inputs:
        if os.path.isdir(p):
            files.extend(os.path.join(p, f) for f in sorted(os.listdir(p)))
        elif os.path.exists(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return files


def _iter_input_docs(files, text_field, txt_mode):
    for path in files:
        if path.endswith((".jsonl", ".jsonl.gz")):
            docs = iter_jsonl_texts(path, text_field)
        elif path.endswith(".parquet"):
            docs = (t for rg in text_units([path]) for t in read_unit(rg))
        elif path.endswith((".txt", ".txt.gz")):
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                text = f.read()
            docs = {"file": [text], "line": text.splitlines(),
                    "paragraph": text.split("\n\n")}[txt_mode]
        else:
            continue  # stray files in an input folder (READMEs, licenses) are not documents
        yield from (d for d in docs if d.strip())


# ---- packing ----------------------------------------------------------------------------------

class _PackedRows(grain.IterDataset):
    """Batches of best-fit packed rows from `chunks`, a MapDataset whose element k is chunk k: a
    list of documents, each an int32 token array (starting with BOS) or a (tokens, mask) pair."""

    def __init__(self, chunks: grain.MapDataset, batch_size: int, seq_len: int, pad: bool,
                 bos_id: int, buffer_size: int, lookahead: int):
        super().__init__(chunks)
        self.chunks, self.batch_size, self.row_len = chunks, batch_size, seq_len + 1
        self.pad, self.bos_id, self.buffer_size, self.lookahead = pad, bos_id, buffer_size, lookahead

    def __iter__(self):
        return _PackedRowsIterator(self)


class _PackedRowsIterator(grain.DatasetIterator):
    def __init__(self, ds: _PackedRows):
        super().__init__()
        self.ds = ds
        self.pool = concurrent.futures.ThreadPoolExecutor(max(1, ds.lookahead))
        self._reset(0)

    def _reset(self, next_chunk):
        self.next_chunk = next_chunk
        self.pending = collections.deque()  # futures of chunks next_chunk, next_chunk+1, ...
        self.buffer = []  # [(chunk, doc) address, tokens, mask or None]

    def _take_chunk(self):
        # Keep `lookahead` chunks in flight: reading and tokenizing overlap with packing.
        while len(self.pending) < max(1, self.ds.lookahead):
            self.pending.append(self.pool.submit(self.ds.chunks.__getitem__,
                                                 self.next_chunk + len(self.pending)))
        docs = self.pending.popleft().result()
        for j, doc in enumerate(docs):
            self.buffer.append(((self.next_chunk, j), *_split_doc(doc)))
        self.next_chunk += 1

    def __next__(self):
        rows = np.empty((self.ds.batch_size, self.ds.row_len), np.int32)
        masks = np.ones((self.ds.batch_size, self.ds.row_len), np.int8)
        for r in range(self.ds.batch_size):
            self._fill_row(rows[r], masks[r])
        inputs, targets = np.ascontiguousarray(rows[:, :-1]), rows[:, 1:].copy()
        targets[masks[:, 1:] == 0] = -1
        return inputs, targets

    def _fill_row(self, row, mask):
        pos, cap = 0, self.ds.row_len
        while pos < cap:
            while len(self.buffer) < self.ds.buffer_size:
                self._take_chunk()
            room = cap - pos
            best, best_len = -1, 0
            for i, entry in enumerate(self.buffer):  # largest that fits; first one on ties
                n = len(entry[1])
                if best_len < n <= room:
                    best, best_len = i, n
            if best < 0 and self.ds.pad:
                row[pos:] = self.ds.bos_id  # nothing fits: pad, and mask the padding out
                mask[pos:] = 0
                return
            if best < 0:  # nothing fits: crop the shortest, wasting the least
                best = min(range(len(self.buffer)), key=lambda i: len(self.buffer[i][1]))
            _, tokens, doc_mask = self.buffer.pop(best)
            n = min(len(tokens), room)
            row[pos:pos + n] = tokens[:n]
            if doc_mask is not None:
                mask[pos:pos + n] = doc_mask[:n]
            pos += n

    def get_state(self):
        return {"next_chunk": self.next_chunk, "buffer": [list(e[0]) for e in self.buffer]}

    def set_state(self, state):
        for fut in self.pending:
            fut.cancel()
        self._reset(state["next_chunk"])
        needed = sorted({c for c, _ in state["buffer"]})
        loaded = dict(zip(needed, self.pool.map(self.ds.chunks.__getitem__, needed)))
        self.buffer = [((c, j), *_split_doc(loaded[c][j])) for c, j in state["buffer"]]


def _split_doc(doc):
    return doc if isinstance(doc, tuple) else (doc, None)


def _process_slice(ds: grain.MapDataset, process_index: int, process_count: int, what: str):
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    if len(ds) < process_count:
        raise ValueError(f"{len(ds)} {what} cannot be shared by {process_count} processes; "
                         f"use more, smaller units (e.g. `make_shards --row-group-docs`)")
    return ds[process_index::process_count]


def pretrain_batches(*args, **kwargs) -> grain.DatasetIterator:
    """An iterator over `pretrain_dataset(*args, **kwargs)`."""
    return iter(pretrain_dataset(*args, **kwargs))


def pretrain_dataset(tokenizer, batch_size: int, seq_len: int, source: str | None = None,
                     split: str = "train", seed: int = 0, process_index: int = 0,
                     process_count: int = 1, buffer_size: int = 1000, lookahead: int = 4,
                     prefetch: int = 2, tokenizer_threads: int = 2) -> grain.IterDataset:
    """Endless `(inputs_BT, targets_BT)` int32 batches of this process's slice of `source`.

    Training reshuffles the order of the reading units every epoch (a pure function of `seed` and
    the epoch); validation reads its split in file order, the same batches every time it is built.
    `get_state()`/`set_state()` of its iterator save and restore the exact position.
    A background thread keeps `prefetch` batches ready; a training loop wants at least one
    optimizer step's worth, or the device waits for tokenization between steps.
    """
    units = grain.MapDataset.source(text_units(source_files(source, split)))
    units = _process_slice(units, process_index, process_count, "reading units (row groups/files)")
    if split == "train":
        units = units.shuffle(seed=seed)
    bos = tokenizer.bos_token_id

    def tokenize(unit):
        ids = tokenizer.encode(read_unit(unit), prepend=bos, num_threads=tokenizer_threads)
        return [np.asarray(d, np.int32) for d in ids]

    chunks = units.repeat(None).map(tokenize)
    packed = _PackedRows(chunks, batch_size, seq_len, False, bos, buffer_size, lookahead)
    return grain.experimental.ThreadPrefetchIterDataset(packed, prefetch_buffer_size=prefetch)


def conversation_batches(*args, **kwargs) -> grain.DatasetIterator:
    """An iterator over `conversation_dataset(*args, **kwargs)`."""
    return iter(conversation_dataset(*args, **kwargs))


def conversation_dataset(conversations, tokenizer, batch_size: int, seq_len: int, seed: int | None = None,
                         process_index: int = 0, process_count: int = 1, buffer_size: int = 100,
                         lookahead: int = 4, prefetch: int = 2, supervise: str = "assistant") -> grain.IterDataset:
    """Endless `(inputs_BT, targets_BT)` batches of rendered conversations (a sequence or a
    MapDataset of conversation dicts), best-fit packed with padding: no token is ever cropped
    unless one conversation alone is longer than a row. Targets are -1 where the loss mask is 0
    (prompts, tool outputs, padding); `supervise="all"` trains on every token but the padding
    (mid-training). `seed=None` keeps the given order (a mixture already shuffled).
    `conversations_consumed(iterator.get_state())` counts the conversations this process has packed.
    """
    if supervise not in ("assistant", "all"):
        raise ValueError(f"supervise must be 'assistant' or 'all', not {supervise!r}")
    ds = conversations if isinstance(conversations, grain.MapDataset) else grain.MapDataset.source(conversations)
    ds = _process_slice(ds, process_index, process_count, "conversations")
    if seed is not None:
        ds = ds.shuffle(seed=seed)

    def render(conversation):
        ids, mask = tokenizer.render_conversation(conversation, max_tokens=seq_len + 1)
        mask = np.ones(len(ids), np.int8) if supervise == "all" else np.asarray(mask, np.int8)
        return [(np.asarray(ids, np.int32), mask)]

    chunks = ds.repeat(None).map(render)
    packed = _PackedRows(chunks, batch_size, seq_len, True, tokenizer.bos_token_id, buffer_size, lookahead)
    return grain.experimental.ThreadPrefetchIterDataset(packed, prefetch_buffer_size=prefetch)


def conversations_consumed(state: dict) -> int:
    """Conversations packed into rows so far, from a `conversation_batches` iterator state (one
    chunk per conversation; those still waiting in the best-fit buffer do not count)."""
    return state["next_chunk"] - len(state["buffer"])
