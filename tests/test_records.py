"""Webdataset tar shards and array_record files: indexing, conversion, and reading from 2 real
processes with workers, each record exactly once per epoch."""
import collections
import io
import json
import os
import subprocess
import sys
import tarfile

import msgpack
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from PIL import Image

from mmjax.data import records, write_records
from mmjax.errors import BadImageError, DataError
from tests.test_multiprocess import REPO, _env, _free_port

GOOD = 9  # Samples 0..8 are readable; sample 9's image is corrupt; "orphan" has no image.


def _png(k):
  buffer = io.BytesIO()
  Image.fromarray(np.full((12, 16, 3), 20 * k, np.uint8)).save(buffer, "PNG")
  return buffer.getvalue()


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  """Three img2dataset-style shards (4 + 4 + 3 entries): .png with .txt or .json captions."""
  root = tmp_path_factory.mktemp("wds")
  layout = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, "orphan"]]
  for s, keys in enumerate(layout):
    with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
      for k in keys:
        key = f"{s:05d}{k:04d}" if isinstance(k, int) else k
        if k == "orphan":
          _add(tar, f"{key}.json", b'{"caption": "no image"}')
          continue
        _add(tar, f"{key}.png", _png(k) if k != 9 else b"\x89PNG broken")
        if k % 2:
          _add(tar, f"{key}.json", json.dumps({"caption": f"sample {k}", "url": "http://x"}).encode())
        else:
          _add(tar, f"{key}.txt", f"sample {k}\n".encode())
  return str(root / "*.tar")


def test_webdataset_source_indexes_and_decodes(shards):
  src = records.WebDatasetSource(shards)
  assert len(src) == 10 and src.incomplete == 1
  for k in range(GOOD):
    assert src[k]["caption"] == f"sample {k}"
    np.testing.assert_array_equal(src[k]["image"], np.full((12, 16, 3), 20 * k, np.uint8))
  assert src[9] is None
  with pytest.raises(BadImageError, match=r"00002\.tar:000020009"):
    records.WebDatasetSource(shards, on_bad_image="raise")[9]
  with pytest.raises(DataError, match="no tar files match"):
    records.WebDatasetSource(shards + ".missing")


def test_convert_to_array_record(shards, tmp_path):
  out = tmp_path / "ar"
  # 10 indexed samples, 9 readable: 3 shards of 3 (the names count shards actually written).
  write_records.main(["--from", "webdataset", "--source", shards, "--out", str(out), "--records_per_shard", "3"])
  assert sorted(os.listdir(out)) == [f"data-{i:05d}-of-00003.array_record" for i in range(3)]
  src = records.ArrayRecordSource(str(out / "*.array_record"))
  wds = records.WebDatasetSource(shards)
  assert len(src) == GOOD
  for k in range(GOOD):
    assert src[k]["caption"] == wds[k]["caption"]
    np.testing.assert_array_equal(src[k]["image"], wds[k]["image"])
  # A caption folder converts the same way; its missing image is skipped and counted.
  (tmp_path / "a.png").write_bytes(_png(3))
  captions = tmp_path / "caps.jsonl"
  captions.write_text('{"image": "a.png", "caption": "three"}\n{"image": "gone.png", "caption": "x"}\n')
  messages = []
  result = write_records.convert("folder", str(captions), str(tmp_path / "ar2"), log=messages.append)
  assert result == {"written": 1, "skipped": 1, "shards": 1}
  assert any("gone.png: cannot read file" in m for m in messages)
  assert records.ArrayRecordSource(str(tmp_path / "ar2" / "*"))[0]["caption"] == "three"


def test_malformed_captions_and_records_raise_data_errors_naming_them(tmp_path):
  with tarfile.open(tmp_path / "bad.tar", "w") as tar:
    for key, ext, caption in (("latin1", "txt", "caf\xe9".encode("latin-1")),
                              ("surrogate", "json", b'{"caption": "a \\ud800 b"}'),
                              ("number", "json", b'{"caption": 7}')):
      _add(tar, f"{key}.png", _png(1))
      _add(tar, f"{key}.{ext}", caption)
  src = records.WebDatasetSource(str(tmp_path / "bad.tar"))
  reasons = [r"bad\.tar:latin1\.txt: not UTF-8 text", r"bad\.tar:surrogate\.json: .caption. 'a \\ud800 b': not valid",
             r'bad\.tar:number\.json: "caption" 7: expected a string']
  assert len(src) == len(reasons)
  for i, reason in enumerate(reasons):  # In the order of the shard.
    with pytest.raises(DataError, match=reason):
      src[i]
  # array_record records whose fields have the wrong types.
  writer = ArrayRecordWriter(str(tmp_path / "bad.array_record"), "group_size:1")
  for record in ({"image": 5, "caption": "x"}, {"image": _png(1), "caption": b"x"}, [1, 2], "text"):
    writer.write(msgpack.packb(record, use_bin_type=True))
  writer.close()
  src = records.ArrayRecordSource(str(tmp_path / "bad.array_record"))
  for i in range(4):
    with pytest.raises(DataError, match=rf"bad\.array_record: record {i} is not an mmjax image-caption record"):
      src[i]


READER = """
import json, sys
import jax
from mmjax import parallel
from mmjax.data import pipeline
port, pid, kind, shards, out = sys.argv[1:]
parallel.initialize(f"localhost:{port}", 2, int(pid))
source = pipeline.make_source(dict(source=kind, shards=shards))
loader = pipeline.Loader(source, tokenizer=None, image_size=8, max_len=0, global_batch_size=4, seed=0,
                         num_epochs=1, drop_remainder=False, worker_count=2)
seen = [c for b in loader for c, v in zip(b["caption"].tolist(), b["valid"].tolist()) if v]
json.dump(seen, open(out, "w"))
"""


@pytest.mark.slow
def test_two_processes_with_workers_read_every_record_once(shards, tmp_path):
  ar = tmp_path / "ar"
  write_records.convert("webdataset", shards, str(ar), records_per_shard=4, log=lambda *_: None)
  for kind, pattern in (("webdataset", shards), ("array_record", str(ar / "*.array_record"))):
    port = _free_port()
    outs = [tmp_path / f"{kind}{p}.json" for p in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", READER, str(port), str(p), kind, pattern, str(outs[p])],
                              cwd=REPO, env=_env(1), stderr=subprocess.PIPE, text=True) for p in range(2)]
    for proc in procs:
      assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    per_process = [json.load(open(o)) for o in outs]
    assert all(per_process)  # 3 shards, 2 processes x 2 workers: both processes got records.
    counts = collections.Counter(per_process[0] + per_process[1])
    assert counts == {f"sample {k}": 1 for k in range(GOOD)}, kind
