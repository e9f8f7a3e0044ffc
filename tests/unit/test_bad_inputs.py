"""Every bad input is a clear error (issue 24): a user's images, manifest and prepared folder,
and Label Studio's answers. Each names the row or task, lists every bad one at once, and leaves
nothing half-written. The bad files are made here, byte by byte where a tool would refuse."""

from __future__ import annotations

import io
import struct
import tracemalloc
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from xbl.data import prepare
from xbl.data.manifest import ManifestError, read_manifest
from xbl.errors import AnnotationError, DataError
from xbl.explain.cells import cells_to_mask
from xbl.labelstudio.interface import BRUSH_NAME, IGNORE_LABEL, IMAGE_NAME
from xbl.labelstudio.payloads import cell_rectangle
from xbl.labelstudio.results import (
    UnreadableAnnotations,
    annotation_to_mask,
    applies_to,
    decode_rle,
    masks_from_annotations,
    relabelled_regions,
    review_verdict,
)

HEADER = "image,label,split"


# ---------------------------------------------------------------- files made here
def png_bytes(size=(16, 16), noise=False) -> bytes:
    shape = size[::-1]
    pixels = (
        np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        if noise
        else np.full(shape, 128, np.uint8)
    )
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def broken_chunk_png() -> bytes:
    """A PNG whose second image-data chunk has a garbled type: Pillow opens it, then raises
    SyntaxError ("broken PNG file") while decoding."""
    data = bytearray(png_bytes((300, 300), noise=True))  # noise: several IDAT chunks
    second = data.find(b"IDAT", data.find(b"IDAT") + 4)
    assert second > 0
    data[second : second + 4] = b"\x00\x01\x02\x03"
    return bytes(data)


def bomb_png(width=100_000, height=100_000) -> bytes:
    """A small file declaring a huge image: 8-bit greyscale, a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def dataset(root, files: dict[str, bytes], lines: list[str], header=HEADER) -> object:
    """Image files and a manifest naming them, written under root; the manifest's path."""
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join([header, *lines]) + "\n")
    return manifest


def good_files(n=4) -> dict[str, bytes]:
    return {f"img/{i}.png": png_bytes() for i in range(n)}


GOOD = ["img/0.png,cat,train", "img/1.png,dog,train", "img/2.png,cat,val", "img/3.png,dog,test"]


def problem_lines(err: pytest.ExceptionInfo) -> list[str]:
    return [line.strip() for line in str(err.value).splitlines()[1:]]


# ---------------------------------------------------------------- images
@pytest.mark.parametrize(
    "content,expected",
    [
        (broken_chunk_png(), "SyntaxError: broken PNG file"),
        (png_bytes((64, 64), noise=True)[:300], "truncated"),
        (b"GIF89a but not really", "unreadable image"),
        (b"", "unreadable image"),
    ],
    ids=["corrupt-chunk", "truncated", "garbage", "empty"],
)
def test_a_damaged_image_names_its_line_and_file(tmp_path, content, expected):
    manifest = dataset(
        tmp_path, {**good_files(), "img/bad.png": content}, [*GOOD, "img/bad.png,cat,train"]
    )
    with pytest.raises(ManifestError) as err:
        read_manifest(manifest, image_size=8)
    assert isinstance(err.value, DataError)
    assert "manifest.csv line 6 (img/bad.png)" in str(err.value) and expected in str(err.value)


def test_every_damaged_image_is_listed_at_once_and_nothing_is_written(tmp_path):
    files = {
        **good_files(),
        "img/chunk.png": broken_chunk_png(),
        "img/short.png": png_bytes((64, 64), noise=True)[:300],
        "img/junk.png": b"junk",
    }
    lines = [
        *GOOD[:2],
        "img/chunk.png,cat,train",
        *GOOD[2:],
        "img/short.png,dog,val",
        "img/junk.png,cat,test",
    ]
    out = tmp_path / "prepared"
    with pytest.raises(ManifestError, match="3 problem") as err:
        read_manifest(dataset(tmp_path, files, lines), image_size=8, out=out)
    assert [line.split(":")[0].strip() for line in problem_lines(err)] == [
        "manifest.csv line 4 (img/chunk.png)",
        "manifest.csv line 7 (img/short.png)",
        "manifest.csv line 8 (img/junk.png)",
    ]
    assert not out.exists()
    assert not any(".partial" in p.name for p in tmp_path.iterdir())


