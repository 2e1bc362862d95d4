"""Real-format loaders checked against what the fixture writers put in the files (issue 7)."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch

from auxnb.data import fashion as fashion_module
from auxnb.data.amazon import UNKNOWN_CATEGORY, item_category, load_amazon, parse_meta_line
from auxnb.data.augment import ImageTransform, channel_stats
from auxnb.data.cifar import CIFAR100_COARSE, CIFAR100_FINE, CIFAR100_SUPERCLASSES, load_cifar10, load_cifar100
from auxnb.data.cub import load_cub, parse_attribute_labels
from auxnb.data.fashion import load_fashion_mnist, read_idx
from auxnb.data.fixtures import (
    cub_attribute_names,
    fixture_root,
    write_amazon,
    write_cifar10,
    write_cifar100,
    write_cub,
    write_fashion_mnist,
    write_movielens_100k,
    write_movielens_1m,
    write_pet,
)
from auxnb.data.movielens import ML100K_GENRES, ML_AGE_GROUPS, age_group, load_movielens_100k, load_movielens_1m, read_text
from auxnb.data.pet import load_pet, parse_pet_list
from auxnb.tasks import MISSING_CLASS


# --------------------------------------------------------------------------- CIFAR
def test_cifar10_pickles_load_exactly_the_written_images_and_labels(tmp_path):
    truth = write_cifar10(tmp_path, train_per_class=3, test_per_class=2)
    train, test = load_cifar10(tmp_path, "train"), load_cifar10(tmp_path, "test")
    assert train.classes == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    # data_batch_1..5 concatenated in order, rows decoded as R, G, B planes of 32 x 32
    assert torch.equal(train.labels, torch.as_tensor(truth["train_labels"]))
    assert torch.equal(train.images, torch.as_tensor(truth["train_images"]))
    assert torch.equal(test.images, torch.as_tensor(truth["test_images"]))
    assert train.images.dtype == torch.uint8 and train.images.shape == (30, 3, 32, 32)
    assert torch.bincount(train.labels).tolist() == [3] * 10 and train.coarse is None


def test_cifar100_exposes_fine_and_coarse_labels_consistent_with_the_superclasses(tmp_path):
    truth = write_cifar100(tmp_path, train_per_class=1, test_per_class=1)
    train = load_cifar100(tmp_path, "train")
    assert torch.equal(train.labels, torch.as_tensor(truth["train_fine"]))
    assert torch.equal(train.coarse, torch.as_tensor(truth["train_coarse"]))
    assert train.classes == CIFAR100_FINE and train.coarse_classes == CIFAR100_COARSE
    assert len(CIFAR100_FINE) == 100 and len(CIFAR100_COARSE) == 20 and CIFAR100_COARSE[14] == "people"
    # every image's coarse label is the superclass that lists its fine class
    for fine, coarse in zip(train.labels.tolist(), train.coarse.tolist()):
        assert train.classes[fine] in CIFAR100_SUPERCLASSES[train.coarse_classes[coarse]]


def test_cifar_accepts_batches_repickled_with_text_keys(tmp_path):
    write_cifar10(tmp_path, train_per_class=1, test_per_class=1)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    with open(path, "wb") as f:
        pickle.dump({k.decode(): v for k, v in batch.items()}, f)  # a Python-3 re-export
    assert load_cifar10(tmp_path, "test").labels.tolist() == list(batch[b"labels"])


def test_missing_cifar_names_the_layout_and_AUXNB_DATA(tmp_path, monkeypatch):
    monkeypatch.setenv("AUXNB_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="AUXNB_DATA") as err:
        load_cifar10()
    assert "cifar-10-batches-py" in str(err.value) and "data_batch_1" in str(err.value)
    with pytest.raises(FileNotFoundError, match="coarse|meta|cifar-100-python"):
        load_cifar100(tmp_path)


# --------------------------------------------------------------------------- CUB
def _expected_group(truth, group: str) -> list[int]:
    """Brute force: the present value with the highest certainty, ties to the lower id; -1 if none."""
    names = truth["attribute_names"]
    cols = [c for c, n in enumerate(names) if n.split("::")[0] == group]
    out = []
    for i in range(len(truth["labels"])):
        best, best_cert = MISSING_CLASS, -1
        for k, c in enumerate(cols):
            if truth["attributes"][i, c] and truth["certainty"][i, c] > best_cert:
                best, best_cert = k, int(truth["certainty"][i, c])
        out.append(best)
    return out


@pytest.mark.parametrize("where", ["top", "inside", "attributes"])
def test_cub_text_files_load_with_malformed_attribute_lines_kept(tmp_path, where):
    truth = write_cub(tmp_path, num_classes=3, train_per_class=2, test_per_class=2, attributes_txt=where, malformed_every=13)
    assert len(truth["malformed_lines"]) > 100  # lines with an extra field were written
    cub = load_cub(tmp_path, image_size=None)
    assert torch.equal(cub.labels, torch.as_tensor(truth["labels"]))
    assert torch.equal(cub.is_train, torch.as_tensor(truth["is_train"]))
    assert cub.classes == truth["classes"] and cub.attribute_names == tuple(cub_attribute_names())
    # every (image, attribute) pair read, including those on the malformed lines
    assert torch.equal(cub.attributes, torch.as_tensor(truth["attributes"]))
    assert torch.equal(cub.certainty, torch.as_tensor(truth["certainty"]))
    assert cub.attributes.shape == (12, 312) and cub.images is None


def test_cub_attribute_groups_match_the_papers_structure_and_a_brute_force_label(tmp_path):
    truth = write_cub(tmp_path, num_classes=3, train_per_class=2, test_per_class=2)
    cub = load_cub(tmp_path, image_size=None)
    groups = cub.attribute_groups()
    assert len(groups) == 28 and sum(len(c) for c in groups.values()) == 312
    assert len(groups["has_wing_color"]) == 15 and len(groups["has_bill_shape"]) == 9
    wing, values = cub.group_labels("has_wing_color")
    assert wing.tolist() == _expected_group(truth, "has_wing_color")
    assert wing[0] == MISSING_CLASS  # image 1: no wing colour marked
    assert values[int(wing[1])] == "black"  # image 2: two colours, the more certain one (attribute 21) wins
    bill, bill_values = cub.group_labels("has_bill_shape")
    assert bill.tolist() == _expected_group(truth, "has_bill_shape") and bill_values[0] == "curved_(up_or_down)"


def test_cub_attribute_parser_rejects_short_lines_and_missing_pairs(tmp_path):
    path = tmp_path / "labels.txt"
    path.write_text("1 1 0 3 2.0\n1 2 1\n")
    with pytest.raises(ValueError, match=r"labels.txt, line 2: 3 fields where at least 4 are expected"):
        parse_attribute_labels(path, 1, 2)
    path.write_text("1 1 0 3 2.0\n1 1 1 4 0 5.0\n")  # pair (1, 1) twice, (1, 2) never
    with pytest.raises(ValueError, match="1 are missing and 1 repeated"):
        parse_attribute_labels(path, 1, 2)


def test_cub_images_are_resized_rgb_with_the_class_colour_and_cached(tmp_path):
    truth = write_cub(tmp_path, num_classes=2, train_per_class=2, test_per_class=1)
    cache = tmp_path / "cache"
    cub = load_cub(tmp_path, image_size=16, cache_dir=cache)
    assert cub.images.shape == (6, 3, 16, 16) and cub.images.dtype == torch.uint8
    grey = cub.images[2].float()  # the grey JPEG became three equal channels
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    # an RGB image keeps its class's mean colour (JPEG + bilinear resize move it by a few levels)
    proto_mean = truth["prototypes"][truth["labels"][0]].mean(axis=(1, 2))
    assert np.abs(cub.images[0].float().mean((1, 2)).numpy() - proto_mean).max() < 8
    assert len(list(cache.glob("cub-16-*.pt"))) == 1
    again = load_cub(tmp_path, image_size=16, cache_dir=cache)
    assert torch.equal(again.images, cub.images)


def test_missing_cub_names_the_layout_and_AUXNB_DATA(tmp_path):
    with pytest.raises(FileNotFoundError, match="AUXNB_DATA") as err:
        load_cub(tmp_path)
    assert "image_attribute_labels.txt" in str(err.value) and "CUB_200_2011" in str(err.value)


# --------------------------------------------------------------------------- Pet
def test_pet_lists_give_breeds_species_and_splits(tmp_path):
    truth = write_pet(tmp_path, trainval_per_class=2, test_per_class=1)
    pet = load_pet(tmp_path, image_size=20)
    rows = truth["trainval"] + truth["test"]
    assert pet.names == [r[0] for r in rows]
    assert pet.labels.tolist() == [r[1] for r in rows] and pet.species.tolist() == [r[2] for r in rows]
    assert pet.classes == ("Abyssinian", "Bengal", "american_bulldog", "beagle")
    assert pet.species[pet.labels == 0].eq(0).all() and pet.species[pet.labels == 2].eq(1).all()  # cats, dogs
    assert pet.is_trainval.sum() == 8 and (~pet.is_trainval).sum() == 4
    # a grey JPEG and a PNG behind a .jpg name both load as RGB
    assert pet.images.shape == (12, 3, 20, 20)
    assert torch.equal(pet.images[1, 0], pet.images[1, 1])


def test_pet_list_parser_skips_comment_lines(tmp_path):
    write_pet(tmp_path, trainval_per_class=1, test_per_class=1)
    rows = parse_pet_list(tmp_path / "oxford-iiit-pet" / "annotations" / "list.txt")
    assert len(rows) == 8 and rows[0] == ("Abyssinian_1", 0, 0)


def test_missing_pet_names_the_layout_and_AUXNB_DATA(tmp_path):
    with pytest.raises(FileNotFoundError, match="AUXNB_DATA") as err:
        load_pet(tmp_path)
    assert "trainval.txt" in str(err.value)


# --------------------------------------------------------------------------- Fashion-MNIST
@pytest.mark.parametrize("compress", [True, False])
def test_fashion_idx_files_load_exactly_gzipped_or_not(tmp_path, compress):
    truth = write_fashion_mnist(tmp_path, train_per_class=2, test_per_class=1, compress=compress)
    x, y = load_fashion_mnist(tmp_path, "train", system=False)
    assert x.shape == (20, 1, 28, 28) and x.dtype == torch.uint8
    assert torch.equal(x[:, 0], torch.as_tensor(truth["train_images"]))
    assert torch.equal(y, torch.as_tensor(truth["train_labels"]))
    x, y = load_fashion_mnist(tmp_path, "test", system=False)
    assert torch.equal(y, torch.as_tensor(truth["test_labels"]))


def test_idx_reader_checks_magic_and_size(tmp_path):
    bad = tmp_path / "bad-idx1-ubyte"
    bad.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x02\x00\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short-idx1-ubyte.gz"
    with gzip.open(short, "wb") as f:
        f.write(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02")  # says 5 values, holds 2
    with pytest.raises(ValueError, match="holds 2"):
        read_idx(short)


def test_fashion_prefers_the_data_root_and_names_the_debian_package_when_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_module, "SYSTEM_FASHION_DIR", tmp_path / "system")
    with pytest.raises(FileNotFoundError, match="AUXNB_DATA") as err:
        load_fashion_mnist(tmp_path)
    assert "dataset-fashion-mnist" in str(err.value)
    write_fashion_mnist(tmp_path / "system", folder=".", train_per_class=1, test_per_class=1, seed=1)
    assert load_fashion_mnist(tmp_path)[0].shape[0] == 10  # found in the (patched) system folder
    write_fashion_mnist(tmp_path, train_per_class=2, test_per_class=1)
    assert load_fashion_mnist(tmp_path)[0].shape[0] == 20  # the data root comes first


# --------------------------------------------------------------------------- MovieLens
def test_movielens_100k_fields_decode_back_to_the_written_records(tmp_path):
    truth = write_movielens_100k(tmp_path, n_users=12, n_items=15, per_user=6)
    data = load_movielens_100k(tmp_path)
    assert data.field_names == ("user", "gender", "age", "occupation", "item", "genre")
    assert len(data) == len(truth["ratings"]) == 72
    users = {u: (a, g, o) for u, a, g, o in truth["users"]}
    items = {i: (t, g) for i, t, g in truth["items"]}
    for row, (u, i, r, t) in zip(data.fields.tolist(), truth["ratings"]):
        assert int(data.vocab["user"][row[0]]) == u and int(data.vocab["item"][row[4]]) == i
        age, gender, occupation = users[u]
        assert data.vocab["gender"][row[1]] == gender and data.vocab["occupation"][row[3]] == occupation
        assert int(data.vocab["age"][row[2]]) == age_group(age)
        assert data.vocab["genre"][row[5]] == ML100K_GENRES[items[i][1]]
    assert data.ratings.tolist() == [float(r) for _, _, r, _ in truth["ratings"]]
    assert data.timestamps.tolist() == [t for *_, t in truth["ratings"]]
    assert all(d == int(data.fields[:, f].max()) + 1 or d >= int(data.fields[:, f].max()) + 1
               for f, d in enumerate(data.field_dims))
    # u.item is latin-1: accented titles decode, item 1 (no genre flag) is "unknown"
    assert "Misérables, Les (1995)" in data.vocab["item_title"] and data.vocab["genre"][0] == "unknown"
    assert (tmp_path / "ml-100k" / "u.item").read_bytes().count("é".encode("latin-1")) >= 2


@pytest.mark.parametrize("encoding", ["latin-1", "utf-8"])
def test_movielens_1m_reads_latin1_originals_and_utf8_copies_alike(tmp_path, encoding):
    truth = write_movielens_1m(tmp_path, n_users=14, n_items=12, per_user=5, encoding=encoding)
    data = load_movielens_1m(tmp_path)
    assert data.vocab["item_title"][1] == "Misérables, Les (1995)" and data.vocab["item_title"][3] == "Amélie (2001)"
    users = {u: (g, a, o) for u, g, a, o in truth["users"]}
    items = {i: g for i, _, g in truth["items"]}
    for row, (u, i, r, _) in zip(data.fields.tolist(), truth["ratings"]):
        g, a, o = users[u]
        assert int(data.vocab["user"][row[0]]) == u and data.vocab["gender"][row[1]] == g
        assert ML_AGE_GROUPS[row[2]] == a and int(data.vocab["occupation"][row[3]]) == o
        assert int(data.vocab["item"][row[4]]) == i and data.vocab["genre"][row[5]] == items[i][0]  # first genre
    assert sorted(set(data.ratings.tolist())) == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_read_text_falls_back_to_latin1_only_for_invalid_utf8(tmp_path):
    (tmp_path / "a").write_bytes("Café".encode("latin-1"))
    (tmp_path / "b").write_bytes("Café".encode("utf-8"))
    assert read_text(tmp_path / "a") == read_text(tmp_path / "b") == "Café"


def test_missing_movielens_says_it_is_never_shipped(tmp_path):
    with pytest.raises(FileNotFoundError, match="AUXNB_DATA") as err:
        load_movielens_1m(tmp_path)
    assert "ratings.dat" in str(err.value) and "redistributed" in str(err.value)


# --------------------------------------------------------------------------- Amazon
def test_amazon_reviews_and_python_literal_metadata_give_user_item_category(tmp_path):
    truth = write_amazon(tmp_path, "Beauty", n_users=8, n_items=10, per_user=4)
    data = load_amazon("beauty", tmp_path)
    assert data.field_names == ("user", "item", "category") and len(data) == len(truth["reviews"]) == 32
    for row, (user, asin, overall, t) in zip(data.fields.tolist(), truth["reviews"]):
        assert data.vocab["user"][row[0]] == user and data.vocab["item"][row[1]] == asin
        assert data.vocab["category"][row[2]] == truth["categories"].get(asin, UNKNOWN_CATEGORY)
    assert data.ratings.tolist() == [r for _, _, r, _ in truth["reviews"]]
    cats = dict(zip(data.vocab["item"], [None] * len(data.vocab["item"])))
    assert "B000000000" in cats  # reviewed, no metadata line -> unknown category
    assert data.field_dims[1] == 10 and data.field_dims[2] == len(set(data.vocab["category"]))


def test_amazon_meta_lines_need_literal_eval_and_category_level_is_documented():
    line = "{'asin': 'X1', 'title': \"Body's Best\", 'categories': [['Toys & Games', 'Games', 'Board']]}"
    meta = parse_meta_line(line)
    assert meta["title"] == "Body's Best" and item_category(meta) == "Games"
    assert item_category(meta, level=0) == "Toys & Games" and item_category(meta, level=5) == "Board"
    assert item_category({"asin": "X2"}) == UNKNOWN_CATEGORY
    assert parse_meta_line('{"asin": "X3", "flag": true}')["flag"] is True  # strict JSON accepted too


def test_missing_amazon_names_the_files_and_AUXNB_DATA(tmp_path):
    with pytest.raises(FileNotFoundError, match="AUXNB_DATA") as err:
        load_amazon("toys", tmp_path)
    assert "reviews_Toys_and_Games_5.json.gz" in str(err.value) and "meta_Toys_and_Games.json.gz" in str(err.value)


# --------------------------------------------------------------------------- transforms and fixtures
def test_random_crop_takes_a_window_of_the_padded_image_and_centre_crop_the_middle():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    g = torch.Generator().manual_seed(0)
    t = ImageTransform((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), crop=4, pad=2, generator=g)
    out = t(x)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):  # each output is exactly one 4x4 window of its own padded image
        windows = [padded[b, :, i:i + 4, j:j + 4] for i in range(7) for j in range(7)]
        assert any(torch.equal(out[b], w) for w in windows)
    centre = ImageTransform((0.0,) * 3, (1.0,) * 3, crop=4, random=False)(x)
    assert torch.equal(centre, x[:, :, 1:5, 1:5])


def test_flip_and_zscore_are_exact_and_uint8_is_scaled_to_unit_range():
    x = torch.tensor([[[[0, 51], [102, 255]]]], dtype=torch.uint8)
    always = ImageTransform((0.2,), (0.5,), flip=True, generator=torch.Generator().manual_seed(3))
    outs = {tuple(always(x).flatten().tolist()) for _ in range(20)}
    plain = ((x.float() / 255 - 0.2) / 0.5).flatten().tolist()
    flipped = ((x.float().flip(3) / 255 - 0.2) / 0.5).flatten().tolist()
    assert outs == {tuple(plain), tuple(flipped)}  # both orientations occur, nothing else
    assert ImageTransform((0.2,), (0.5,), flip=True).eval()(x).flatten().tolist() == pytest.approx(plain)


def test_channel_stats_equal_numpy_mean_and_population_std():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(37, 3, 5, 4)).astype(np.uint8)
    mean, std = channel_stats(torch.as_tensor(x), chunk=10)
    ref = x.astype(np.float64) / 255
    assert np.allclose(mean, ref.mean((0, 2, 3))) and np.allclose(std, ref.std((0, 2, 3)))


def test_fixture_root_writes_once_and_reuses_the_folder(tmp_path):
    a = fixture_root("movielens-100k", base=tmp_path, n_users=5, n_items=6, per_user=3)
    b = fixture_root("movielens-100k", base=tmp_path, n_users=5, n_items=6, per_user=3)
    c = fixture_root("movielens-100k", base=tmp_path, n_users=6, n_items=6, per_user=3)
    assert a == b != c and (a / ".complete").is_file() and (a / "ml-100k" / "u.data").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch folder left behind


# --------------------------------------------------------------------------- headers and bad lines (issue 12 defect 10)
def _prepend(path, header, encoding="utf-8"):
    raw = path.read_bytes()
    path.write_bytes(header.encode(encoding) + b"\n" + raw)


def _insert_after(path, line_number, text, encoding="utf-8"):
    lines = path.read_bytes().split(b"\n")
    lines.insert(line_number, text.encode(encoding))
    path.write_bytes(b"\n".join(lines))


def _same_ratings(a, b):
    return torch.equal(a.fields, b.fields) and torch.equal(a.ratings, b.ratings) and a.vocab == b.vocab


def test_movielens_files_with_a_header_line_load_the_same_and_a_bad_line_is_named(tmp_path):
    write_movielens_100k(tmp_path / "a", n_users=8, n_items=10, per_user=4)
    write_movielens_1m(tmp_path / "b", n_users=8, n_items=10, per_user=4)
    plain100k, plain1m = load_movielens_100k(tmp_path / "a"), load_movielens_1m(tmp_path / "b")
    ml100k, ml1m = tmp_path / "a" / "ml-100k", tmp_path / "b" / "ml-1m"
    genres = "|".join(ML100K_GENRES)
    # the header of u.item seen in the wild, and headers on every other table
    _prepend(ml100k / "u.item", f"movie id|movie title|release date|video release date|IMDb URL|{genres}", "latin-1")
    _prepend(ml100k / "u.user", "user id|age|gender|occupation|zip code")
    _prepend(ml100k / "u.data", "user id\titem id\trating\ttimestamp")
    for name, header in (("users.dat", "UserID::Gender::Age::Occupation::Zip-code"), ("movies.dat", "MovieID::Title::Genres"),
                         ("ratings.dat", "UserID::MovieID::Rating::Timestamp")):
        _prepend(ml1m / name, header, "latin-1")
    assert _same_ratings(load_movielens_100k(tmp_path / "a"), plain100k)
    assert _same_ratings(load_movielens_1m(tmp_path / "b"), plain1m)
    # a bad line anywhere else: the file, the line number, the line and the fix
    _insert_after(ml100k / "u.data", 3, "7\tseven\t4\t881250949")
    with pytest.raises(ValueError, match=r"u.data, line 4: 'seven' is not an integer in '7.+seven.*correct or delete that line"):
        load_movielens_100k(tmp_path / "a")
    _insert_after(ml1m / "users.dat", 2, "9::F::25")
    with pytest.raises(ValueError, match=r"users.dat, line 3: 3 fields where 5 are expected.*UserID::Gender"):
        load_movielens_1m(tmp_path / "b")


def test_cub_and_pet_tables_with_a_header_line_load_the_same_and_a_bad_line_is_named(tmp_path):
    write_cub(tmp_path, num_classes=2, train_per_class=2, test_per_class=1)
    plain = load_cub(tmp_path, image_size=None)
    folder = tmp_path / "CUB_200_2011"
    for name, header in (("images.txt", "image_id path"), ("image_class_labels.txt", "image_id class_id"),
                         ("train_test_split.txt", "image_id is_training_image"), ("classes.txt", "class_id name"),
                         ("attributes/image_attribute_labels.txt", "image_id attribute_id is_present certainty_id time")):
        _prepend(folder / name, header)
    again = load_cub(tmp_path, image_size=None)
    assert torch.equal(again.labels, plain.labels) and torch.equal(again.attributes, plain.attributes)
    assert again.classes == plain.classes and torch.equal(again.is_train, plain.is_train)
    _insert_after(folder / "image_class_labels.txt", 2, "2 two")
    with pytest.raises(ValueError, match=r"image_class_labels.txt, line 3: 'two' is not an integer.*<image id> <class id>"):
        load_cub(tmp_path, image_size=None)
    write_pet(tmp_path, trainval_per_class=1, test_per_class=1)
    listing = tmp_path / "oxford-iiit-pet" / "annotations" / "trainval.txt"
    rows = parse_pet_list(listing)
    _prepend(listing, "Image CLASS-ID SPECIES BREED-ID")  # a header without the leading '#'
    assert parse_pet_list(listing) == rows
    _insert_after(listing, 2, "Bengal_9 two 1 2")
    with pytest.raises(ValueError, match=r"trainval.txt, line 3: .*not an integer.*<name> <class id>"):
        parse_pet_list(listing)
