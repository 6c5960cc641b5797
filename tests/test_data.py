"""Data stage: tokenizer, .bin/.idx writing, packing into windows and the per-DP-rank batch layout."""

import json
from collections import Counter

import numpy
import pytest
import torch

from data.dataset import PackedDataset, get_micro_batch, num_micro_batches
from data.preprocess import (
    build_quickstart_corpus,
    build_synthetic_corpus,
    main,
    synthetic_documents,
    token_dtype,
    write_indexed,
)
from data.tokenizer import ByteTokenizer, build_tokenizer
from pretrain.errors import UserError


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
    assert str(error.value) == f"tokenizer '{missing}' not found: give 'byte' or a local tokenizer.json path"


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


# ---- packing -------------------------------------------------------------------------------------


def _stream(prefix):
    indexed = _indexed(prefix)
    return numpy.concatenate([indexed[i] for i in range(len(indexed))]).astype(numpy.int64)


def test_windows_cover_the_stream_exactly(synthetic_prefix):
    seq_length = 64
    ds = PackedDataset(synthetic_prefix, seq_length, seed=0)
    stream = _stream(synthetic_prefix)
    assert len(ds) == (len(stream) - 1) // seq_length
    windows = [ds.window(w) for w in range(len(ds))]
    assert all(w.dtype == numpy.int64 and w.shape == (seq_length + 1,) for w in windows)
    covered = numpy.concatenate([w[:-1] for w in windows])
    assert numpy.array_equal(covered, stream[: len(covered)])
    # the extra token of each window is the first of the next: every token is a label once
    assert all(windows[w][-1] == windows[w + 1][0] for w in range(len(ds) - 1))


def test_shuffle_is_a_deterministic_permutation_per_seed(counting_prefix):
    a, b, c = (PackedDataset(counting_prefix, 64, seed=s) for s in (3, 3, 4))
    order_a = [_window_id(a, i) for i in range(len(a))]
    assert order_a == [_window_id(b, i) for i in range(len(b))]
    assert order_a != [_window_id(c, i) for i in range(len(c))]
    assert sorted(order_a) == list(range(len(a)))


def _window_id(ds, i):
    """Which unshuffled window sample i is (unique in the counting corpus)."""
    sample = ds[i]
    matches = [w for w in range(len(ds)) if numpy.array_equal(ds.window(w), sample)]
    return matches[0]


def test_epoch_wrap_uses_a_new_permutation(counting_prefix):
    ds = PackedDataset(counting_prefix, 64, seed=0)
    n = len(ds)
    first = [tuple(ds[i]) for i in range(n)]
    second = [tuple(ds[n + i]) for i in range(n)]
    assert sorted(first) == sorted(second)  # same windows again
    assert first != second  # in another order
    assert numpy.array_equal(ds[n], ds.window(int(numpy.random.RandomState(1).permutation(n)[0])))


# ---- micro-batches -------------------------------------------------------------------------------


def _step_samples(ds, step, dp_size, micro_batch_size, global_batch_size):
    samples = Counter()
    for dp_rank in range(dp_size):
        for micro in range(num_micro_batches(micro_batch_size, dp_size, global_batch_size)):
            batch = get_micro_batch(ds, step, micro, dp_rank, dp_size, micro_batch_size, global_batch_size)
            samples.update(tuple(row) for row in batch["tokens"].tolist())
    return samples


@pytest.mark.parametrize("dp_size,micro_batch_size", [(2, 1), (2, 2), (4, 1), (4, 2)])
def test_a_step_holds_the_same_samples_for_any_dp_size(synthetic_prefix, dp_size, micro_batch_size):
    ds = PackedDataset(synthetic_prefix, 32, seed=0)
    for step in (0, 1, 7):
        reference = _step_samples(ds, step, 1, 1, 8)
        assert sum(reference.values()) == 8
        assert _step_samples(ds, step, dp_size, micro_batch_size, 8) == reference