def test_an_image_over_the_decompression_bomb_limit_says_its_size_and_to_resize_it(tmp_path):
    manifest = dataset(
        tmp_path, {**good_files(), "img/huge.png": bomb_png()}, [*GOOD, "img/huge.png,cat,train"]
    )
    with pytest.raises(ManifestError) as err:
        read_manifest(manifest, image_size=8)
    message = str(err.value)
    assert (
        "line 6 (img/huge.png)" in message and "img/huge.png has 10,000,000,000 pixels" in message
    )
    assert "decompression-bomb limit" in message and "resize it" in message


def test_an_image_over_the_limit_where_pillow_only_warns_is_refused_too(tmp_path, monkeypatch):
    # Pillow warns between its limit and twice it, and would decode the image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    files = {**good_files(), "img/big.png": png_bytes((12, 12))}  # 144 pixels
    manifest = dataset(tmp_path, files, [*GOOD, "img/big.png,cat,train"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning becomes the message, not a stray warning
        with pytest.raises(ManifestError) as err:
            read_manifest(manifest, image_size=8)
    message = str(err.value)
    assert "line 6 (img/big.png)" in message and "has 144 pixels" in message
    assert "limit of 100" in message


# ---------------------------------------------------------------- the manifest file
def test_a_manifest_that_is_not_utf8_names_every_bad_line_and_the_first_byte(tmp_path):
    manifest = dataset(tmp_path, good_files(), GOOD)
    text = f"{HEADER}\nimg/0.png,chat,train\nimg/1.png,dog,train\nimg/2.png,chat,val\n"
    manifest.write_bytes(text.replace("chat", "ch\xe2t").encode("latin-1"))
    with pytest.raises(ManifestError) as err:
        read_manifest(manifest, image_size=8)
    message = str(err.value)
    assert "is not UTF-8" in message and "line(s) 2, 4" in message
    assert f"the first at byte {len(HEADER) + 1 + len('img/0.png,ch')}: b'\\xe2'" in message
    assert "Save it as UTF-8" in message


@pytest.mark.parametrize(
    "encode",
    [
        lambda text: text.encode("utf-8-sig"),  # Excel's "CSV UTF-8"
        lambda text: text.replace(",", ";").encode(),  # Excel where ',' is the decimal mark
        lambda text: text.replace(",", "\t").encode(),
        lambda text: text.replace(",", "\t").encode("utf-16"),  # Excel's "Unicode text"
        lambda text: text.replace(",", ";").replace("\n", "\r\n").encode("utf-8-sig"),
    ],
    ids=["bom", "semicolon", "tab", "utf16-tab", "bom-semicolon-crlf"],
)
def test_a_bom_and_another_separator_are_read_as_excel_writes_them(tmp_path, encode):
    manifest = dataset(tmp_path, good_files(), GOOD)
    manifest.write_bytes(encode("\n".join([HEADER, *GOOD]) + "\n"))
    data = read_manifest(manifest, image_size=8)
    assert data.ids.tolist() == [f"img/{i}.png" for i in range(4)]
    assert data.classes.tolist() == ["cat", "dog"]


def test_a_missing_column_says_which_separator_it_read_with(tmp_path):
    manifest = dataset(tmp_path, good_files(), [line.replace(",", ";") for line in GOOD])
    manifest.write_text("image;label;spilt\n" + "\n".join(line.replace(",", ";") for line in GOOD))
    with pytest.raises(ManifestError) as err:
        read_manifest(manifest, image_size=8)
    message = str(err.value)
    assert "missing column(s) ['split']" in message and "';' as the separator" in message
    assert "'spilt'" in message


def test_rows_with_extra_fields_or_odd_bytes_name_their_physical_line(tmp_path):
    lines = [
        GOOD[0],
        "",  # a blank line: later rows keep their line numbers
        "img/1.png,dog,train,stray",
        '"img/2.png",cat,val',
        "img/\x003.png,dog,test",
    ]
    with pytest.raises(ManifestError, match="2 problem") as err:
        read_manifest(dataset(tmp_path, good_files(), lines), image_size=8)
    first, second = problem_lines(err)
    assert first.startswith("manifest.csv line 4 (img/1.png): 4 fields, the header has 3")
    assert second.startswith("manifest.csv line 6") and "null" in second


# ---------------------------------------------------------------- the prepared folder
def prepared_once(tmp_path, out):
    manifest = dataset(tmp_path, good_files(), GOOD)
    return read_manifest(manifest, image_size=8, out=out, project=tmp_path)


def test_an_out_folder_holding_other_files_is_refused_and_kept(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("a month of work")
    with pytest.raises(DataError) as err:
        prepared_once(tmp_path, out)
    assert str(out) in str(err.value) and "['notes.txt']" in str(err.value)
    assert "data.out must be a folder of its own" in str(err.value)
    assert (out / "notes.txt").read_text() == "a month of work"
    assert not any(".partial" in p.name for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    "name", [".", "data", "data/raw", "data/feedback", "data/rounds", "data/raw/set"]
)
def test_an_out_folder_that_is_or_holds_the_images_or_the_project_data_is_refused(tmp_path, name):
    root = tmp_path / "data" / "raw" / "set"
    manifest = dataset(root, good_files(), GOOD)
    for folder in ("data/feedback/round-1", "data/rounds/round-1"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "mask.png").write_bytes(png_bytes())
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(DataError, match="is or holds .*data.out must be a folder of its own"):
        read_manifest(manifest, image_size=8, out=tmp_path / name, project=tmp_path)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_an_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "prepared").write_text("not a folder")
    with pytest.raises(DataError, match="not a folder prepare made"):
        prepared_once(tmp_path, tmp_path / "prepared")
    assert (tmp_path / "prepared").read_text() == "not a folder"


def test_prepares_own_folder_with_its_summary_is_replaced(tmp_path):
    out = tmp_path / "prepared"
    prepared_once(tmp_path, out)
    (out / "summary.json").write_text("{}")  # what the prepare stage writes beside the arrays
    assert len(prepared_once(tmp_path, out)) == 4
    assert not (out / "summary.json").exists()  # replaced whole: the stage writes it again


def test_the_prepare_stage_refuses_data_out_data_and_keeps_the_raw_images(
    tmp_path, monkeypatch, capsys
):
    """The issue's case: `data.out: data` with a valid manifest under data/raw."""
    manifest = dataset(tmp_path / "data" / "raw", good_files(), GOOD)
    params = tmp_path / "other.yaml"
    params.write_text("data:\n  dataset: data/raw/manifest.csv\n  out: data\n  image_size: 8\n")
    monkeypatch.chdir(tmp_path)
    assert prepare.main(["--params", str(params)]) == 2
    assert "data" in capsys.readouterr().err
    assert manifest.is_file() and len(list((tmp_path / "data" / "raw" / "img").iterdir())) == 4


# ---------------------------------------------------------------- Label Studio answers
SIZE = 28


def box(row=1, col=1, label=IGNORE_LABEL, **extra) -> dict:
    return {**cell_rectangle(row, col, 4, SIZE, SIZE, label), **extra}


def brush(height, width, rle, label=IGNORE_LABEL) -> dict:
    return {
        "id": "paint",
        "from_name": BRUSH_NAME,
        "to_name": IMAGE_NAME,
        "type": "brushlabels",
        "original_height": height,
        "original_width": width,
        "value": {"format": "rle", "rle": rle, "brushlabels": [label]},
    }


def rle_header(count: int, word_size=8, run_sizes=(3, 4, 8, 16)) -> list[int]:
    bits = f"{count:032b}{word_size - 1:05b}" + "".join(f"{s - 1:04b}" for s in run_sizes)
    bits += "0" * (-len(bits) % 8)
    return [int(bits[k : k + 8], 2) for k in range(0, len(bits), 8)]


@pytest.mark.parametrize(
    "odd,expected",
    [
        ("a string", "region #1: is a str ('a string'), not an object"),
        ([1, 2], "region #1: is a list"),
        (None, "region #1: is null, not an object"),
        ({**box(5, 5), "id": "v1", "value": "x=3"}, "region v1: its value is a str"),
        ({**box(5, 5), "id": "v2", "value": [1]}, "region v2: its value is a list"),
        ({**box(5, 5), "id": "v3", "value": None}, "region v3: its value is null"),
    ],
)
def test_a_region_or_value_that_is_not_an_object_is_reported_and_the_rest_kept(odd, expected):
    read = annotation_to_mask([box(1, 1), odd], SIZE, SIZE)
    np.testing.assert_array_equal(read.ignore, cells_to_mask([(1, 1)], 4, SIZE, SIZE))
    assert len(read.problems) == 1 and read.problems[0].startswith(expected)


def test_choices_that_are_not_objects_do_not_break_the_readers():
    odd = ["text", {"type": "choices", "from_name": "applies_to", "value": "all"}, 3]
    assert applies_to(odd) is None and review_verdict(odd) is None
    assert relabelled_regions([*odd, box()]) == 1
    rating = {"type": "choices", "from_name": "explanation_rating", "value": {"choices": "bad"}}
    assert annotation_to_mask([box(), rating], SIZE, SIZE).rating is None


@pytest.mark.parametrize(
    "result",
    [
        [{**box(), "value": {"x": "left", "rectanglelabels": [IGNORE_LABEL]}}],
        ["not a region", box(label="cat")],
        [
            {**box(), "value": None},
            {"type": "choices", "from_name": "explanation_rating", "value": {"choices": ["bad"]}},
        ],
        {"regions": []},
        "ignore everything",
    ],
    ids=["bad-number", "not-objects", "value-null-with-rating", "a-dict", "a-string"],
)
def test_an_annotation_none_of_whose_regions_can_be_read_is_an_error_not_nothing_to_ignore(result):
    with pytest.raises(AnnotationError):
        annotation_to_mask(result, SIZE, SIZE)


def test_a_rating_or_a_note_alone_is_still_nothing_to_ignore():
    note = {"type": "textarea", "from_name": "note", "value": {"text": ["fine"]}}
    read = annotation_to_mask([note], SIZE, SIZE)
    assert not read.ignore.any() and read.problems == []


def test_every_unreadable_annotation_of_a_round_is_named_by_its_task_and_the_rest_is_read():
    annotations = [
        {"image_id": "a", "task_id": 1, "annotation_id": 10, "result": [box(1, 1)]},
        {"image_id": "b", "task_id": 2, "annotation_id": 11, "result": ["junk"]},
        {"image_id": "c", "task_id": 3, "annotation_id": 12, "result": []},
        {"image_id": "d", "task_id": 4, "annotation_id": 13, "result": [{**box(), "value": 7}]},
    ]
    with pytest.raises(UnreadableAnnotations) as err:
        masks_from_annotations(annotations, SIZE, SIZE)
    assert isinstance(err.value, AnnotationError)
    assert str(err.value).startswith("2 annotation(s) cannot be read")
    assert [line.split(":")[0] for line in err.value.unreadable] == [
        "task 2 (image b, annotation 11)",
        "task 4 (image d, annotation 13)",
    ]
    assert set(err.value.read.ignore) == {"a", "c"}  # never an empty W for b or d
    assert not err.value.read.ignore["c"].any()  # c said "nothing to ignore" itself


def test_a_brush_declaring_a_huge_size_is_refused_before_anything_is_allocated():
    huge = rle_header(2**32 - 1) + [0] * 8  # 4 GiB of values declared in a few bytes
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="declares 4294967295 values, expected 3136"):
            decode_rle(huge, size=SIZE * SIZE * 4)
        with pytest.raises(ValueError, match="more than its 15 bytes can hold"):
            decode_rle(huge)
        with pytest.raises(AnnotationError, match="declares 4294967295 values"):
            annotation_to_mask([brush(SIZE, SIZE, huge)], SIZE, SIZE)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize(
    "height,width,reason",
    [(100_000, 100_000, "100000x100000 canvas"), (112, 56, "56x112 canvas"), (0, 28, "28x0")],
)
def test_a_brush_painted_on_a_canvas_that_was_not_served_is_refused_before_decoding(
    height, width, reason
):
    region = brush(height, width, rle_header(height * width * 4 % 2**32))
    tracemalloc.start()
    try:
        read = annotation_to_mask([box(), region], SIZE, SIZE)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(read.problems) == 1 and reason in read.problems[0]
    assert "not the 28x28 image or an upscaling of it" in read.problems[0]
    assert peak < 1 << 20
