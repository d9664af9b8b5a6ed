"""The tokenized store: contents, key, atomicity, plans and per-process reads, --mode=prepare."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import signal
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import processes
from transformer import config as config_lib
from transformer.config import EOS_ID, PAD_ID, ConfigError
from transformer.data import pipeline, store, tokenizer as tokenizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Examples(list):
  """A split as `datasets.get_split` returns it: random access plus name and direction."""
  name = "toy/1.0.0/train[:600]"
  source_lang, target_lang = "en", "de"


class _Opener:
  """Picklable () -> the examples (for the store's worker processes)."""

  def __init__(self, examples):
    self.rows = [dict(x) for x in examples]

  def __call__(self):
    return _Examples(self.rows)


def _lines(path, n):
  with open(path, encoding="utf-8") as f:
    return [next(f).rstrip("\n") for _ in range(n)]


@pytest.fixture(scope="module")
def examples(multi30k_dir):
  en, de = _lines(multi30k_dir / "train.en", 600), _lines(multi30k_dir / "train.de", 600)
  rows = [{"source": s, "target": t, "id": 1000 + i} for i, (s, t) in enumerate(zip(en, de))]
  rows[5]["target"] = ""                                  # empty: dropped for training
  rows[9]["source"] = " ".join(en[:12])                   # long: dropped by max_source_length
  return _Examples(rows)


@pytest.fixture(scope="module")
def toks(tmp_path_factory, examples):
  """Two different vocabularies trained on the examples."""
  d = tmp_path_factory.mktemp("spm")
  sents = [x for ex in examples for x in (ex["source"], ex["target"]) if x]
  out = []
  for size in (300, 350):
    tokenizer_lib.train_sentencepiece(sents, str(d / f"spm{size}.model"), size)
    out.append(tokenizer_lib.Tokenizer.load(str(d / f"spm{size}.model")))
  return out


def _oracle(examples, tok):
  """Per line: Tokenizer.encode + EOS (the independent computation)."""
  return ([tok.encode(ex["source"]) + [EOS_ID] for ex in examples],
          [tok.encode(ex["target"]) + [EOS_ID] for ex in examples])


def test_store_equals_an_independent_encode(tmp_path, examples, toks):
  tok = toks[0]
  directory, meta, built = store.open_or_build(examples, tok, str(tmp_path))
  assert built and meta["rows"] == len(examples) and meta["dtype"] == "uint16"
  digest = hashlib.sha256(examples.name.encode()).hexdigest()[:8]
  assert directory == os.path.join(str(tmp_path), "toy", "1.0.0",
                                   f"train_600-{digest}.en-de.{tok.fingerprint()[:16]}")
  src, tgt = _oracle(examples, tok)
  full = store.StoredSplit(directory)
  assert len(full) == len(examples) and full.counts["kept"] == len(examples)
  for i in range(len(examples)):
    assert full.source(i).tolist() == src[i] and full.target(i).tolist() == tgt[i]
  assert full.ids.tolist() == [ex["id"] for ex in examples]
  assert meta["source_tokens"] == sum(map(len, src))

  # The training view: the filters of tokenize_split, applied from the lengths alone.
  limit = 40
  train = store.StoredSplit(directory, limit, limit, drop_empty=True)
  want = [i for i in range(len(examples))
          if 1 < len(src[i]) <= limit and 1 < len(tgt[i]) <= limit]
  assert 5 not in want and 9 not in want and len(want) < len(examples) - 1
  assert train.index.tolist() == want
  assert [train.source(j).tolist() for j in range(len(train))] == [src[i] for i in want]
  old = pipeline.tokenize_split(examples, tok, limit, limit, drop_empty=True)
  assert train.counts == old.counts
  for name in ("index", "ids", "source_lengths", "target_lengths"):
    np.testing.assert_array_equal(getattr(train, name), getattr(old, name))

  # A collated batch: rows padded by hand from the oracle.
  rows = np.array([3, -1, 0, 7])
  batch = pipeline.collate(train, rows, 48)
  for r, j in enumerate(rows):
    want_src = np.full(48, PAD_ID)
    if j >= 0:
      ids = src[want[j]]
      want_src[:len(ids)] = ids
    np.testing.assert_array_equal(batch["inputs"][r], want_src)
  assert batch["index"].tolist() == [want[3], -1, want[0], want[7]]

  # Built once: the second call reads it.
  assert store.open_or_build(examples, tok, str(tmp_path))[2] is False


def test_parallel_build_equals_serial(tmp_path, examples, toks, monkeypatch):
  monkeypatch.setattr(store, "_TASK_ROWS", 128)  # 5 ranges over 2 worker processes
  monkeypatch.setattr(store, "_CHUNK_ROWS", 50)
  d1, _, _ = store.open_or_build(examples, toks[0], str(tmp_path / "serial"))
  d2, meta, _ = store.open_or_build(examples, toks[0], str(tmp_path / "parallel"), workers=2,
                                    opener=_Opener(examples))
  assert meta["workers"] == 2
  for name in store._FILES:  # pylint: disable=protected-access
    np.testing.assert_array_equal(np.load(os.path.join(d1, name)), np.load(os.path.join(d2, name)))


class _BlockingOpener:
  """Picklable opener that writes '<pid_dir>/<worker pid>' and then blocks (a worker busy)."""

  def __init__(self, pid_dir):
    self.pid_dir = str(pid_dir)

  def __call__(self):
    with open(os.path.join(self.pid_dir, str(os.getpid())), "w", encoding="utf-8"):
      pass
    time.sleep(300)
    return []


_BUILD_WITH_BLOCKED_WORKERS = r"""
import sys
from tests.test_store import _BlockingOpener, _Examples
from transformer.data import store, tokenizer
out, model, pid_dir = sys.argv[1:]
rows = _Examples({"source": "a b", "target": "c d", "id": i} for i in range(1200))
store.build(rows, tokenizer.Tokenizer.load(model), out + "/store",
            store.key(rows.name, "en", "de", "x", len(rows)), workers=2,
            opener=_BlockingOpener(pid_dir))
"""


def _children(pid: int) -> set[int]:
  """Every process whose parent is `pid` (from /proc)."""
  out = set()
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
          ppid = int(f.read().rsplit(")", 1)[1].split()[1])
      except (OSError, IndexError, ValueError):  # ended meanwhile
        continue
      if ppid == pid:
        out.add(int(entry))
  return out


def _running(pid: int) -> bool:
  """Exists and is not a zombie (an ended child not yet reaped)."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs Linux /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_the_builder_ends_its_workers(tmp_path, toks, sig):
  """The builder killed while its 2 worker processes encode: no worker (nor the resource
  tracker) outlives it by more than a few seconds."""
  pid_dir = tmp_path / "pids"
  pid_dir.mkdir()
  with open(tmp_path / "log", "w", encoding="utf-8") as log:
    builder = subprocess.Popen(
        [sys.executable, "-c", _BUILD_WITH_BLOCKED_WORKERS, str(tmp_path), toks[0].path,
         str(pid_dir)], cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
  children: set[int] = set()
  try:
    deadline = time.monotonic() + 120
    while len(os.listdir(pid_dir)) < 2:
      assert builder.poll() is None, (tmp_path / "log").read_text()
      assert time.monotonic() < deadline, "the workers never started"
      time.sleep(0.1)
    workers = {int(p) for p in os.listdir(pid_dir)}
    children = _children(builder.pid)
    assert workers <= children, (workers, children)  # and the resource tracker
    builder.send_signal(sig)
    builder.wait(timeout=30)
    deadline = time.monotonic() + 5
    while any(map(_running, children)) and time.monotonic() < deadline:
      time.sleep(0.1)
    assert not [p for p in children if _running(p)]
  finally:
    if builder.poll() is None:
      builder.kill()
      builder.wait()
    for pid in children:  # leave nothing running, also when the test fails
      if _running(pid):
        os.kill(pid, signal.SIGKILL)


def test_keyed_by_vocabulary_and_split(tmp_path, examples, toks):
  d300, _, _ = store.open_or_build(examples, toks[0], str(tmp_path))
  d350, _, built = store.open_or_build(examples, toks[1], str(tmp_path))
  assert built and d350 != d300
  src, _ = _oracle(examples, toks[1])
  assert store.StoredSplit(d350).source(2).tolist() == src[2]
  assert store.StoredSplit(d300).meta["vocab_sha256"] == toks[0].fingerprint()
  other = _Examples(examples[:100])
  other.name = "toy/1.0.0/train[:100]"
  assert store.open_or_build(other, toks[0], str(tmp_path))[0] != d300
  # Same name, other contents (e.g. the data re-prepared): refused, not silently reused.
  changed = _Examples(examples[:100])
  with pytest.raises(store.StoreError, match="was built for"):
    store.open_or_build(changed, toks[0], str(tmp_path))


def test_read_only_root_falls_back(tmp_path, examples, toks, monkeypatch):
  shared, own = str(tmp_path / "shared"), str(tmp_path / "workdir")
  real_mkdtemp = store.tempfile.mkdtemp

  def mkdtemp(prefix="", dir=None):  # pylint: disable=redefined-builtin
    if dir.startswith(shared):
      raise PermissionError(13, "Read-only file system", dir)
    return real_mkdtemp(prefix=prefix, dir=dir)

  monkeypatch.setattr(store.tempfile, "mkdtemp", mkdtemp)
  d, _, built = store.open_or_build(examples, toks[0], shared, fallback_root=own)
  assert built and d.startswith(own) and store.is_complete(d)
  assert store.open_or_build(examples, toks[0], shared, fallback_root=own)[:3:2] == (d, False)
  with pytest.raises(store.StoreError, match="cannot write the tokenized store"):
    store.open_or_build(examples, toks[1], shared)


def test_interrupted_or_damaged_store_is_never_read(tmp_path, examples, toks, monkeypatch):
  tok = toks[0]
  root = str(tmp_path)
  directory = store.store_dir(root, examples.name, "en", "de", tok.fingerprint())
  original = tokenizer_lib.Tokenizer.encode_batch
  calls = []

  def failing(self, texts, num_threads=-1):
    calls.append(len(texts))
    if len(calls) == 3:  # the second chunk's source side
      raise KeyboardInterrupt("interrupted")  # like Ctrl-C halfway through the split
    return original(self, texts, num_threads)

  monkeypatch.setattr(store, "_CHUNK_ROWS", 100)
  monkeypatch.setattr(tokenizer_lib.Tokenizer, "encode_batch", failing)
  with pytest.raises(KeyboardInterrupt):
    store.open_or_build(examples, tok, root)
  monkeypatch.setattr(tokenizer_lib.Tokenizer, "encode_batch", original)
  assert len(calls) == 3 and not os.path.exists(directory)
  # The temporary directory is gone; the builders' lock file stays.
  assert os.listdir(os.path.dirname(directory)) == [f".{os.path.basename(directory)}.lock"]
  with pytest.raises(store.StoreError, match="no complete tokenized store"):
    store.StoredSplit(directory)

  # A kill leaves a temporary directory and maybe a final one without its marker (a partial
  # copy): neither is read; the store is rebuilt and the partial one kept aside.
  good, _, _ = store.open_or_build(examples, tok, root)
  shutil.copytree(good, good + ".tmp-killed")
  os.remove(os.path.join(good + ".tmp-killed", store.COMPLETE))
  os.remove(os.path.join(good, store.COMPLETE))
  assert not store.is_complete(good)
  _, _, built = store.open_or_build(examples, tok, root)
  assert built and store.is_complete(good)
  assert len([d for d in os.listdir(os.path.dirname(good)) if ".invalid-" in d]) == 1
  # A truncated token file (size differs from meta.json) is not read either.
  with open(os.path.join(good, "source_tokens.npy"), "r+b") as f:
    f.truncate(os.path.getsize(os.path.join(good, "source_tokens.npy")) - 2)
  assert not store.is_complete(good)
  with pytest.raises(store.StoreError):
    store.StoredSplit(good)


def test_batch_plan_from_lengths_equals_the_in_memory_plan(tmp_path, examples, toks):
  tok = toks[0]
  directory, _, _ = store.open_or_build(examples, tok, str(tmp_path))
  stored = store.StoredSplit(directory, 64, 64, drop_empty=True)
  old = pipeline.tokenize_split(examples, tok, 64, 64, drop_empty=True)
  kw = dict(tokens_per_batch=400, boundaries="8,16,24,32,48,64", batch_multiple=2,
            shuffle_seed=3)
  p_new = pipeline.TrainBatchPlan(stored, **{k: v for k, v in kw.items()})
  p_old = pipeline.TrainBatchPlan(old, **kw)
  assert p_new.fingerprint == p_old.fingerprint
  for epoch in (0, 1):
    (ln, rn), (lo, ro) = p_new.epoch(epoch), p_old.epoch(epoch)
    np.testing.assert_array_equal(ln, lo)
    assert all(np.array_equal(a, b) for a, b in zip(rn, ro)) and len(rn) == len(ro)
  it_new = pipeline.make_train_iterator(stored, **kw)
  it_old = pipeline.make_train_iterator(old, **kw)
  for _ in range(p_old.batches_per_epoch + 3):  # across an epoch boundary
    a, b = next(it_new), next(it_old)
    for k in ("inputs", "targets", "index"):
      np.testing.assert_array_equal(a[k], b[k])
  state = pipeline.iterator_state(it_new)
  resumed = pipeline.make_train_iterator(stored, **kw)
  pipeline.restore_iterator(resumed, state)
  np.testing.assert_array_equal(next(resumed)["inputs"], next(it_old)["inputs"])
  for (ln, rn), (lo, ro) in zip(
      [pipeline.eval_batch_plan(store.StoredSplit(directory), 300, "16,32")],
      [pipeline.eval_batch_plan(pipeline.tokenize_split(examples, tok), 300, "16,32")]):
    np.testing.assert_array_equal(ln, lo)
    assert all(np.array_equal(a, b) for a, b in zip(rn, ro))


class _Recorder:
  """A token array that records which positions were read."""

  def __init__(self, array):
    self.array, self.read = array, []

  def __len__(self):
    return len(self.array)

  def __getitem__(self, positions):
    self.read.append(np.asarray(positions).ravel())
    return self.array[positions]


def test_each_process_reads_exactly_its_rows(tmp_path, examples, toks):
  directory, _, _ = store.open_or_build(examples, toks[0], str(tmp_path))
  kw = dict(tokens_per_batch=600, boundaries="16,32,64", batch_multiple=2, shuffle_seed=1)
  plan = pipeline.TrainBatchPlan(store.StoredSplit(directory, 64, 64, True), **kw)
  batches = 6
  seen = []
  for p in range(2):
    split = store.StoredSplit(directory, 64, 64, drop_empty=True)
    split.source_tokens = _Recorder(split.source_tokens)
    split.target_tokens = _Recorder(split.target_tokens)
    # The map dataset behind make_train_iterator, read without prefetching.
    ds, _ = pipeline.make_train_dataset(split, process_index=p, process_count=2, **kw)
    rows = []
    for i in range(batches):
      batch = ds[i]
      _, global_rows = plan[i]
      half = len(global_rows) // 2
      mine = global_rows[p * half:(p + 1) * half]
      np.testing.assert_array_equal(batch["index"], np.where(mine >= 0, split.index[mine], -1))
      rows.extend(mine[mine >= 0].tolist())
    for side in ("source", "target"):
      starts = getattr(split, f"{side}_starts")[rows]
      lens = getattr(split, f"{side}_lengths")[rows]
      want = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lens)])
      got = np.concatenate(getattr(split, f"{side}_tokens").read)
      # Positions read == exactly the tokens of this process's rows (each once per batch).
      np.testing.assert_array_equal(np.sort(got), np.sort(want))
    seen.append(rows)
  assert not set(seen[0]) & set(seen[1])
  every = [r for i in range(batches) for r in plan[i][1].tolist() if r >= 0]
  assert sorted(seen[0] + seen[1]) == sorted(every)


# ----------------------------------------------------------------------------
# --mode=prepare


def _prepare_cmd(workdir, data_dir, *extra):
  return [sys.executable, "-m", "transformer.main", "--mode=prepare",
          "--flagfile=experiments/cpu/multi30k_en_de.flags", f"--workdir={workdir}",
          f"--raw_data_dir={data_dir}", "--train_split=train[:1500]",
          "--eval_split=validation[:40]", "--test_split=test[:24]", "--vocab_size=400", *extra]


def _env(**extra):
  return processes.environment(**extra)


def test_prepare_twice_then_errors(tmp_path, multi30k_dir):
  workdir = tmp_path / "run"
  r = subprocess.run(_prepare_cmd(workdir, multi30k_dir, "--tokenize_workers=2"), cwd=REPO,
                     env=_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert re.search(r"vocabulary: .*spm\.model \(trained now\): \d+ pieces", r.stdout), r.stdout
  # The dataset's size: its own prepared files, not downloads/, extracted files or stores.
  [version_dir] = (workdir / "tfds").glob("multi30k/*/1.0.0")
  size = sum(p.stat().st_size for p in version_dir.rglob("*") if p.is_file())
  assert re.search(rf"^tfds: .*: train\[:1500\] 1500, .* examples, {size} bytes$", r.stdout,
                   re.M), (size, r.stdout)
  stores = re.findall(r"tokenized (\S+): (\S+) \(now\): (\d+) rows", r.stdout)
  assert [(s, int(n)) for s, _, n in stores] == [("train[:1500]", 1500),
                                                ("validation[:40]", 40), ("test[:24]", 24)]
  # The train store holds what an independent encode of the raw lines gives.
  tok = tokenizer_lib.Tokenizer.load(str(workdir / "spm.model"))
  train = store.StoredSplit(stores[0][1])
  en = _lines(multi30k_dir / "train.en", 1500)
  de = _lines(multi30k_dir / "train.de", 1500)
  for i in (0, 1, 777, 1499):
    assert train.source(i).tolist() == tok.encode(en[i]) + [EOS_ID]
    assert train.target(i).tolist() == tok.encode(de[i]) + [EOS_ID]
  # 1500 rows: 2 worker processes of 750 rows each; 40 and 24 rows: encoded in the main one.
  assert [store.StoredSplit(p).meta["workers"] for _, p, _ in stores] == [2, 1, 1]
  mtimes = {p: os.path.getmtime(os.path.join(p, "meta.json")) for _, p, _ in stores}

  r = subprocess.run(_prepare_cmd(workdir, multi30k_dir), cwd=REPO, env=_env(),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "prepare: nothing to do, everything was already prepared" in r.stdout
  assert "(now)" not in r.stdout and "trained now" not in r.stdout
  assert mtimes == {p: os.path.getmtime(os.path.join(p, "meta.json")) for p in mtimes}

  r = subprocess.run(_prepare_cmd(tmp_path / "w2", tmp_path / "nowhere"), cwd=REPO, env=_env(),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode != 0
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "--raw_data_dir not found" in errors[0], r.stderr[-2000:]
  assert not (tmp_path / "w2").exists()  # nothing half-made
  with pytest.raises(ConfigError, match="--tokenize_workers must be >= 0"):
    config_lib.from_args(["--tokenize_workers=-1"])


def test_prepare_on_two_processes_builds_once(tmp_path, multi30k_dir):
  """Two jax.distributed processes on 127.0.0.1: the chief prepares, the other waits, reads."""
  workdir, port = tmp_path / "run", processes.free_port()
  logs = [tmp_path / f"p{i}.log" for i in range(2)]
  env = processes.environment(XLA_FLAGS="--xla_force_host_platform_device_count=1")
  procs = [processes.start(_prepare_cmd(workdir, multi30k_dir,
                                        f"--coordinator_address=127.0.0.1:{port}",
                                        "--num_processes=2", f"--process_id={i}", "--mesh=data:-1"),
                           logs[i], env)
           for i in range(2)]
  processes.wait_all(procs, timeout=240)
  out = [log.read_text(encoding="utf-8", errors="replace") for log in logs]
  assert [p.returncode for p in procs] == [0, 0], out[0][-3000:] + out[1][-3000:]
  assert out[0].count("(now):") == 4 and "tokenized train[:1500]" in out[0]
  # Only the chief tokenized (store.build logs 'tokenized <name>: N rows ... in X s').
  built = lambda text: re.findall(r"tokenized multi30k\S*: \d+ rows", text)
  assert len(built(out[0])) == 3 and not built(out[1]), out[1][-3000:]
  stores = re.findall(r"tokenized \S+: (\S+) \(now\)", out[0])
  assert all(store.is_complete(p) for p in stores)
  parent = os.path.dirname(stores[0])
  assert not [d for d in os.listdir(parent) if ".tmp-" in d or ".invalid-" in d]


def test_three_prepares_at_once_make_each_part_once(tmp_path, multi30k_dir):
  """Three independent prepares on the same directories (as on a pod, every host running the
  same command): the data is prepared, the vocabulary trained and each store built by one of
  them; the others wait and say so."""
  workdir = tmp_path / "run"
  logs = [tmp_path / f"p{i}.log" for i in range(3)]
  procs = [processes.start(_prepare_cmd(workdir, multi30k_dir, "--tokenize_workers=1"), log,
                           _env()) for log in logs]
  processes.wait_all(procs, timeout=300)
  out = [log.read_text(encoding="utf-8", errors="replace") for log in logs]
  assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(o[-2000:] for o in out)
  every = "".join(out)
  # Side effects, counted in the logs of all three: each part was made once.
  assert every.count("Preparing multi30k/") == 1
  assert every.count("SentencePiece: wrote") == 1
  built = re.findall(r"tokenized (multi30k\S*): \d+ rows", every)
  assert sorted(built) == sorted(set(built)) and len(built) == 3, built
  # What each says: one made it, the others waited for it (or found it there).
  parts = {"tfds": r"tfds: .* \((now|prepared by another process while this one waited|"
                   r"already there)\)",
           "vocabulary": r"vocabulary: .* \((trained now|trained by another process while"
                         r" this one waited|already there)\)"}
  for split in ("train[:1500]", "validation[:40]", "test[:24]"):
    parts[split] = (rf"tokenized {re.escape(split)}: .* \((now|built by another process while"
                    rf" this one waited|already there)\)")
  for part, pattern in parts.items():
    said = [re.search(pattern, o).group(1) for o in out]
    assert sum(s in ("now", "trained now") for s in said) == 1, (part, said)
  parent = next((workdir / "tfds" / "tokenized").glob("multi30k/*/1.0.0"))
  assert not [d for d in os.listdir(parent) if ".tmp-" in d or ".invalid-" in d]


def test_benchmark_script_at_tiny_size(tmp_path):
  r = subprocess.run(
      [sys.executable, "-m", "benchmarks.input_pipeline", "--pairs=400", "--words=300",
       "--vocab_size=300", "--batches=5", f"--workdir={tmp_path}", "--tokenize_workers=1"],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["pairs"] == 400 and out["tokens_per_batch"] == 25000
  for key in ("prepare_seconds", "first_start_seconds", "restart_seconds",
              "legacy_first_start_seconds", "legacy_restart_seconds", "batches_per_s"):
    assert out[key] > 0, key
  ph = out["phases"]
  assert ph["first_start"]["store_built_now"] and not ph["restart"]["store_built_now"]
  # The store path and the in-memory path keep the same pairs.
  assert ph["restart"]["kept_pairs"] == ph["legacy_restart"]["kept_pairs"] > 350
  assert len(out["batches_per_s_2proc"]) == 2 and set(out["peak_rss_mib"]) >= {
      "prepare", "first_start", "restart", "iterate", "iterate_2proc"}
  lines = (tmp_path / "corpus" / "train.en").read_text().splitlines()
  assert len(lines) == 400 and all(lines)


def test_a_stored_split_is_cut_to_max_len_like_an_in_memory_one(tmp_path, examples, toks):
  """Evaluation cuts sources longer than --max_len (run.fit_max_len) on a store's split too."""
  from transformer import run  # pylint: disable=g-import-not-at-top
  tok = toks[0]
  directory, _, _ = store.open_or_build(examples, tok, str(tmp_path))
  src, tgt = _oracle(examples, tok)
  max_len = sorted(len(s) for s in src)[len(src) // 2]  # about half the sources are longer
  cut = run.fit_max_len(store.StoredSplit(directory), max_len)
  assert len(cut) == len(examples)
  for i in range(len(examples)):
    want = src[i] if len(src[i]) <= max_len else src[i][:max_len - 1] + [EOS_ID]
    assert cut.source(i).tolist() == want
    want = tgt[i] if len(tgt[i]) <= max_len else tgt[i][:max_len - 1] + [EOS_ID]
    assert cut.target(i).tolist() == want
  assert cut.ids.tolist() == [ex["id"] for ex in examples]
  assert cut.index.tolist() == list(range(len(examples)))


def test_directory_split_is_tokenized_anew_each_time(tmp_path, toks, monkeypatch):
  """A directory of trees is no store key: after a tree is edited (same row count) the next
  evaluation reads the new words, and nothing is written under the store root."""
  import types  # pylint: disable=g-import-not-at-top
  from transformer import run  # pylint: disable=g-import-not-at-top
  tok = toks[0]
  trees = tmp_path / "dev_trees"
  trees.mkdir()
  cfg = config_lib.Config(data=config_lib.DataConfig(
      dataset="craft_treebank", task="parsing", tfds_data_dir=str(tmp_path / "tfds")))
  s = types.SimpleNamespace(cfg=cfg, workdir=str(tmp_path / "work"), tokenizer=tok)
  monkeypatch.chdir(tmp_path)
  for words in (("Two", "dogs", "run"), ("A", "man", "sleeps")):
    (trees / "1.tree").write_text(
        f"( (S (NP (CD {words[0]}) (NNS {words[1]})) (VP (VBP {words[2]})) (. .)) )\n",
        encoding="utf-8")
    examples, tokenized = run._tokenize(s, "./dev_trees", train=False)  # pylint: disable=protected-access
    sentence = " ".join(words) + " ."
    assert examples[0]["source"] == sentence
    assert tokenized.source(0).tolist() == tok.encode(sentence) + [EOS_ID]
  assert not (tmp_path / "tfds").exists() and not (tmp_path / "work").exists()
  # '..' in a name part never climbs out of the store root.
  d = store.store_dir(str(tmp_path / "root"), "../../x/./y", "en", "de", "f" * 64)
  assert os.path.realpath(d).startswith(os.path.realpath(tmp_path / "root") + os.sep)


def test_a_builder_that_loses_the_rename_race_uses_the_winners_store(tmp_path, examples, toks,
                                                                    monkeypatch):
  """Another builder renames its complete store into place between this build's last check
  and its rename: this build keeps the winner's store, deletes its own copy, raises nothing,
  moves nothing aside."""
  tok = toks[0]
  winner, _, _ = store.open_or_build(examples, tok, str(tmp_path / "other"))
  winner_meta = json.loads(open(os.path.join(winner, "meta.json"), encoding="utf-8").read())
  directory = store.store_dir(str(tmp_path / "root"), examples.name, "en", "de",
                              tok.fingerprint())
  real_rename = os.rename
  raced = []

  def rename(src, dst):
    if dst == directory and not raced:  # the other builder gets there first
      raced.append(src)
      shutil.copytree(winner, directory)
    return real_rename(src, dst)

  monkeypatch.setattr(store.os, "rename", rename)
  d, meta, _ = store.open_or_build(examples, tok, str(tmp_path / "root"))
  assert raced and d == directory and meta == winner_meta
  name = os.path.basename(directory)
  assert sorted(os.listdir(os.path.dirname(directory))) == [f".{name}.lock", name]
  assert store.StoredSplit(directory).source(3).tolist() == _oracle(examples, tok)[0][3]


def test_incomplete_stores_are_moved_aside_under_unique_names(tmp_path, examples, toks):
  tok = toks[0]
  small = _Examples(examples[:50])
  directory = store.store_dir(str(tmp_path), small.name, "en", "de", tok.fingerprint())
  for _ in range(2):  # twice within one second
    os.makedirs(directory)
    open(os.path.join(directory, "source_tokens.npy"), "wb").close()  # no COMPLETE
    assert store.open_or_build(small, tok, str(tmp_path))[2]
    assert store.is_complete(directory)
    shutil.rmtree(directory)
  aside = [d for d in os.listdir(os.path.dirname(directory)) if ".invalid-" in d]
  assert len(aside) == 2
  assert all(os.listdir(os.path.join(os.path.dirname(directory), d)) == ["source_tokens.npy"]
             for d in aside)


def test_only_the_chief_builds(tmp_path, examples, toks):
  tok = toks[0]
  small = _Examples(examples[:50])
  directory = store.store_dir(str(tmp_path), small.name, "en", "de", tok.fingerprint())
  with pytest.raises(store.StoreError) as e:
    store.open_or_build(small, tok, str(tmp_path), may_build=False)
  assert str(e.value) == (f"{directory}: not visible after process 0 built it (every process"
                          " needs the same --tfds_data_dir, on a shared filesystem)")
  assert not os.path.exists(directory)
  store.open_or_build(small, tok, str(tmp_path))
  assert store.open_or_build(small, tok, str(tmp_path), may_build=False)[:3:2] == (
      directory, False)


def _file_size_limit(limit):
  def preexec():
    import resource  # pylint: disable=g-import-not-at-top
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
  return preexec


def test_file_size_limit_gives_one_error_line(tmp_path, multi30k_dir):
  """A write failing (EFBIG under RLIMIT_FSIZE, like a full disk) while preparing the local
  Multi30k files or while building a store: one `error:` line naming the cause, no traceback,
  nothing left that looks finished."""
  workdir = tmp_path / "run"
  def run(limit, *extra):
    return subprocess.run(_prepare_cmd(workdir, multi30k_dir, *extra), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=_file_size_limit(limit) if limit else None)

  r = run(300_000)  # the train array_record (~3 MB) does not fit
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert r.returncode == 2 and len(errors) == 1, r.stderr[-3000:]
  assert "Traceback" not in r.stderr
  assert re.search(r"^error: multi30k/\S+ is not prepared in .* and preparing it failed: .*"
                   r"File too large.*\(a file exceeds the file-size limit\)$", errors[0]), errors
  assert not list((workdir / "tfds").glob("multi30k/*/1.0.0/dataset_info.json"))

  assert run(None, "--train_split=train[:100]").returncode == 0  # data and vocabulary
  r = run(200_000, "--train_split=train")  # the full train store (~1 MB a side) does not fit
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert r.returncode == 2 and len(errors) == 1, r.stderr[-3000:]
  assert "Traceback" not in r.stderr
  assert re.search(r"^error: building \S+/train\S*\.en-de\.[0-9a-f]{16} failed: "
                   r"OSError: \[Errno %d\] File too large \(a file exceeds the file-size "
                   r"limit\)$" % errno.EFBIG, errors[0]), errors
  parent = next((workdir / "tfds" / "tokenized").glob("multi30k/*/1.0.0"))
  assert sorted(d.split(".")[0].split("-")[0] for d in os.listdir(parent)
                if not d.endswith(".lock")) == [
      "test_24", "train_100", "validation_40"]  # no half-made train store


def test_splits_that_render_alike_get_their_own_stores(tmp_path, examples, toks):
  """'train[:300]' and 'train[300:]' both render as 'train_300': the name's hash tells them
  apart, so each gets (and keeps) its own rows."""
  tok = toks[0]
  head, tail = _Examples(examples[:300]), _Examples(examples[300:])
  head.name, tail.name = "toy/1.0.0/train[:300]", "toy/1.0.0/train[300:]"
  d_head, _, _ = store.open_or_build(head, tok, str(tmp_path))
  d_tail, _, built = store.open_or_build(tail, tok, str(tmp_path))
  assert built and d_head != d_tail
  for split, d in ((head, d_head), (tail, d_tail)):
    src, tgt = _oracle(split, tok)
    got = store.StoredSplit(d)
    assert [got.source(i).tolist() for i in (0, 299)] == [src[0], src[299]]
    assert got.target(150).tolist() == tgt[150]


class _BigVocab:
  """A tokenizer of 70,000 ids: character c is id 66,000 + ord(c) % 4000 (all above 65,535)."""
  vocab_size = 70_000

  def encode_batch(self, texts, num_threads=-1):  # pylint: disable=unused-argument
    return [[66_000 + ord(c) % 4000 for c in t] for t in texts]

  def fingerprint(self):
    return "b" * 64


def test_vocabulary_over_65536_ids_is_stored_as_int32(tmp_path, examples):
  small = _Examples(examples[:40])
  directory, meta, _ = store.open_or_build(small, _BigVocab(), str(tmp_path))
  assert meta["dtype"] == "int32"
  got = store.StoredSplit(directory)
  for i, ex in enumerate(small):
    assert got.source(i).tolist() == [66_000 + ord(c) % 4000 for c in ex["source"]] + [EOS_ID]
    assert got.target(i).tolist() == [66_000 + ord(c) % 4000 for c in ex["target"]] + [EOS_ID]
