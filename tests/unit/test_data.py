"""Data stage: tokenizer, .bin/.idx writing, packing into windows and the per-DP-rank batch layout."""

import json
from collections import Counter

import numpy
import pytest
import torch

from common.errors import UserError
from data.dataset import build_samples, open_indexed
from data.loader import BatchPlan
from data.preprocess import build_quickstart_corpus, build_synthetic_corpus, main, token_dtype, write_indexed
from data.sources import synthetic_documents
from data.tokenizer import ByteTokenizer, build_tokenizer


def _indexed(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(prefix))


@pytest.fixture(scope="module")
def synthetic_prefix(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("synthetic") / "syn")
    build_synthetic_corpus(prefix, num_docs=200, seed=0)
    return prefix


@pytest.fixture(scope="module")
def counting_prefix(tmp_path_factory):
    """Documents of distinct ids, so no two windows are equal and a sample tells which window it is."""
    prefix = str(tmp_path_factory.mktemp("counting") / "count")
    write_indexed([list(range(k * 100, k * 100 + 99)) for k in range(40)], prefix, vocab_size=5000, eod=4999)
    return prefix


# ---- tokenizer -----------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip():
    tokenizer = build_tokenizer("byte")
    text = "héllo, wörld → ∑ 🙂\n"
    ids = tokenizer.tokenize(text)
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.detokenize(ids + [tokenizer.eod]) == text
    assert (tokenizer.eod, tokenizer.vocab_size) == (256, 257)


def test_hf_tokenizer_from_local_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "hello": 1, "world": 2, "</s>": 3}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    tokenizer = build_tokenizer(str(tmp_path))  # a folder holding tokenizer.json
    assert tokenizer.tokenize("hello world") == [1, 2]
    assert (tokenizer.eod, tokenizer.vocab_size) == (3, 4)