def test_micro_batch_tensors(synthetic_prefix):
    import torch

    ds = PackedDataset(synthetic_prefix, 32, seed=0)
    batch = get_micro_batch(
        ds, step=2, micro_index=1, dp_rank=1, dp_size=2, micro_batch_size=2, global_batch_size=8
    )
    tokens, labels = batch["tokens"], batch["labels"]
    assert tokens.shape == labels.shape == batch["loss_mask"].shape == batch["position_ids"].shape == (2, 32)
    assert tokens.dtype == labels.dtype == batch["position_ids"].dtype == torch.int64
    assert batch["loss_mask"].dtype == torch.float32 and bool((batch["loss_mask"] == 1).all())
    assert torch.equal(batch["position_ids"][1], torch.arange(32))
    # step 2, micro 1, rank 1 of 2 with mbs 2 → samples 16 + 4 + 2 = 22, 23
    assert torch.equal(tokens[0], torch.from_numpy(ds[22][:-1]))
    assert torch.equal(labels[:, :-1], tokens[:, 1:])
    assert torch.equal(labels[1], torch.from_numpy(ds[23][1:]))


# ---- errors for people ---------------------------------------------------------------------------


def test_missing_bin_and_idx_are_named(tmp_path):
    prefix = str(tmp_path / "corpus")
    with pytest.raises(UserError) as error:
        PackedDataset(prefix, 16, seed=0)
    assert str(error.value) == (
        f"data file '{prefix}.bin' not found: build it with 'python -m data.preprocess' or fix the data path"
    )
    write_indexed([[1, 2, 3]], prefix, vocab_size=257)
    (tmp_path / "corpus.idx").unlink()
    with pytest.raises(UserError) as error:
        PackedDataset(prefix, 16, seed=0)
    assert str(error.value) == (
        f"data file '{prefix}.idx' not found: build it with 'python -m data.preprocess' or fix the data path"
    )


def test_too_small_corpus_names_file_and_sizes(tmp_path):
    prefix = str(tmp_path / "tiny")
    write_indexed([[1, 2, 3], [4]], prefix, vocab_size=257)  # 6 tokens with the EODs
    assert len(PackedDataset(prefix, 5, seed=0)) == 1
    with pytest.raises(UserError) as error:
        PackedDataset(prefix, 6, seed=0)
    assert str(error.value) == (
        f"data file '{prefix}.bin' holds 6 tokens, too few for one sample of seq_length 6 (needs 7): "
        "use more data or a shorter seq_length"
    )


def test_cli_text_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    assert main(["text", "--input", str(bad), "--output-prefix", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {bad}:2: no field 'text': choose the field with --text-key\n"
    assert main(["text", "--input", str(tmp_path / "*.txt"), "--output-prefix", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"error: input '{tmp_path / '*.txt'}' matches no file\n"


def test_cli_text_writes_jsonl_and_text(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text('{"text": "ab"}\n\n{"text": "c"}\n')
    (tmp_path / "b.txt").write_text("xyz")
    prefix = str(tmp_path / "out")
    inputs = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")]
    assert main(["text", "--input", *inputs, "--output-prefix", prefix]) == 0
    assert "3 documents, 9 tokens" in capsys.readouterr().out
    indexed = _indexed(prefix)  # kept alive: its arrays view a memory map closed on deletion
    assert [d.tolist() for d in indexed[0:3]] == [[97, 98, 256], [99, 256], [120, 121, 122, 256]]


# ---- quickstart corpus ---------------------------------------------------------------------------


def test_quickstart_corpus_builds_then_skips(tmp_path):
    prefix = str(tmp_path / "qs")
    stats = build_quickstart_corpus(prefix, max_bytes=50_000)
    assert not stats["skipped"] and stats["documents"] > 0
    assert stats["tokens"] - stats["documents"] <= 50_000  # bytes plus one EOD per document
    assert json.loads((tmp_path / "qs.json").read_text()) == {
        "documents": stats["documents"], "tokens": stats["tokens"], "max_bytes": 50_000
    }
    ds = PackedDataset(prefix, 128, seed=0)
    assert len(ds) == (stats["tokens"] - 1) // 128
    text = ByteTokenizer().detokenize(ds.window(0))
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
