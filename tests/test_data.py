import base64
import hashlib
import http.server
import json
import os
import threading
from pathlib import Path

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from launch import data_cli
from launch import tok as tok_cli
from nanochat_jax import data
from nanochat_jax.tokenizer import Tokenizer

GOLDEN_TOK = os.path.join(os.path.dirname(__file__), "golden", "tokenizer_a.json")
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu", "nu", "xi", "omicron", "pi"]


@pytest.fixture(scope="module")
def tok():
    with open(GOLDEN_TOK) as f:
        g = json.load(f)
    return Tokenizer.from_ranks({base64.b64decode(k): v for k, v in g["mergeable_ranks_b64"].items()},
                                g["pattern"], g["special_tokens"])


def _docs(n, seed):
    rng = np.random.default_rng(seed)
    return [f"document {seed * 10_000 + i}: " + " ".join(rng.choice(WORDS, rng.integers(5, 120)))
            for i in range(n)]


def _write_shard(path, docs, row_group=4):
    pq.write_table(pa.table({"text": docs}), path, row_group_size=row_group)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """3 train shards + 1 val shard of short numbered documents, 4 per row group."""
    d = tmp_path_factory.mktemp("corpus")
    for s in range(4):
        _write_shard(d / f"shard_{s:05d}.parquet", _docs(40, s))
    return str(d)


def _segments(row, bos):
    starts = list(np.flatnonzero(row == bos)) + [len(row)]
    return [row[a:b] for a, b in zip(starts[:-1], starts[1:])]


# ---- packing ----------------------------------------------------------------------------------

def test_pretrain_batches_bos_aligned_and_shifted(tok, corpus):
    it = data.pretrain_batches(tok, 4, 64, source=corpus, seed=0)
    for _ in range(5):
        x, y = next(it)
        assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == np.int32
        assert (x[:, 0] == tok.bos_token_id).all()
        assert (x[:, 1:] == y[:, :-1]).all()


def test_packing_loses_and_duplicates_nothing_but_crops():
    """Every document read is either still buffered or emitted exactly once: whole, or cropped
    as the last piece of a row when nothing in the buffer fit (and then it was the shortest)."""
    bos, rng = 0, np.random.default_rng(0)
    lengths = rng.integers(2, 40, size=(30, 5))  # 30 chunks of 5 documents
    doc_id = lambda c, j: c * 5 + j + 1  # every token of a document carries its id: never bos

    def chunk(c):
        return [np.array([bos] + [doc_id(c, j)] * (lengths[c, j] - 1), np.int32) for j in range(5)]

    chunks = grain.MapDataset.range(30).map(chunk)
    packed = data._PackedRows(chunks, batch_size=3, seq_len=47, pad=False, bos_id=bos, buffer_size=8, lookahead=2)
    it = iter(packed)
    seen, tiny_crops = {}, 0  # document id -> tokens emitted; 1-token crops carry no id
    for _ in range(6):
        x, y = next(it)
        for row in np.concatenate([x, y[:, -1:]], axis=1):
            segs = _segments(row, bos)
            for k, seg in enumerate(segs):
                if len(seg) == 1:
                    assert k == len(segs) - 1, "a 1-token piece must be a crop at the end of a row"
                    tiny_crops += 1
                    continue
                ident = int(seg[1])
                assert ident not in seen, "a document was emitted twice"
                c, j = divmod(ident - 1, 5)
                assert (seg == chunk(c)[j][:len(seg)]).all()
                if len(seg) < lengths[c, j]:
                    assert k == len(segs) - 1, "only the last piece of a row may be cropped"
                seen[ident] = len(seg)
    state = it.get_state()
    buffered = {doc_id(c, j) for c, j in state["buffer"]}
    read = {doc_id(c, j) for c in range(state["next_chunk"]) for j in range(5)}
    consumed = read - buffered
    assert set(seen) <= consumed and len(consumed - set(seen)) == tiny_crops
    cropped = [i for i, n in seen.items() if n < lengths[divmod(i - 1, 5)]]
    assert cropped and sum(seen.values()) + tiny_crops == 6 * 3 * 48