def test_missing_tokenizer_path_is_a_user_error(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(UserError) as error:
        build_tokenizer(missing)
    assert (
        str(error.value) == f"tokenizer '{missing}' not found: give 'byte', a local tokenizer.json path or a hub name"
    )


# ---- synthetic documents and indexed files -------------------------------------------------------


def test_synthetic_documents_are_deterministic_and_learnable():
    first = list(synthetic_documents(50, seed=1))
    assert first == list(synthetic_documents(50, seed=1))
    assert first != list(synthetic_documents(50, seed=2))
    assert all(20 <= len(doc) <= 300 and max(doc) < 256 for doc in first)
    # few distinct ids → a unigram model alone beats the uniform 257-way loss by far
    assert len({token for doc in first for token in doc}) <= 27


def test_synthetic_stream_is_frozen():
    # Golden values: if these change, every golden loss of the trainer tests changes with them.
    docs = list(synthetic_documents(3, seed=0))
    assert [len(doc) for doc in docs] == [71, 246, 289]
    assert [sum(doc) for doc in docs] == [6962, 24817, 28122]
    assert ByteTokenizer().detokenize(docs[0][:16]) == "nlyq nlyq nlyu n"


def test_write_indexed_reads_back_document_by_document(tmp_path):
    docs = [[1, 2, 3], [], [255, 0], list(range(100))]
    stats = write_indexed(docs, str(tmp_path / "doc"), vocab_size=257, eod=256)
    assert stats == {"documents": 4, "tokens": sum(len(d) + 1 for d in docs)}
    indexed = _indexed(tmp_path / "doc")
    assert len(indexed) == len(docs)
    assert indexed.index.dtype == numpy.uint16
    for i, doc in enumerate(docs):
        assert indexed[i].tolist() == doc + [256]


def test_token_dtype_rule(tmp_path):
    assert token_dtype(257) == numpy.uint16
    assert token_dtype(65499) == numpy.uint16
    assert token_dtype(65500) == numpy.int32
    write_indexed([[70000, 1]], str(tmp_path / "wide"), vocab_size=100_000, eod=99_999)
    indexed = _indexed(tmp_path / "wide")
    assert indexed.index.dtype == numpy.int32
    assert indexed[0].tolist() == [70000, 1, 99_999]


# ---- packing (megatron-core GPTDataset, one epoch, endless) --------------------------------------


def _samples(
    prefix,
    seq_length,
    tmp_path,
    seed=0,
    split="100,0,0",
    eod=4999,
    vocab_size=5000,
    eod_mask_loss=False,
    blend=None,
    valid=(),
):
    """{'train': BlendedSamples, ...} of `prefix` (or of a weighted `blend`), indices cached under tmp."""
    blend = blend or [(1.0, str(prefix))]
    return build_samples(
        blend, list(valid), split, seq_length, seed, eod, eod_mask_loss, str(tmp_path / "cache"), vocab_size
    )


def _ids(samples, count):
    """The identity (source, GPTDataset position) of samples 0..count-1 of a BlendedSamples."""
    out = []
    for i in range(count):
        source, j = samples.locate(i)
        out.append((source, samples.sources[source].position(j)))
    return out


def test_samples_pack_every_document_once_with_its_eod(counting_prefix, tmp_path):
    seq_length = 64
    train = _samples(counting_prefix, seq_length, tmp_path)["train"]
    source = train.sources[0]
    total = 40 * 100  # 40 documents of 99 distinct ids + EOD
    assert len(source) == (total - 1) // seq_length
    labels = []
    for j in range(len(source)):
        sample = source[j]
        assert sample["tokens"].shape == sample["labels"].shape == (seq_length,)
        assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
        assert torch.equal(sample["position_ids"], torch.arange(seq_length))
        labels += sample["labels"].tolist()
    counts = Counter(labels)
    # every document token is a label at most once; only the tail that fills no sample is left out
    assert max(n for token, n in counts.items() if token != 4999) == 1
    assert total - len(labels) <= seq_length and counts[4999] >= 40 - 1


def test_sample_order_is_deterministic_per_seed(counting_prefix, tmp_path):
    a = _samples(counting_prefix, 64, tmp_path / "a", seed=3)["train"]
    b = _samples(counting_prefix, 64, tmp_path / "b", seed=3)["train"]  # built afresh, own cache
    b_cached = _samples(counting_prefix, 64, tmp_path / "b", seed=3)["train"]  # loaded from the cache
    c = _samples(counting_prefix, 64, tmp_path / "c", seed=4)["train"]
    n = len(a.sources[0])
    first = [a[i]["tokens"].tolist() for i in range(2 * n)]
    assert first == [b[i]["tokens"].tolist() for i in range(2 * n)]
    assert first == [b_cached[i]["tokens"].tolist() for i in range(2 * n)]
    assert first[:n] != [c[i]["tokens"].tolist() for i in range(n)]
    # epoch 2 visits the same windows in another order
    assert sorted(first[:n]) == sorted(first[n:]) and first[:n] != first[n:]


def test_a_corpus_rebuilt_under_the_same_prefix_gets_fresh_indices(tmp_path):
    prefix = str(tmp_path / "corpus")
    write_indexed([[1] * 40] * 10, prefix, vocab_size=257, eod=256)
    assert len(_samples(prefix, 16, tmp_path, eod=256, vocab_size=257)["train"].sources[0]) == 25
    write_indexed([[2] * 40] * 30, prefix, vocab_size=257, eod=256)  # same path, same cache folder
    rebuilt = _samples(prefix, 16, tmp_path, eod=256, vocab_size=257)["train"].sources[0]
    assert len(rebuilt) == 76 and set(rebuilt[75]["tokens"].tolist()) <= {2, 256}


def test_split_shares_are_disjoint_document_ranges(counting_prefix, tmp_path):
    data = _samples(counting_prefix, 32, tmp_path, split="80,20,0")
    assert set(data) == {"train", "valid"}
    seen = {}
    for name, samples in data.items():
        source = samples.sources[0]
        seen[name] = {t // 100 for j in range(len(source)) for t in source[j]["tokens"].tolist() if t != 4999}
    assert seen["train"] == set(range(32)) and seen["valid"] == set(range(32, 40))


def test_test_share_is_read_only_when_asked_for(counting_prefix, tmp_path):
    assert set(_samples(counting_prefix, 32, tmp_path / "a", split="70,20,10")) == {"train", "valid"}
    data = build_samples(
        [(1.0, counting_prefix)], [], "70,20,10", 32, 0, 4999, False, str(tmp_path / "b"), 5000, with_test=True
    )
    seen = {}
    for name, samples in data.items():
        source = samples.sources[0]
        seen[name] = {t // 100 for j in range(len(source)) for t in source[j]["tokens"].tolist() if t != 4999}
    assert seen == {"train": set(range(28)), "valid": set(range(28, 36)), "test": set(range(36, 40))}


def test_separate_validation_blend(counting_prefix, tmp_path):
    other = str(tmp_path / "other")
    write_indexed([[7] * 63] * 20, other, vocab_size=5000, eod=4999)
    data = _samples(counting_prefix, 32, tmp_path, valid=[(1.0, other), (3.0, counting_prefix)])
    train, valid = data["train"], data["valid"]
    assert [s.prefix for s in train.sources] == [counting_prefix]
    assert len(train.sources[0]) == (40 * 100 - 1) // 32  # the train data keeps every document
    assert [s.prefix for s in valid.sources] == [other, counting_prefix]
    assert Counter(valid.locate(i)[0] for i in range(400)) == {0: 100, 1: 300}


def test_blend_shares_follow_the_weights(tmp_path):
    """Over N samples each dataset's count is within 1 sample of weight × N (greedy blending), also
    when a small dataset wraps into later epochs."""
    prefixes = []
    for k, docs in enumerate((30, 10, 200)):
        prefixes.append(str(tmp_path / f"d{k}"))
        write_indexed([[k] * 63] * docs, prefixes[-1], vocab_size=257, eod=256)
    weights = (0.5, 0.3, 0.2)
    train = _samples(None, 16, tmp_path, eod=256, vocab_size=257, blend=list(zip(weights, prefixes)))["train"]
    n = 5000
    counts = Counter(train.locate(i)[0] for i in range(n))
    for k, weight in enumerate(weights):
        assert abs(counts[k] - weight * n) <= 1, (k, counts)
    assert {int(train[i]["tokens"][0]) for i in range(30) if train.locate(i)[0] == 1} == {1}
    assert len(train.sources[1]) < counts[1]  # dataset 1 was read for more than one epoch


def test_blend_of_a_sample_does_not_depend_on_how_far_the_run_goes(tmp_path):
    prefixes = [str(tmp_path / "a"), str(tmp_path / "b")]
    for k, prefix in enumerate(prefixes):
        write_indexed([[k] * 31] * 50, prefix, vocab_size=257, eod=256)
    blend = [(0.7, prefixes[0]), (0.3, prefixes[1])]
    short = _samples(None, 16, tmp_path, eod=256, vocab_size=257, blend=blend)["train"]
    far = _samples(None, 16, tmp_path, eod=256, vocab_size=257, blend=blend)["train"]
    far.locate(100_000)  # a long run builds the blending table far ahead first
    assert _ids(short, 3000) == _ids(far, 3000)


def _consumed(train, steps, first, dp_size, micro_batch_size=2, global_batch_size=8):
    """Sample identities each step reads, gathered over all DP ranks and micro-batches."""
    per_step = []
    for step in range(steps):
        ids = []
        for dp_rank in range(dp_size):
            plan = BatchPlan(global_batch_size, micro_batch_size, dp_size, dp_rank)
            for m in range(plan.micro_batches):
                start = first + step * global_batch_size
                for i in plan.indices(start, m):
                    source, j = train.locate(i)
                    ids.append((source, train.sources[source].position(j), i))
        per_step.append(sorted(ids))
    return per_step


@pytest.mark.parametrize("resume_dp", [1, 2, 4])
def test_resume_reads_exactly_the_uninterrupted_samples(tmp_path, resume_dp):
    """Steps 1..2k at DP=2 read the same samples, step by step, as steps 1..k at DP=2 then k+1..2k
    resumed at `resume_dp` from consumed_samples = k × global batch: no repeat, no skip."""
    prefixes = [str(tmp_path / "a"), str(tmp_path / "b")]
    for k, prefix in enumerate(prefixes):
        write_indexed([[k] * 40] * 30, prefix, vocab_size=257, eod=256)
    blend = [(0.6, prefixes[0]), (0.4, prefixes[1])]
    k, gbs = 12, 8  # 24 steps of 8: past one epoch of each dataset
    uninterrupted = _consumed(
        _samples(None, 16, tmp_path / "x", eod=256, vocab_size=257, blend=blend)["train"], 2 * k, 0, dp_size=2
    )
    train = _samples(None, 16, tmp_path / "y", eod=256, vocab_size=257, blend=blend)["train"]
    first_half = _consumed(train, k, 0, dp_size=2)
    resumed = _consumed(train, k, first=k * gbs, dp_size=resume_dp)
    assert first_half + resumed == uninterrupted
    indices = [i for step in uninterrupted for (_, _, i) in step]
    assert sorted(indices) == list(range(2 * k * gbs))


def test_micro_batch_tensors_and_eod_mask_loss(synthetic_prefix, tmp_path):
    train = _samples(synthetic_prefix, 32, tmp_path, eod=256, vocab_size=257, eod_mask_loss=True)["train"]
    batch = BatchPlan(global_batch_size=8, micro_batch_size=2, dp_size=2, dp_rank=1).whole_batch(train, 16, 1)
    tokens, labels, loss_mask = batch["tokens"], batch["labels"], batch["loss_mask"]
    assert tokens.shape == labels.shape == loss_mask.shape == batch["position_ids"].shape == (2, 32)
    assert tokens.dtype == labels.dtype == batch["position_ids"].dtype == torch.int64
    assert loss_mask.dtype == torch.float32
    # first sample 16, micro 1, rank 1 of 2 with mbs 2 → samples 16 + 4 + 2 = 22, 23
    assert torch.equal(tokens[0], train[22]["tokens"]) and torch.equal(labels[1], train[23]["labels"])
    assert torch.equal(loss_mask, (tokens != 256).float())  # no loss on predictions made at EOD


@pytest.mark.parametrize("workers", [0, 2])
def test_prefetching_loader_hands_out_what_the_training_process_builds(synthetic_prefix, tmp_path, workers):
    """data.num_workers: worker processes build exactly the data-parallel micro-batch + the CP slice,
    step by step, from a resumed step's first sample on; a step asked for out of order is refused."""
    from data.loader import PrefetchingLoader

    train = _samples(synthetic_prefix, 32, tmp_path, eod=256, vocab_size=257)["train"]
    share = BatchPlan(global_batch_size=8, micro_batch_size=2, dp_size=2, dp_rank=1, cp_size=2, cp_rank=1)
    first, steps = 24, 3  # resumed after 3 steps of 8 samples
    loader = PrefetchingLoader(train, share, first, steps, workers, torch.device("cpu"))
    for step in range(steps):
        start = first + step * 8
        got = loader.step_batches(start)
        assert len(got) == 2  # 8 samples / (2 per micro-batch × 2 DP ranks)
        for m, batch in enumerate(got):
            whole = share.whole_batch(train, start, m)
            for key, value in batch.items():
                assert value.shape == (2, 16)  # the CP rank's half of each 32-token sample
                chunks = whole[key].view(2, 4, 8)  # 2·cp chunks; CP rank 1 of 2 holds chunks 1 and 2
                assert torch.equal(value, torch.cat((chunks[:, 1], chunks[:, 2]), 1)), (step, m, key)
    loader.close()
    loader = PrefetchingLoader(train, share, first, steps, workers, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="data loader is at sample 24, the step asked for sample 32"):
        loader.step_batches(32)


# ---- errors for people ---------------------------------------------------------------------------


def test_missing_bin_and_idx_are_named(tmp_path):
    prefix = str(tmp_path / "corpus")
    with pytest.raises(UserError) as error:
        open_indexed(prefix)
    assert str(error.value) == (
        f"data file '{prefix}.bin' not found: build it with 'python -m data.preprocess text --input FILES "
        f"--output-prefix {prefix}', or fix the data path"
    )
    write_indexed([[1, 2, 3]], prefix, vocab_size=257)
    (tmp_path / "corpus.idx").unlink()
    with pytest.raises(UserError) as error:
        open_indexed(prefix)
    assert str(error.value) == (
        f"data file '{prefix}.idx' not found: build it with 'python -m data.preprocess text --input FILES "
        f"--output-prefix {prefix}', or fix the data path"
    )


def test_truncated_bin_and_idx_are_named(tmp_path):
    prefix = str(tmp_path / "corpus")
    write_indexed([[1, 2, 3], [4, 5]], prefix, vocab_size=257)  # 7 uint16 tokens = 14 bytes
    whole = (tmp_path / "corpus.bin").read_bytes()
    (tmp_path / "corpus.bin").write_bytes(whole[:10])
    with pytest.raises(UserError) as error:
        open_indexed(prefix)
    assert str(error.value) == (
        f"data file '{prefix}.bin' holds 10 bytes but '{prefix}.idx' describes 14: one of them is truncated "
        "or from another build; rebuild both with 'python -m data.preprocess'"
    )
    (tmp_path / "corpus.bin").write_bytes(whole)
    index = (tmp_path / "corpus.idx").read_bytes()
    (tmp_path / "corpus.idx").write_bytes(index[: len(index) // 2])
    with pytest.raises(UserError) as error:
        open_indexed(prefix)
    assert str(error.value) == (
        f"data file '{prefix}.idx' is truncated or not a megatron-core index: rebuild it with "
        "'python -m data.preprocess'"
    )


def test_tokenizer_vocabulary_larger_than_the_file_dtype(tmp_path):
    prefix = str(tmp_path / "narrow")
    write_indexed([[1, 2]], prefix, vocab_size=257)
    with pytest.raises(UserError) as error:
        _samples(prefix, 2, tmp_path, vocab_size=100_000)
    assert str(error.value) == (
        f"data file '{prefix}.bin' stores uint16 token ids (< 65536) but the tokenizer has 100000 ids: it was "
        "built for another tokenizer; rebuild it with 'python -m data.preprocess' and this tokenizer"
    )


def test_too_small_corpus_or_share_names_file_and_sizes(tmp_path):
    prefix = str(tmp_path / "tiny")
    write_indexed([[1, 2, 3], [4]], prefix, vocab_size=257)  # 6 tokens with the EODs
    assert len(_samples(prefix, 5, tmp_path, eod=256, vocab_size=257)["train"].sources[0]) == 1
    with pytest.raises(UserError) as error:
        _samples(prefix, 6, tmp_path, eod=256, vocab_size=257)
    assert str(error.value) == (
        f"data file '{prefix}.bin' holds 6 tokens, too few for one sample of seq_length 6 (needs 7): "
        "use more data or a shorter seq_length"
    )
    with pytest.raises(UserError) as error:
        _samples(prefix, 2, tmp_path, eod=256, vocab_size=257, split="98,2,0")
    assert str(error.value) == (
        f"data file '{prefix}.bin': its valid share (data.split '98,2,0') holds 0 tokens, too few for one "
        "sample of seq_length 2 (needs 3): use more data or a shorter seq_length"
    )


def test_cli_text_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    assert main(["text", "--input", str(bad), "--output-prefix", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        f"error: {bad}: line 2: no text in field 'text' (fields: body): choose the field with --text-key\n"
    )
    assert not list(tmp_path.glob("out*"))  # nothing half-written is left behind
    assert main(["text", "--input", str(tmp_path / "*.txt"), "--output-prefix", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"error: input '{tmp_path / '*.txt'}' matches no file\n"
    missing = tmp_path / "missing.jsonl"
    assert main(["text", "--input", str(missing), "--output-prefix", str(tmp_path / "o")]) == 2
    assert (
        capsys.readouterr().err
        == f"error: input '{missing}' not found: give files, globs or folders saved by datasets\n"
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["text", "--input", str(empty), "--output-prefix", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == "error: the input holds no documents: nothing to write\n"
    assert not list(tmp_path.glob("o.*"))


def test_cli_text_writes_jsonl_and_text(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text('{"text": "ab"}\n\n{"text": ""}\n{"text": "c"}\n')  # empty: left out
    (tmp_path / "b.txt").write_text("xyz\nsecond line")
    prefix = str(tmp_path / "out")
    inputs = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")]
    assert main(["text", "--input", *inputs, "--output-prefix", prefix]) == 0
    assert "3 documents, 21 tokens" in capsys.readouterr().out
    indexed = _indexed(prefix)  # kept alive: its arrays view a memory map closed on deletion
    assert [d.tolist() for d in indexed[0:2]] == [[97, 98, 256], [99, 256]]
    assert bytes(indexed[2][:-1].tolist()) == b"xyz\nsecond line"  # a text file is one document


def test_cli_text_reads_json_and_arrow_files(tmp_path, capsys):
    """A .json file (a JSON array of rows) and an Arrow IPC stream file (as `datasets` saves them)
    give the same documents as the .jsonl of the same rows."""
    import json

    import pyarrow

    rows = [{"text": "ab", "id": 1}, {"text": "c", "id": 2}, {"text": "def", "id": 3}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    table = pyarrow.table({"text": [r["text"] for r in rows], "id": [r["id"] for r in rows]})
    with pyarrow.OSFile(str(tmp_path / "rows.arrow"), "wb") as sink, pyarrow.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    documents = {}
    for name in ("rows.jsonl", "rows.json", "rows.arrow"):
        prefix = str(tmp_path / name.replace(".", "_"))
        assert main(["text", "--input", str(tmp_path / name), "--output-prefix", prefix]) == 0, capsys.readouterr()
        indexed = _indexed(prefix)
        documents[name] = [indexed[i].tolist() for i in range(len(indexed))]
    assert documents["rows.json"] == documents["rows.arrow"] == documents["rows.jsonl"]
    assert documents["rows.jsonl"] == [[97, 98, 256], [99, 256], [100, 101, 102, 256]]


def test_hf_dataset_by_name(tmp_path, capsys):
    """--hf-dataset goes through datasets.load_dataset(NAME, streaming=True); a dataset folder is a
    name it resolves without the network."""
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text('{"text": "hub"}\n{"text": "row"}\n')
    prefix = str(tmp_path / "hub")
    assert main(["text", "--hf-dataset", str(tmp_path / "ds"), "--output-prefix", prefix]) == 0
    assert "2 documents, 8 tokens" in capsys.readouterr().out
    assert main(["text", "--output-prefix", prefix]) == 2
    assert capsys.readouterr().err == "error: give --input files or --hf-dataset NAME\n"


def test_round_trip_trained_bpe_two_workers(tmp_path, capsys):
    """jsonl + parquet documents → a BPE trained on them → 2 tokenizer processes → .bin/.idx that
    megatron-core's IndexedDataset reads back as exactly the tokenizer's ids plus one EOD each."""
    import pyarrow
    import pyarrow.parquet

    texts = [f"document {i}: " + "naïve café, ünïcode → ∑ " * (i % 7) + "end" for i in range(600)]
    with open(tmp_path / "part1.jsonl", "w") as file:
        for text in texts[:400]:
            file.write(json.dumps({"id": 1, "content": text}) + "\n")
    pyarrow.parquet.write_table(pyarrow.table({"content": texts[400:]}), tmp_path / "part2.parquet")
    prefix = str(tmp_path / "out" / "corpus")
    argv = [
        "text",
        "--input",
        str(tmp_path / "part1.jsonl"),
        str(tmp_path / "*.parquet"),
        "--text-key",
        "content",
        "--train-tokenizer",
        "400",
        "--workers",
        "2",
        "--output-prefix",
        prefix,
    ]
    assert main(argv) == 0
    assert f"(tokenizer {tmp_path / 'out' / 'tokenizer.json'})" in capsys.readouterr().out
    tokenizer = build_tokenizer(str(tmp_path / "out"))
    assert tokenizer.vocab_size == 400 and tokenizer.eod == 0  # <|endoftext|>, the only special token
    indexed = _indexed(prefix)
    assert len(indexed) == len(texts) and indexed.index.dtype == numpy.uint16
    for i, text in enumerate(texts):
        ids = tokenizer.tokenize(text)
        assert indexed[i].tolist() == ids + [tokenizer.eod]
        assert tokenizer.detokenize(ids) == text


def _setup(tmp_path, tokenizer, name="tok"):
    from data.parts import WorkerSetup

    (tmp_path / "parts").mkdir(parents=True, exist_ok=True)
    return WorkerSetup(tokenizer, name, "text", str(tmp_path / "parts"), "uint16")


def test_pool_workers_get_the_parents_tokenizer(tmp_path):
    """The tokenizer is built once: the pool's processes get the parent's copy and never build their
    own from the name (which for a hub name asks the hub once per worker). Its file is gone here
    before the pool starts, and the workers still tokenize exactly as one process does."""
    import os

    from data.inputs import Block
    from data.parts import Progress, run_parts
    from data.preprocess import train_bpe_tokenizer

    texts = [f"document {i}: " + "naïve café " * (i % 5) for i in range(40)]
    path = train_bpe_tokenizer(iter(texts), 300, str(tmp_path / "tokenizer.json"))
    tokenizer = build_tokenizer(path)
    os.remove(path)
    blocks = [Block(f"{i:05d}", "texts", "texts", texts[i : i + 7], 1, 0) for i in range(0, 40, 7)]
    results = {}
    for workers in (1, 2):
        setup = _setup(tmp_path / str(workers), tokenizer, path)
        names = run_parts(iter(blocks), {}, setup, workers, Progress(0, False))
        assert names == [block.name for block in blocks]
        results[workers] = [(tmp_path / str(workers) / "parts" / f"{n}.bin").read_bytes() for n in names]
    assert results[1] == results[2]
    assert numpy.frombuffer(results[1][0], numpy.uint16).tolist()[-1] == tokenizer.eod


def test_tokenization_streams_with_bounded_read_ahead(tmp_path):
    """A streamed input is pulled only as far as the workers keep up: never more than
    workers × IN_FLIGHT_PER_WORKER parts read but not yet done."""
    from data.inputs import Block
    from data.parts import IN_FLIGHT_PER_WORKER, Progress, run_parts

    done: dict = {}
    ahead = []

    def stream():
        for number in range(60):
            ahead.append(number - len(done))
            yield Block(f"{number:05d}", "endless", "texts", ["some text"] * 50, 1, 0)

    run_parts(stream(), done, _setup(tmp_path, ByteTokenizer()), 2, Progress(0, False))
    assert len(done) == 60 and max(ahead) <= 2 * IN_FLIGHT_PER_WORKER


# ---- quickstart corpus ---------------------------------------------------------------------------


def test_quickstart_corpus_builds_then_skips(tmp_path):
    prefix = str(tmp_path / "qs")
    stats = build_quickstart_corpus(prefix, max_bytes=50_000)
    assert not stats["skipped"] and stats["documents"] > 0
    assert stats["tokens"] - stats["documents"] <= 50_000  # bytes plus one EOD per document
    assert json.loads((tmp_path / "qs.json").read_text()) == {
        "documents": stats["documents"],
        "tokens": stats["tokens"],
        "max_bytes": 50_000,
    }
    source = _samples(prefix, 128, tmp_path, eod=256, vocab_size=257)["train"].sources[0]
    assert len(source) == (stats["tokens"] - 1) // 128
    text = ByteTokenizer().detokenize(source[0]["tokens"].tolist())
    assert text.isprintable() or "\n" in text
    mtime = (tmp_path / "qs.bin").stat().st_mtime_ns
    again = build_quickstart_corpus(prefix, max_bytes=50_000)
    assert again["skipped"] and again["tokens"] == stats["tokens"]
    assert (tmp_path / "qs.bin").stat().st_mtime_ns == mtime
    assert not build_quickstart_corpus(prefix, max_bytes=40_000)["skipped"]  # other size → rebuild


def test_context_parallel_slices_are_load_balanced_and_cover_the_sequence():
    from data.dataset import slice_for_context_parallel

    tokens = torch.arange(2 * 16).view(2, 16)
    batch = {"tokens": tokens, "labels": tokens + 1}
    cp = 4
    parts = [slice_for_context_parallel(batch, r, cp) for r in range(cp)]
    # Rank 0 holds chunks 0 and 7 (of 8 chunks of 2 positions), rank 3 chunks 3 and 4.
    assert parts[0]["tokens"][0].tolist() == [0, 1, 14, 15]
    assert parts[3]["tokens"][0].tolist() == [6, 7, 8, 9]
    assert torch.equal(parts[1]["labels"], parts[1]["tokens"] + 1)
    joined = torch.cat([p["tokens"] for p in parts], dim=1)
    assert sorted(joined[1].tolist()) == tokens[1].tolist()
    assert slice_for_context_parallel(batch, 0, 1) is batch


def test_masked_training_data_has_unequal_token_counts(synthetic_corpus, tmp_path):
    """What the layout and resume tests train on (tests/helpers/runs.py:MASKED): the loss-token
    counts differ between the micro-batches of a step, between data-parallel ranks and between
    context-parallel slices, so only per-token normalization gives every layout the same loss."""
    train = _samples(
        synthetic_corpus, 128, tmp_path, seed=1234, split="90,10,0", eod=256, vocab_size=257, eod_mask_loss=True
    )["train"]
    for dp, cp in ((1, 1), (2, 1), (1, 2), (2, 2)):
        counts = []
        for dp_rank in range(dp):
            for cp_rank in range(cp):
                plan = BatchPlan(8, 2, dp, dp_rank, cp, cp_rank)
                counts += [int(plan.batch(train, 0, m)["loss_mask"].sum()) for m in range(plan.micro_batches)]
        assert len(set(counts)) > 1, (dp, cp, counts)
