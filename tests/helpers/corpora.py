"""Small text corpora for the preprocessing tests: the same rows as jsonl, compressed jsonl, parquet,
a saved `datasets` folder; a BPE trained on them; reading a .bin/.idx back."""

import gzip
import json
import pathlib
import shutil
import subprocess

import pytest

# Unequal lengths, non-ASCII text, one empty document (left out: no tokens) among them.
TEXTS = [f"document {i}: " + "naïve café, ünïcode → ∑ " * (i % 9) + "end" for i in range(150)]
TEXTS[37] = ""


def write_jsonl(path: pathlib.Path, texts: list[str], key: str = "text", blank_after: int | None = None) -> None:
    with open(path, "w") as file:
        for i, text in enumerate(texts):
            file.write(json.dumps({"id": i, key: text}) + "\n")
            if i == blank_after:
                file.write("\n")


def write_gzip(path: pathlib.Path, source: pathlib.Path) -> None:
    with open(source, "rb") as raw, gzip.open(path, "wb") as packed:
        shutil.copyfileobj(raw, packed)


def write_zstd(path: pathlib.Path, source: pathlib.Path) -> None:
    """With the zstandard package if installed, else the zstd program; skips without either."""
    try:
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor().compress(source.read_bytes()))
    except ImportError:
        if shutil.which("zstd") is None:
            pytest.skip("neither the zstandard package nor the zstd program is installed")
        subprocess.run(["zstd", "-q", "-f", str(source), "-o", str(path)], check=True)


def write_parquet(path: pathlib.Path, texts: list[str], key: str = "text", row_group_size: int = 16) -> None:
    import pyarrow
    import pyarrow.parquet

    table = pyarrow.table({"id": list(range(len(texts))), key: texts})
    pyarrow.parquet.write_table(table, path, row_group_size=row_group_size)


def write_saved_dataset(path: pathlib.Path, texts: list[str], num_shards: int = 3) -> None:
    import datasets

    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({"text": texts, "id": list(range(len(texts)))}).save_to_disk(
        str(path), num_shards=num_shards
    )


def documents(prefix: str) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    indexed = IndexedDataset(prefix)  # kept alive while its memory-mapped arrays are read
    return [indexed[i].tolist() for i in range(len(indexed))]


def file_bytes(prefix: str) -> tuple[bytes, bytes]:
    return pathlib.Path(prefix + ".bin").read_bytes(), pathlib.Path(prefix + ".idx").read_bytes()


@pytest.fixture(scope="session")
def bpe_path(tmp_path_factory) -> str:
    """A byte-level BPE of 400 ids trained on TEXTS (its EOD is id 0)."""
    from data.preprocess import train_bpe_tokenizer

    return train_bpe_tokenizer(iter(TEXTS), 400, str(tmp_path_factory.mktemp("bpe") / "tokenizer.json"))


@pytest.fixture(scope="session")
def expected_documents(bpe_path) -> list[list[int]]:
    """What every input kind must give: each non-empty text's ids and the EOD, computed one text at
    a time by the tokenizer (not through preprocessing)."""
    from data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(bpe_path)
    return [tokenizer.tokenize(text) + [tokenizer.eod] for text in TEXTS if text]
