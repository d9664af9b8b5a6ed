"""Tiny fake WMT14 (de-en, fr-en) and Multi30k downloads served on 127.0.0.1.

`make_fakes()` builds archives with the member layout of every source TFDS's
`wmt14_translate` de-en and fr-en configs download (europarl v7, commoncrawl,
news-commentary v9 and UN tgz files, the giga-fren tar of `.gz` files, the
WMT19 `dev.tgz` with newstest2013 text and the newstest2014 `.sgm` files) and
the gzipped Multi30k raw files, from short texts that are kept as the oracle
(`Fakes.expected`).

`serving(fakes)` starts a loopback HTTP server holding them, routes every
HTTP(S) download of TFDS to it (the real URLs stay the keys of downloads and
checksums; nothing leaves the machine) and registers the fakes' sizes and
SHA-256 as the checksums of those URLs. Run any command under it with

    python -m tests.wmt_fakes [--lines=N] [--check_tf] -- <transformer.main flags>

e.g. `-- --mode=prepare --flagfile=experiments/paper/base_en_de.flags
--tfds_data_dir=/tmp/d`.

This module imports only the standard library at the top level.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import hashlib
import http.server
import io
import os
import sys
import tarfile
import threading
import urllib.parse
from typing import Iterator, Optional

STATMT = "http://www.statmt.org"
DEV_URL = "http://data.statmt.org/wmt19/translation-task/dev.tgz"
EUROPARL_URL = f"{STATMT}/wmt13/training-parallel-europarl-v7.tgz"
COMMONCRAWL_URL = f"{STATMT}/wmt13/training-parallel-commoncrawl.tgz"
NC_V9_URL = f"{STATMT}/wmt14/training-parallel-nc-v9.tgz"
UN_URL = f"{STATMT}/wmt13/training-parallel-un.tgz"
GIGAFREN_URL = f"{STATMT}/wmt10/training-giga-fren.tar"
MULTI30K_URL = "https://github.com/multi30k/dataset/raw/master/data/task1/raw"
MULTI30K_STEMS = {"train": "train", "validation": "val", "test": "test_2016_flickr"}

# The WMT14 sources of each split per language pair (TFDS's subsets that
# include the pair), and the URL holding each.
WMT14_SUBSETS = {
    "de": {"train": ["europarl_v7", "commoncrawl", "newscommentary_v9"],
           "validation": ["newstest2013"], "test": ["newstest2014"]},
    "fr": {"train": ["europarl_v7", "commoncrawl", "multiun", "newscommentary_v9",
                     "gigafren"],
           "validation": ["newstest2013"], "test": ["newstest2014"]},
}
SUBSET_URL = {"europarl_v7": EUROPARL_URL, "commoncrawl": COMMONCRAWL_URL,
              "newscommentary_v9": NC_V9_URL, "multiun": UN_URL,
              "gigafren": GIGAFREN_URL, "newstest2013": DEV_URL,
              "newstest2014": DEV_URL}
WMT14_URLS = sorted(set(SUBSET_URL.values()))
MULTI30K_URLS = sorted(f"{MULTI30K_URL}/{stem}.{lang}.gz"
                       for stem in MULTI30K_STEMS.values() for lang in ("en", "de"))

_WORDS = {"de": "Grüße aus Köln straße", "fr": "été déjà où ça", "en": "hello world today"}


@dataclasses.dataclass
class Fakes:
  """Served bytes per URL and the texts they hold.

  `expected[(pair, split)]` is the list of (foreign or de, en) sentence pairs
  of that split in file order; WMT pairs with an empty side are listed in
  `dropped` (TFDS skips them).
  """
  files: dict[str, bytes]
  expected: dict[tuple[str, str], list[tuple[str, str]]]
  dropped: dict[tuple[str, str], list[tuple[str, str]]]


def _sentences(tag: str, lang: str, n: int) -> list[str]:
  return [f"{tag} {lang} {i} {_WORDS[lang]}" + " x" * (i % 3) for i in range(n)]


def _text(lines: list[str]) -> bytes:
  return "".join(line + "\n" for line in lines).encode("utf-8")


def _tar(members: dict[str, bytes], compress: bool) -> bytes:
  buf = io.BytesIO()
  with tarfile.open(fileobj=buf, mode="w:gz" if compress else "w") as tar:
    dirs = sorted({os.path.dirname(n) for n in members} - {""})
    for d in dirs:  # directory entries, as in the real archives
      info = tarfile.TarInfo(d)
      info.type = tarfile.DIRTYPE
      info.mode = 0o755
      tar.addfile(info)
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      info.mode = 0o644
      tar.addfile(info, io.BytesIO(data))
  return buf.getvalue()


def _gzip(data: bytes) -> bytes:
  return gzip.compress(data, mtime=0)


def _sgm(setid: str, lang: str, sentences: list[str], docid: str) -> bytes:
  out = [f'<srcset setid="{setid}" srclang="any">',
         f'<doc sysid="ref" docid="{docid}" genre="news" origlang="{lang}">', "<p>"]
  out += [f'<seg id="{i + 1}">{s}</seg>' for i, s in enumerate(sentences)]
  out += ["</p>", "</doc>", "</srcset>"]
  return _text(out)


def make_fakes(lines: int = 4) -> Fakes:
  """All fake archives; each parallel file has `lines` (>= 3) sentences.

  In the training sources line 1 has an empty English side and line 2 an
  empty foreign side (TFDS drops such pairs); all other lines are kept.
  """
  if lines < 3:
    raise ValueError("lines must be >= 3")
  expected: dict[tuple[str, str], list[tuple[str, str]]] = {}
  dropped: dict[tuple[str, str], list[tuple[str, str]]] = {}
  members: dict[str, dict[str, bytes]] = {url: {} for url in WMT14_URLS}

  def pair(subset: str, xx: str, split: str) -> tuple[list[str], list[str]]:
    tag = subset if subset == "newstest2013" else f"{subset}-{xx}"  # one shared .en
    fx, en = _sentences(tag, xx, lines), _sentences(tag, "en", lines)
    if split == "train":
      en[1], fx[2] = "", ""
    for s, t in zip(fx, en):
      (expected if s and t else dropped).setdefault((f"{xx}-en", split), []).append((s, t))
    return fx, en

  for xx in ("de", "fr"):
    for split, subsets in WMT14_SUBSETS[xx].items():
      for subset in subsets:
        fx, en = pair(subset, xx, split)
        url = SUBSET_URL[subset]
        # Plain text files in the archive: '<stem>.<lang>' for lang in (xx, en).
        stem = {"europarl_v7": f"training/europarl-v7.{xx}-en",
                "commoncrawl": f"commoncrawl.{xx}-en",
                "newscommentary_v9": f"training/news-commentary-v9.{xx}-en",
                "multiun": f"un/undoc.2000.{xx}-en",
                "newstest2013": "dev/newstest2013"}.get(subset)  # the same English for both
        if stem is not None:
          members[url][f"{stem}.{xx}"], members[url][f"{stem}.en"] = _text(fx), _text(en)
        if subset == "commoncrawl":
          members[url][f"commoncrawl.{xx}-en.annotation"] = _text(["x"] * lines)
        elif subset == "gigafren":
          members[url]["giga-fren.release2.fixed.fr.gz"] = _gzip(_text(fx))
          members[url]["giga-fren.release2.fixed.en.gz"] = _gzip(_text(en))
        elif subset == "newstest2014":
          name = f"dev/newstest2014-{xx}en"
          members[url][f"{name}-src.{xx}.sgm"] = _sgm("newstest2014", xx, fx, "d1")
          members[url][f"{name}-ref.en.sgm"] = _sgm("newstest2014", "en", en, "d1")
          members[url][f"{name}-src.en.sgm"] = _sgm("newstest2014", "en", en, "d1")
          members[url][f"{name}-ref.{xx}.sgm"] = _sgm("newstest2014", xx, fx, "d1")
  files = {url: _tar(m, compress=not url.endswith(".tar")) for url, m in members.items()}

  for split, stem in MULTI30K_STEMS.items():
    en, de = _sentences(f"m30k-{stem}", "en", lines), _sentences(f"m30k-{stem}", "de", lines)
    files[f"{MULTI30K_URL}/{stem}.en.gz"] = _gzip(_text(en))
    files[f"{MULTI30K_URL}/{stem}.de.gz"] = _gzip(_text(de))
    expected[("multi30k", split)] = list(zip(de, en))
  return Fakes(files=files, expected=expected, dropped=dropped)


def corrupt_tgz(data: bytes) -> bytes:
  """A gzip stream cut in half: not a readable tgz."""
  return data[:len(data) // 2]


def garble_second_header(data: bytes) -> bytes:
  """A plain tar whose second member's header is overwritten: `tarfile` alone stops there
  without an error, after the first member."""
  with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
    offset = tar.getmembers()[1].offset
  return data[:offset] + b"garbage!" * 64 + data[offset + 512:]


def damage_gz_member(data: bytes) -> tuple[bytes, str]:
  """(the plain tar with its first `.gz` member cut in half, that member's name)."""
  with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
    members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
  name = next(n for n in members if n.endswith(".gz"))
  members[name] = members[name][:len(members[name]) // 2]
  return _tar(members, compress=False), name


class _Handler(http.server.BaseHTTPRequestHandler):
  """GET /<scheme>/<host>/<path> -> the fake bytes of that URL, or 404."""

  def do_GET(self):  # pylint: disable=invalid-name
    data = self.server.files.get(urllib.parse.unquote(self.path.lstrip("/")))
    if data is None:
      self.send_error(404)
      return
    self.send_response(200)
    self.send_header("Content-Type", "application/octet-stream")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def log_message(self, *args):  # quiet
    del args


def local_path(url: str) -> str:
  """'http://host/a/b' -> 'http/host/a/b' (the server's key)."""
  scheme, rest = url.split("://", 1)
  return f"{scheme}/{rest}"


def _url_info(data: bytes):
  from tensorflow_datasets.core.download import checksums  # pylint: disable=g-import-not-at-top
  return checksums.UrlInfo(size=len(data), checksum=hashlib.sha256(data).hexdigest(),
                           filename=None)


@contextlib.contextmanager
def serving(fakes: Fakes, registered: Optional[dict[str, bytes]] = None,
            served: Optional[dict[str, bytes]] = None,
            timeout_s: float = 900.0) -> Iterator[str]:
  """Serves the fakes on 127.0.0.1 and points TFDS at them; yields the base URL.

  Args:
    fakes: the archives.
    registered: bytes whose sizes/checksums are registered per URL (default
      `fakes.files`); differing from the served bytes makes a checksum error.
    served: bytes served per URL (default `fakes.files`).
    timeout_s: the server shuts itself down after this long.
  """
  from tensorflow_datasets.core.download import downloader  # pylint: disable=g-import-not-at-top
  from transformer.data import datasets  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets.translate.wmt14 as wmt14  # pylint: disable=g-import-not-at-top

  served = fakes.files if served is None else served
  registered = fakes.files if registered is None else registered
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  server.daemon_threads = True
  server.files = {local_path(u): d for u, d in served.items()}
  base = f"http://127.0.0.1:{server.server_address[1]}"
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  stopper = threading.Timer(timeout_s, server.shutdown)
  stopper.daemon = True
  stopper.start()

  original_open = downloader._open_url  # pylint: disable=protected-access

  def open_local(url: str, **kwargs):
    if not url.startswith(("http://", "https://")):
      raise ValueError(f"Only HTTP(S) URLs are faked, got {url}")
    return original_open(f"{base}/{local_path(url)}", **kwargs)

  infos = {u: _url_info(d) for u, d in registered.items()}
  patched = [(downloader, "_open_url", original_open)]
  for cls in (wmt14.Wmt14Translate, datasets.Multi30k):
    patched.append((cls, "url_infos", cls.__dict__.get("url_infos")))
  downloader._open_url = open_local  # pylint: disable=protected-access
  wmt14.Wmt14Translate.url_infos = {u: i for u, i in infos.items() if u in WMT14_URLS}
  datasets.Multi30k.url_infos = {u: i for u, i in infos.items() if u in MULTI30K_URLS}
  try:
    yield base
  finally:
    for obj, name, value in patched:
      if value is None:
        delattr(obj, name)
      else:
        setattr(obj, name, value)
    stopper.cancel()
    server.shutdown()
    server.server_close()


@contextlib.contextmanager
def stalling_in_test_split(marker: str, after: int = 1) -> Iterator[None]:
  """WMT14 preparation writes `marker` and sleeps once the test split (the last
  one generated) has yielded `after` examples: train and validation are then
  written, the dataset is not complete. For tests that kill it there."""
  import time  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets.translate.wmt14 as wmt14  # pylint: disable=g-import-not-at-top

  cls = wmt14.Wmt14Translate
  original = cls._generate_examples  # pylint: disable=protected-access

  def generate(self, split_subsets, extraction_map):
    for i, item in enumerate(original(self, split_subsets, extraction_map)):
      if "newstest2014" in split_subsets and i == after:
        with open(marker, "w") as f:
          f.write("stalled\n")
        time.sleep(600)
      yield item

  cls._generate_examples = generate  # pylint: disable=protected-access
  try:
    yield
  finally:
    cls._generate_examples = original  # pylint: disable=protected-access


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lines", type=int, default=4, help="sentences per fake file")
  parser.add_argument("--corrupt", action="append", default=[],
                      help="serve this URL's archive cut in half (checksum registered)")
  parser.add_argument("--bad_checksum", action="append", default=[],
                      help="register a wrong checksum for this URL")
  parser.add_argument("--garble_tar_header", action="append", default=[],
                      help="serve this URL's plain tar with its second header garbled"
                      " (checksum registered)")
  parser.add_argument("--damage_gz_member", action="append", default=[],
                      help="serve this URL's plain tar with its first .gz member cut in half"
                      " (checksum registered)")
  parser.add_argument("--stall_marker", default=None,
                      help="write this file and sleep inside the WMT14 test split")
  parser.add_argument("--check_tf", action="store_true",
                      help="exit non-zero if TensorFlow was imported")
  args, rest = parser.parse_known_args(argv)
  rest = [a for a in rest if a != "--"]
  from transformer import main as transformer_main  # pylint: disable=g-import-not-at-top
  fakes = make_fakes(args.lines)
  served = dict(fakes.files)
  registered = dict(fakes.files)
  for url in args.corrupt:
    served[url] = registered[url] = corrupt_tgz(fakes.files[url])
  for url in args.garble_tar_header:
    served[url] = registered[url] = garble_second_header(fakes.files[url])
  for url in args.damage_gz_member:
    served[url] = registered[url] = damage_gz_member(fakes.files[url])[0]
  for url in args.bad_checksum:
    registered[url] = fakes.files[url] + b"different"
  with contextlib.ExitStack() as stack:
    stack.enter_context(serving(fakes, registered=registered, served=served))
    if args.stall_marker:
      stack.enter_context(stalling_in_test_split(args.stall_marker))
    sys.argv = ["transformer.main"] + rest
    try:
      transformer_main.run_main()
    except SystemExit as e:
      if e.code not in (0, None):
        raise
  if args.check_tf and "tensorflow" in sys.modules:
    sys.exit("error: tensorflow was imported")


if __name__ == "__main__":
  main(sys.argv[1:])