def test_same_seed_same_batches_other_seed_differs(tok, corpus):
    take = lambda seed: [next(it) for it in [data.pretrain_batches(tok, 2, 32, source=corpus, seed=seed, buffer_size=8)]
                         for _ in range(4)]
    a, b, c = take(3), take(3), take(4)
    assert all((p[0] == q[0]).all() for p, q in zip(a, b))
    assert any((p[0] != q[0]).any() for p, q in zip(a, c))
    # background threads change only the speed, never the batches
    serial = data.pretrain_batches(tok, 2, 32, source=corpus, seed=3, buffer_size=8, lookahead=1,
                                   prefetch=0, tokenizer_threads=1)
    assert all((p[0] == next(serial)[0]).all() for p in a)


@pytest.mark.parametrize("k", [0, 3])
def test_resume_gives_the_next_batch(tok, corpus, k):
    it = data.pretrain_batches(tok, 3, 48, source=corpus, seed=7, buffer_size=20)
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = [next(it) for _ in range(4)]
    fresh = data.pretrain_batches(tok, 3, 48, source=corpus, seed=7, buffer_size=20)
    next(fresh)  # a used iterator must also restore cleanly
    fresh.set_state(state)
    for (x, y), (ex, ey) in zip([next(fresh) for _ in range(4)], expected):
        assert (x == ex).all() and (y == ey).all()


def _doc_numbers(tok, it, n_batches):
    nums = set()
    for _ in range(n_batches):
        x, _ = next(it)
        for row in x:
            for seg in _segments(row, tok.bos_token_id):
                text = tok.decode(seg[1:])
                if text.startswith("document ") and ":" in text:
                    nums.add(int(text[len("document "):text.index(":")]))
    return nums


def test_processes_read_disjoint_data(tok, corpus):
    p0 = _doc_numbers(tok, data.pretrain_batches(tok, 2, 64, source=corpus, process_index=0, process_count=2), 6)
    p1 = _doc_numbers(tok, data.pretrain_batches(tok, 2, 64, source=corpus, process_index=1, process_count=2), 6)
    assert p0 and p1 and not p0 & p1
    with pytest.raises(ValueError, match="process_index"):
        data.pretrain_batches(tok, 2, 64, source=corpus, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="cannot be shared"):
        data.pretrain_batches(tok, 2, 64, source=corpus, split="val", process_count=11)


def test_validation_is_fixed_and_held_out(tok, corpus):
    a = _doc_numbers(tok, data.pretrain_batches(tok, 2, 64, source=corpus, split="val", seed=1), 3)
    b = _doc_numbers(tok, data.pretrain_batches(tok, 2, 64, source=corpus, split="val", seed=2), 3)
    assert a == b and all(n // 10_000 == 3 for n in a)  # only from the last shard, seed-independent


def test_conversation_batches_pad_and_mask(tok):
    convs = [{"messages": [{"role": "user", "content": f"question {i}" + " more" * (i % 7)},
                           {"role": "assistant", "content": f"answer {i}" + " words" * (i % 5)}]}
             for i in range(20)]
    it = data.conversation_batches(convs, tok, batch_size=2, seq_len=40)
    rendered = [tok.render_conversation(c) for c in convs]
    padded = 0
    for _ in range(3):
        x, y = next(it)
        assert (x[:, 0] == tok.bos_token_id).all()
        for r in range(2):
            # the row's last token is only visible as a target, and hidden (-1) when masked
            row = np.concatenate([x[r], y[r, -1:]])
            same = lambda ids, at: len(ids) <= len(row) - at and all(
                a == b or (b == -1 and at + k == len(row) - 1) for k, (a, b) in enumerate(zip(ids, row[at:])))
            mask = np.zeros(len(row), np.int8)
            pos = 0
            while pos < len(row):  # each piece is one whole rendered conversation, then padding
                match = [(ids, m) for ids, m in rendered if same(ids, pos)]
                if not match:
                    assert np.isin(row[pos:], [tok.bos_token_id, -1]).all(), "a conversation was cut"
                    padded += 1
                    break
                ids, m = max(match, key=lambda im: len(im[0]))
                mask[pos:pos + len(ids)] = m
                pos += len(ids)
            assert pos > 0
            assert (y[r] == np.where(mask[1:] == 1, row[1:], -1)).all()
    assert padded > 0
    it2 = data.conversation_batches(convs, tok, batch_size=2, seq_len=40, process_index=1, process_count=2)
    assert next(it2)[0].shape == (2, 40)


# ---- sources and make_shards ------------------------------------------------------------------

def test_source_split_rules(tmp_path, corpus):
    assert [os.path.basename(p) for p in data.source_files(corpus, "val")] == ["shard_00003.parquet"]
    assert len(data.source_files(corpus, "train")) == 3
    (tmp_path / "one").mkdir()
    _write_shard(tmp_path / "one" / "a.parquet", ["x"])
    with pytest.raises(FileNotFoundError, match="at least 2"):
        data.source_files(str(tmp_path / "one"))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        data.source_files(str(tmp_path / "nope"))
    (tmp_path / "one" / data.MANIFEST).write_text(json.dumps({"val_shard": "shard_09999.parquet"}))
    with pytest.raises(FileNotFoundError, match="validation shard shard_09999.parquet is missing"):
        data.source_files(str(tmp_path / "one"), "train")
    assert len(data.source_files(None, "train")) >= 1  # the built-in corpus


def test_jsonl_folder_is_a_source_and_make_shards(tok, tmp_path):
    src = tmp_path / "jsonl"
    src.mkdir()
    for k in range(2):
        (src / f"part{k}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in _docs(10, k)))
    assert list(data.iter_texts(str(src), "val"))[0].startswith("document 10000:")
    x, _ = next(data.pretrain_batches(tok, 2, 32, source=str(src)))
    assert (x[:, 0] == tok.bos_token_id).all()

    (src / "zz_notes.txt").write_text("para one\n\npara two\n\npara three")
    out = tmp_path / "shards"
    data_cli.main_convert([str(src), "--out", str(out), "--shard-chars", "500", "--val-docs", "3",
                           "--txt-mode", "paragraph", "--row-group-docs", "2"])
    texts = [t for f in sorted(os.listdir(out)) for t in pq.read_table(out / f)["text"].to_pylist()]
    assert texts == _docs(10, 0) + _docs(10, 1) + ["para one", "para two", "para three"]
    assert pq.read_table(data.source_files(str(out), "val")[0])["text"].to_pylist() == ["para one", "para two", "para three"]
    with pytest.raises(SystemExit, match="not enough"):
        data_cli.main_convert([str(src / "zz_notes.txt"), "--out", str(tmp_path / "o2"), "--val-docs", "5"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="0 non-empty documents"):
        data_cli.main_convert([str(tmp_path / "empty"), "--out", str(tmp_path / "o3")])


def test_tok_stage_and_eval_on_a_folder(corpus, tmp_path, capsys):
    out = str(tmp_path / "run")
    tok_cli.main_tok(["--data-dir", corpus, "--vocab-size", "300", "--run-dir", out])
    t = Tokenizer.from_directory(tok_cli.tokenizer_dir(out))
    assert t.vocab_size == 300 and (np.load(os.path.join(out, "tokenizer", "token_bytes.npy")) == t.token_bytes()).all()
    tok_cli.main_tok_eval(["--data-dir", corpus, "--run-dir", out])
    results = json.loads((tmp_path / "run" / "tokenizer" / "tok_eval.json").read_text())
    assert results["ours"]["texts"]["val (held out)"]["ratio"] > 1.5
    with pytest.raises(SystemExit, match="too small"):
        tok_cli.main_tok(["--data-dir", corpus, "--vocab-size", "100", "--run-dir", out])
    with pytest.raises(SystemExit, match="no tokenizer"):
        tok_cli.main_tok_eval(["--run-dir", str(tmp_path / "none")])


# ---- download against a local server ----------------------------------------------------------

class _Server:
    """Serves shard files from a dict with HTTP Range support, plus failure knobs per file."""

    def __init__(self, files):
        self.files, self.cut_once, self.corrupt_once, self.requests = dict(files), set(), set(), []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.requests.append((name, self.headers.get("Range")))
                if name not in server.files:
                    self.send_error(404)
                    return
                body, start = server.files[name], 0
                if name in server.corrupt_once:
                    server.corrupt_once.discard(name)
                    body = b"PAR1" + bytes(len(body) - 8) + b"PAR1"
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if name in server.cut_once:  # drop the connection halfway through
                    server.cut_once.discard(name)
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _shard_bytes(tmp_path, i):
    p = tmp_path / f"gen_{i}.parquet"
    _write_shard(p, _docs(30, i), row_group=8)
    return p.read_bytes()


@pytest.fixture
def server(tmp_path):
    s = _Server({f"shard_{i:05d}.parquet": _shard_bytes(tmp_path, i) for i in [0, 1, 2, 3, 9]})
    yield s
    s.close()


def _download(server, dest, n, **kw):
    return data.download(str(dest), data.Remote(server.url, 9), n, workers=2, backoff_s=0, progress=False, **kw)


def test_download_resume_and_verify(server, tmp_path):
    dest = tmp_path / "dl"
    server.cut_once = {"shard_00000.parquet"}
    server.corrupt_once = {"shard_00001.parquet"}
    paths = _download(server, dest, 3)
    assert [os.path.basename(p) for p in paths] == ["shard_00000.parquet", "shard_00001.parquet",
                                                    "shard_00002.parquet", "shard_00009.parquet"]
    for p in paths:
        assert Path(p).read_bytes() == server.files[os.path.basename(p)]
    # the interrupted shard resumed where it stopped instead of starting over
    half = len(server.files["shard_00000.parquet"]) // 2
    assert ("shard_00000.parquet", f"bytes={half}-") in server.requests
    assert sum(n == "shard_00001.parquet" for n, _ in server.requests) == 2  # corrupt, then good
    assert not [f for f in os.listdir(dest) if f.endswith(".part")]
    # validation is pinned by name: shard 9 though only 0-2 were asked for, and not shard 2
    assert data.source_files(str(dest), "val") == [str(dest / "shard_00009.parquet")]

    # a process killed mid-download leaves a .part; the next run resumes it with a Range request
    body = server.files["shard_00003.parquet"]
    (dest / "shard_00003.parquet.part").write_bytes(body[:100])
    # and a shard corrupted on disk after download is detected and fetched again
    bad = bytearray((dest / "shard_00002.parquet").read_bytes())
    bad[len(bad) // 2] ^= 0xFF
    (dest / "shard_00002.parquet").write_bytes(bytes(bad))
    # a shard without our checksum (placed there by another tool) gets the full parquet check
    os.remove(dest / "shard_00009.parquet.sha256")
    (dest / "shard_00009.parquet").write_bytes(server.files["shard_00009.parquet"][:-50])
    server.requests.clear()
    _download(server, dest, 4)
    assert (dest / "shard_00009.parquet").read_bytes() == server.files["shard_00009.parquet"]
    assert ("shard_00003.parquet", "bytes=100-") in server.requests
    assert (dest / "shard_00003.parquet").read_bytes() == body
    assert (dest / "shard_00002.parquet").read_bytes() == server.files["shard_00002.parquet"]
    assert {n for n, _ in server.requests} == {"shard_00002.parquet", "shard_00003.parquet", "shard_00009.parquet"}  # the rest verified, skipped
    assert hashlib.sha256(body).hexdigest() == (dest / "shard_00003.parquet.sha256").read_text()


def test_download_reports_missing_shards(server, tmp_path, capsys):
    del server.files["shard_00001.parquet"]
    with pytest.raises(data.DownloadError, match=r"shard_00001.parquet: not on the server \(HTTP 404\)"):
        _download(server, tmp_path / "dl", 3)
    assert (tmp_path / "dl" / "shard_00002.parquet").exists()  # the others still arrived
    with pytest.raises(SystemExit, match="1 of 4 shards failed"):
        data_cli.main_download(["-n", "3", "--out", str(tmp_path / "dl2"), "--base-url", server.url,
                                "--last-shard", "9", "--attempts", "1"])
    server.files.pop("shard_00002.parquet")
    server.cut_once = {"shard_00000.parquet"}
    with pytest.raises(data.DownloadError, match="shard_00000.parquet: failed after 1 attempts, last: connection ended"):
        _download(server, tmp_path / "dl3", 1, attempts=1)
