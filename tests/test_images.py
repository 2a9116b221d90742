"""The readers `scan` reads images through (onnx_fc2conv/images).

Every file is written here from a numpy array (tifffile, Pillow, zarr,
numpy), and every region read is compared with that array. That a region
read does not read the whole image is shown two ways on a tiled TIFF: the
tiles tifffile's zarr store fetches, and the memory a read allocates
(tracemalloc), each next to a whole-image read that the same measure flags.
"""

from __future__ import annotations

import pickle
import sys
import tracemalloc

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image as PILImage

from onnx_fc2conv.errors import Fc2ConvError
from onnx_fc2conv.images import FORMATS, open_image
from onnx_fc2conv.images import base as images_base

RNG = np.random.default_rng(0)
# regions: inside one tile, across tiles, at the far corner, one pixel, odd sizes
BOXES = [((0, 16), (0, 16)), ((37, 291), (5, 190)), ((250, 300), (180, 200)), ((123, 124), (77, 78))]
SHAPE = (300, 200)


def pixels(shape, dtype):
    if np.dtype(dtype).kind == "f":
        return RNG.standard_normal(shape).astype(dtype)
    return RNG.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)


def expect(array, box, channels):
    """What a reader must return for ``box`` of the written array: channels last, alpha gone."""
    region = array[tuple(slice(a, b) for a, b in box)]
    if region.ndim == len(box):
        region = region[..., None]
    return region[..., :channels]


def assert_regions(image, array, channels, boxes=BOXES):
    assert image.shape == array.shape[:len(boxes[0])]
    assert image.channels == channels
    assert image.dtype == array.dtype
    for box in boxes:
        got = image.read(box)
        assert got.shape == tuple(b - a for a, b in box) + (channels,)
        np.testing.assert_array_equal(got, expect(array, box, channels), err_msg=str(box))


# --- TIFF (tifffile) ---------------------------------------------------------------------------

LAYOUTS = {
    "tiled": dict(tile=(64, 64)),
    "tiled-zlib": dict(tile=(64, 48), compression="zlib"),
    "tiled-lzw-bigtiff": dict(tile=(32, 32), compression="lzw", bigtiff=True),
    "striped": dict(rowsperstrip=7),
    "striped-bigtiff": dict(rowsperstrip=50, bigtiff=True, compression="zlib"),
    "one-strip": dict(),
}
KINDS = {  # name -> (channels written, channels read, tifffile arguments)
    "gray": (None, 1, dict(photometric="minisblack")),
    "rgb": (3, 3, dict(photometric="rgb")),
    "rgba": (4, 3, dict(photometric="rgb", extrasamples=["unassalpha"])),
    "gray-alpha": (2, 1, dict(photometric="minisblack", extrasamples=["assocalpha"])),
}


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_tiff_regions_equal_the_written_array(tmp_path, layout, kind, dtype):
    written, channels, kw = KINDS[kind]
    array = pixels(SHAPE + ((written,) if written else ()), dtype)
    path = tmp_path / "image.tif"
    tifffile.imwrite(path, array, **LAYOUTS[layout], **kw)
    with open_image(path) as image:
        assert (image.level, image.levels) == (0, 1)
        assert image.chunk == LAYOUTS[layout].get("tile", (min(LAYOUTS[layout].get("rowsperstrip", 300), 300), 200))
        assert_regions(image, array, channels)


def test_tiff_planar_rgb_and_bigtiff_suffix(tmp_path):
    array = pixels(SHAPE + (3,), np.uint16)
    path = tmp_path / "planar.btf"
    tifffile.imwrite(path, np.moveaxis(array, -1, 0), photometric="rgb", planarconfig="separate",
                     tile=(32, 64), bigtiff=True)
    with open_image(path) as image:
        assert_regions(image, array, 3)


def test_tiff_extra_band_that_is_not_alpha_is_kept(tmp_path):
    array = pixels(SHAPE + (4,), np.uint8)   # e.g. RGB + near infrared: ExtraSamples "unspecified"
    path = tmp_path / "rgbn.tif"
    tifffile.imwrite(path, array, photometric="rgb", extrasamples=["unspecified"], tile=(64, 64))
    with open_image(path) as image:
        assert_regions(image, array, 4)


def test_tiff_palette_is_expanded_through_its_colour_map(tmp_path):
    index = RNG.integers(0, 256, SHAPE, dtype=np.uint8)
    cmap = RNG.integers(0, 256, (3, 256), dtype=np.uint16) * 257
    path = tmp_path / "palette.tif"
    tifffile.imwrite(path, index, photometric="palette", colormap=cmap, tile=(64, 64))
    rgb = np.moveaxis((cmap // 257).astype(np.uint8)[:, index], 0, -1)
    with open_image(path) as image:
        assert_regions(image, rgb, 3)


def test_tiff_3d_stack_for_a_3d_model(tmp_path):
    array = pixels((12, 40, 30), np.float32)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, array, tile=(16, 16), metadata={"axes": "ZYX"})
    with open_image(path, spatial_rank=3) as image:
        assert_regions(image, array, 1, boxes=[((0, 12), (0, 40), (0, 30)), ((3, 7), (9, 33), (5, 29))])
    with pytest.raises(Fc2ConvError, match=r"axes ZYX .*needs 2 spatial axes"):
        open_image(path)


def write_pyramid(path, array, levels=3, tile=(64, 64), **kw):
    """Level k is ``array[::2**k, ::2**k]``, each a top-level reduced page (what OpenSlide's
    generic-tiff and tifffile both read as a pyramid). Returns the arrays written."""
    written = [array[::2 ** k, ::2 ** k] for k in range(levels)]
    with tifffile.TiffWriter(path) as tif:
        for k, level in enumerate(written):
            tif.write(level, tile=tile, subfiletype=1 if k else 0, **kw)
    return written


def test_tiff_pyramid_levels(tmp_path):
    array = pixels((520, 392, 3), np.uint8)
    path = tmp_path / "pyramid.tif"
    written = write_pyramid(path, array, photometric="rgb", compression="zlib")
    sizes = tuple(a.shape[:2] for a in written)
    for k, level in enumerate(written):
        with open_image(path, level=k) as image:
            assert (image.level, image.levels, image.level_shapes) == (k, 3, sizes)
            boxes = [((0, level.shape[0]), (0, level.shape[1])), ((level.shape[0] // 3, level.shape[0] - 1), (7, 70))]
            assert_regions(image, level, 3, boxes)
            with image.open_level(2) as other:
                assert_regions(other, written[2], 3, [((5, 60), (3, 90))])


def test_tiff_subifd_pyramid(tmp_path):
    array = pixels((256, 256), np.uint16)
    path = tmp_path / "subifds.ome.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(array, tile=(64, 64), subifds=1)
        tif.write(array[::2, ::2], tile=(64, 64), subfiletype=1)
    with open_image(path, level=1) as image:
        assert image.level_shapes == ((256, 256), (128, 128))
        assert_regions(image, array[::2, ::2], 1, [((0, 128), (0, 128)), ((30, 100), (1, 2))])


def test_bad_level_lists_the_levels_and_their_sizes(tmp_path):
    path = tmp_path / "pyramid.tif"
    write_pyramid(path, pixels((256, 192), np.uint8))
    with pytest.raises(Fc2ConvError) as err:
        open_image(path, level=3)
    assert str(err.value) == (f"{path}: --level 3 does not exist; it has 3 levels "
                              "(0: 256x192; 1: 128x96; 2: 64x48)")
    with pytest.raises(Fc2ConvError, match=r"--level -1 does not exist"):
        open_image(path, level=-1)
    PILImage.fromarray(pixels((20, 30), np.uint8)).save(tmp_path / "one.png")
    with pytest.raises(Fc2ConvError, match=r"one.png: --level 1 does not exist; it has 1 level \(0: 20x30\)$"):
        open_image(tmp_path / "one.png", level=1)
    zarr.create_array(tmp_path / "one.zarr", shape=(20, 30), dtype="u1")
    with pytest.raises(Fc2ConvError, match=r"one.zarr: --level 2 does not exist; it has 1 level \(0: 20x30\)$"):
        open_image(tmp_path / "one.zarr", level=2)


def truncated_tiff(tmp_path, tile=(64, 64)):
    array = pixels((512, 512), np.uint8)
    path = tmp_path / "truncated.tif"
    tifffile.imwrite(path, array, tile=tile, compression="zlib")
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return path, array


def test_truncated_tiff_names_the_region_in_one_line(tmp_path):
    path, array = truncated_tiff(tmp_path)
    with open_image(path) as image:
        np.testing.assert_array_equal(image.read(((0, 64), (0, 64)))[..., 0], array[:64, :64])  # before the cut
        with pytest.raises(Fc2ConvError) as err:
            image.read(((448, 512), (256, 320)))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: cannot read region rows 448:512, cols 256:320: ")


def test_unreadable_and_missing_files(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff at all")
    with pytest.raises(Fc2ConvError, match=r"bad.tif: not a readable TIFF"):
        open_image(bad)
    with pytest.raises(Fc2ConvError, match=r"missing.tif: no such file or folder"):
        open_image(tmp_path / "missing.tif")
    odd = tmp_path / "image.xyz"
    odd.write_bytes(b"")
    with pytest.raises(Fc2ConvError, match=r"unknown image format '.xyz'; scan reads .*\.png.*\.svs.*\.tif.*\.zarr"):
        open_image(odd)
    with pytest.raises(Fc2ConvError, match=r"unknown image reader 'magick'; choose one of pillow, tifffile"):
        open_image(odd, reader="magick")


class CountChunks:
    """Counts the chunks (tiles, strips) tifffile's zarr store fetches from the file."""

    def __init__(self, monkeypatch):
        import tifffile.zarr as tz
        self.keys = []
        parse = tz.ZarrTiffStore._parse_key

        def counting(store, key):
            self.keys.append(key)
            return parse(store, key)
        monkeypatch.setattr(tz.ZarrTiffStore, "_parse_key", counting)


def test_a_region_read_fetches_only_its_tiles(tmp_path, monkeypatch):
    array = pixels((1024, 1024), np.uint8)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, array, tile=(128, 128))       # 8 x 8 = 64 tiles
    chunks = CountChunks(monkeypatch)
    with open_image(path) as image:
        chunks.keys.clear()
        image.read(((130, 250), (300, 500)))             # tile rows 1, tile cols 2..3
        assert len(chunks.keys) == 2
        chunks.keys.clear()
        image.read(((100, 300), (0, 129)))               # tile rows 0..2, tile cols 0..1
        assert len(chunks.keys) == 6
        chunks.keys.clear()
        image.read(((0, 1024), (0, 1024)))               # the measure sees a whole read
        assert len(chunks.keys) == 64


def peak_bytes(fn):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_region_read_allocates_about_the_region(tmp_path):
    array = pixels((4096, 4096), np.uint8)                # 16 MiB of pixels
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, array, tile=(256, 256), compression="zlib")
    del array
    with open_image(path) as image:
        image.read(((0, 8), (0, 8)))                      # zarr metadata and codecs set up
        region = peak_bytes(lambda: image.read(((1000, 1300), (2000, 2300))))  # 4 tiles = 256 KiB
        whole = peak_bytes(lambda: image.read(((0, 4096), (0, 4096))))
    assert whole > 16 * 2 ** 20
    assert region < 2 * 2 ** 20, region


def test_striped_tiff_reads_only_the_strips_of_the_region(tmp_path, monkeypatch):
    array = pixels((1000, 300), np.uint16)
    path = tmp_path / "striped.tif"
    tifffile.imwrite(path, array, rowsperstrip=100)
    chunks = CountChunks(monkeypatch)
    with open_image(path) as image:
        chunks.keys.clear()
        np.testing.assert_array_equal(image.read(((150, 260), (10, 20)))[..., 0], array[150:260, 10:20])
        assert len(chunks.keys) == 2


# --- Pillow ------------------------------------------------------------------------------------

PNG_KINDS = {  # name -> (array written, channels read, what the reader must give)
    "gray": lambda: (pixels(SHAPE, np.uint8), 1),
    "rgb": lambda: (pixels(SHAPE + (3,), np.uint8), 3),
    "rgba": lambda: (pixels(SHAPE + (4,), np.uint8), 3),
    "gray16": lambda: (pixels(SHAPE, np.uint16), 1),
}


@pytest.mark.parametrize("kind", list(PNG_KINDS))
def test_png_regions(tmp_path, kind):
    array, channels = PNG_KINDS[kind]()
    path = tmp_path / "image.png"
    PILImage.fromarray(array).save(path)
    with open_image(path) as image:
        assert_regions(image, array, channels)


@pytest.mark.parametrize("samples", [3, 4])
def test_png_16bit_colour_keeps_16_bits(tmp_path, samples):
    import imagecodecs

    array = pixels(SHAPE + (samples,), np.uint16)
    path = tmp_path / "rgb16.png"
    path.write_bytes(imagecodecs.png_encode(array))
    assert PILImage.open(path).mode in ("RGB", "RGBA")     # Pillow alone would give 8 bits
    with open_image(path) as image:
        assert_regions(image, array, 3)


RAW_FILES = {  # uncompressed formats: memory-mapped, read by region
    "rgb.bmp": (3, np.uint8, 3), "gray.bmp": (None, np.uint8, 1), "rgba.bmp": (4, np.uint8, 3),
    "rgb.ppm": (3, np.uint8, 3), "gray.pgm": (None, np.uint8, 1), "gray16.pgm": (None, np.uint16, 1),
    "rgb.tga": (3, np.uint8, 3),
}


@pytest.mark.parametrize("name", list(RAW_FILES))
def test_uncompressed_files_are_read_by_region(tmp_path, name):
    channels, dtype, read = RAW_FILES[name]
    array = pixels(SHAPE + ((channels,) if channels else ()), dtype)
    path = tmp_path / name
    PILImage.fromarray(array).save(path)
    with open_image(path) as image:
        assert image._raw is not None, PILImage.open(path).tile   # not decoded whole
        assert_regions(image, array, read)


def test_uncompressed_region_read_allocates_about_the_region(tmp_path):
    array = pixels((3000, 3000, 3), np.uint8)              # 27 MB
    path = tmp_path / "big.bmp"
    PILImage.fromarray(array).save(path)
    with open_image(path) as image:
        image.read(((0, 1), (0, 1)))
        peak = peak_bytes(lambda: image.read(((1000, 1200), (2000, 2300))))   # 180 KB
        np.testing.assert_array_equal(image.read(((1000, 1200), (2000, 2300))), array[1000:1200, 2000:2300])
    assert peak < 1 * 2 ** 20, peak
    with open_image(tmp_path / "big.bmp") as image:         # the measure sees a whole read
        assert peak_bytes(lambda: image.read(((0, 3000), (0, 3000)))) > 27 * 10 ** 6


def test_truncated_bmp_names_the_region(tmp_path):
    array = pixels((100, 60, 3), np.uint8)
    path = tmp_path / "t.bmp"
    PILImage.fromarray(array).save(path)
    path.write_bytes(path.read_bytes()[:-20 * 180])         # BMP rows are stored bottom-up: the top 20 are gone
    with open_image(path) as image:
        np.testing.assert_array_equal(image.read(((20, 100), (0, 60))), array[20:])
        with pytest.raises(Fc2ConvError, match=r"t.bmp: cannot read region rows 10:30, cols 0:60: EOFError: "
                                               r"the file ends after 80 of 100 rows$"):
            image.read(((10, 30), (0, 60)))


def test_png_gray_alpha_and_palette(tmp_path):
    gray = pixels(SHAPE, np.uint8)
    la = np.stack([gray, pixels(SHAPE, np.uint8)], -1)
    PILImage.fromarray(la, "LA").save(tmp_path / "la.png")
    with open_image(tmp_path / "la.png") as image:
        assert_regions(image, gray, 1)
    palette = PILImage.fromarray(pixels(SHAPE + (3,), np.uint8)).quantize(16)
    palette.save(tmp_path / "p.png")
    rgb = np.asarray(palette.convert("RGB"))
    with open_image(tmp_path / "p.png") as image:
        assert_regions(image, rgb, 3)


def test_tiff_jpeg_tiles_equal_the_full_decode(tmp_path):
    array = pixels((256, 192, 3), np.uint8)
    path = tmp_path / "jpeg.tif"
    tifffile.imwrite(path, array, tile=(64, 64), photometric="rgb", compression="jpeg")
    decoded = tifffile.imread(path)                       # lossy: the reference is tifffile's whole decode
    with open_image(path) as image:
        assert_regions(image, decoded, 3, [((0, 256), (0, 192)), ((70, 200), (33, 150))])


def test_jpeg_regions_equal_pillows_decode(tmp_path):
    array = pixels(SHAPE + (3,), np.uint8)
    path = tmp_path / "image.jpg"
    PILImage.fromarray(array).save(path, quality=90)
    decoded = np.asarray(PILImage.open(path))             # JPEG is lossy: the reference is its decode
    with open_image(path) as image:
        assert_regions(image, decoded, 3)


def test_pillow_bomb_limit_lifted_only_while_reading(tmp_path, monkeypatch):
    array = pixels((100, 120), np.uint8)
    PILImage.fromarray(array).save(tmp_path / "big.png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)   # the image is 12 times the limit
    with pytest.raises(PILImage.DecompressionBombError):
        PILImage.open(tmp_path / "big.png")
    with open_image(tmp_path / "big.png") as image:
        assert_regions(image, array, 1, [((0, 100), (0, 120))])
    assert PILImage.MAX_IMAGE_PIXELS == 1000


def test_png_decoded_once_and_truncated_png_names_the_region(tmp_path):
    array = pixels((200, 200), np.uint8)
    path = tmp_path / "t.png"
    PILImage.fromarray(array).save(path)
    with open_image(path) as image:
        first = image.read(((0, 10), (0, 10)))
        assert image.read(((0, 10), (0, 10))).base is first.base is not None   # the same decoded pixels
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with open_image(path) as image:
        with pytest.raises(Fc2ConvError, match=r"^\S*t.png: cannot read region rows 0:10, cols 0:10: \w+"):
            image.read(((0, 10), (0, 10)))


# --- OpenSlide ---------------------------------------------------------------------------------

def test_generic_tiled_tiff_through_openslide(tmp_path):
    array = pixels((520, 392, 3), np.uint8)
    path = tmp_path / "slide.tif"
    written = write_pyramid(path, array, photometric="rgb", compression="zlib")
    for k, level in enumerate(written):
        with open_image(path, level=k, reader="openslide") as image:
            assert type(image).__name__ == "SlideImage" and image.vendor == "generic-tiff"
            assert image.chunk == (64, 64)
            assert image.level_shapes == tuple(a.shape[:2] for a in written)
            h, w = level.shape[:2]
            assert_regions(image, level, 3, [((0, h), (0, w)), ((h // 3, h - 1), (5, w // 2)), ((h - 1, h), (3, 4))])
    with pytest.raises(Fc2ConvError, match=r"--level 3 does not exist; it has 3 levels \(0: 520x392;"):
        open_image(path, level=3, reader="openslide")


def test_slide_suffix_goes_to_openslide(tmp_path):
    array = pixels((300, 260), np.uint8)
    path = tmp_path / "slide.svs"                          # content: a generic tiled TIFF
    write_pyramid(path, array, levels=2)
    with open_image(path) as image:
        assert type(image).__name__ == "SlideImage"
        assert_regions(image, np.repeat(array[..., None], 3, -1), 3)   # OpenSlide gives gray as RGB
    striped = tmp_path / "striped.svs"
    tifffile.imwrite(striped, array, rowsperstrip=16)
    with pytest.raises(Fc2ConvError, match=r"striped.svs: not a slide OpenSlide can read"):
        open_image(striped)


def test_slide_alpha_is_composited_over_the_background():
    from onnx_fc2conv.images.slide import SlideImage

    class FakeSlide:
        def read_region(self, origin, level, size):
            rgba = np.zeros((size[1], size[0], 4), np.uint8)
            rgba[..., :3] = 200
            rgba[0, 0, 3], rgba[0, 1, 3] = 255, 0           # opaque, outside the scan
            rgba[1, 0, 3] = 51                               # a fifth opaque
            return PILImage.fromarray(rgba, "RGBA")

    image = SlideImage.__new__(SlideImage)
    image._slide, image.level, image._downsample, image.shape = FakeSlide(), 0, 1.0, (2, 2)
    image._background = np.array([255, 255, 255], np.float32)
    got = image.read(((0, 2), (0, 2)))
    assert got[0, 0].tolist() == [200] * 3 and got[0, 1].tolist() == [255] * 3
    assert got[1, 0].tolist() == [round(200 * 0.2 + 255 * 0.8)] * 3


# --- zarr and .npy -----------------------------------------------------------------------------

@pytest.mark.parametrize("zarr_format", [2, 3])
@pytest.mark.parametrize("dtype,channels", [(np.uint8, None), (np.uint16, 3), (np.float32, 4)])
def test_zarr_array_regions(tmp_path, zarr_format, dtype, channels):
    array = pixels(SHAPE + ((channels,) if channels else ()), dtype)
    path = tmp_path / "image.zarr"
    z = zarr.create_array(path, shape=array.shape, chunks=(64, 48) + array.shape[2:], dtype=array.dtype,
                          zarr_format=zarr_format)
    z[...] = array
    with open_image(path) as image:
        assert image.chunk == (64, 48)
        assert_regions(image, array, channels or 1)           # no alpha guessed: 4 channels stay 4


def test_zarr_pyramid_group_and_named_array(tmp_path):
    array = pixels((256, 200, 3), np.uint8)
    group = zarr.open_group(tmp_path / "pyramid.zarr", mode="w")
    for k in range(3):
        level = array[::2 ** k, ::2 ** k]
        group.create_array(str(k), shape=level.shape, chunks=(32, 32, 3), dtype=level.dtype)[...] = level
    with open_image(tmp_path / "pyramid.zarr", level=2) as image:
        assert image.level_shapes == ((256, 200), (128, 100), (64, 50))
        assert_regions(image, array[::4, ::4], 3, [((0, 64), (0, 50)), ((9, 33), (7, 8))])
    with open_image(tmp_path / "pyramid.zarr" / "1") as image:   # folder.zarr/name opens that array
        assert_regions(image, array[::2, ::2], 3, [((0, 128), (0, 100))])
    mixed = zarr.open_group(tmp_path / "mixed.zarr", mode="w")
    for name in ("image", "labels"):
        mixed.create_array(name, shape=(8, 8), dtype="u1")
    with pytest.raises(Fc2ConvError, match=r"a zarr group with arrays image, labels; open one of them"):
        open_image(tmp_path / "mixed.zarr")


def test_npy_memory_mapped(tmp_path):
    array = pixels(SHAPE + (3,), np.float32)
    np.save(tmp_path / "a.npy", array)
    with open_image(tmp_path / "a.npy") as image:
        assert_regions(image, array, 3)
        assert isinstance(image._array, np.memmap)


# --- every reader ------------------------------------------------------------------------------

def every_reader(tmp_path):
    """(path, reader, array read) for one small file of each reader."""
    array = pixels((150, 130, 3), np.uint8)
    PILImage.fromarray(array).save(tmp_path / "a.png")
    write_pyramid(tmp_path / "a.tif", array, levels=2, photometric="rgb")
    np.save(tmp_path / "a.npy", array)
    zarr.create_array(tmp_path / "a.zarr", shape=array.shape, chunks=(32, 32, 3), dtype="u1")[...] = array
    return array, [("a.png", None), ("a.tif", None), ("a.tif", "openslide"), ("a.npy", None), ("a.zarr", None)]


def test_readers_pickle_as_path_and_level(tmp_path):
    array, files = every_reader(tmp_path)
    for name, reader in files:
        with open_image(tmp_path / name, reader=reader) as image:
            image.read(((0, 1), (0, 1)))
            data = pickle.dumps(image)
            assert len(data) < 2000, (name, len(data))        # a path, not pixels or a file handle
            with pickle.loads(data) as copy:
                assert type(copy) is type(image) and copy.shape == image.shape
                np.testing.assert_array_equal(copy.read(((10, 90), (20, 130))), array[10:90, 20:130])


def test_every_reader_downsamples(tmp_path):
    array, files = every_reader(tmp_path)
    for name, reader in files:
        with open_image(tmp_path / name, reader=reader) as image:
            got = image.downsampled(40)
        # the pyramid's level 1 (75x65) is the coarsest still 40 a side: halved; one level: shrunk by 4
        source, f = (array[::2, ::2], 2) if name == "a.tif" else (array, 4)
        expected = np.rint(box_mean(source.astype(np.float64), f)).astype(np.uint8)
        np.testing.assert_array_equal(got, expected, err_msg=f"{name} {reader}")


def box_mean(array, f):
    """Independent reference: pad with NaN to a multiple of f, then nanmean over each f x f box."""
    h, w, c = array.shape
    padded = np.full((-(-h // f) * f, -(-w // f) * f, c), np.nan)
    padded[:h, :w] = array
    return np.nanmean(padded.reshape(padded.shape[0] // f, f, padded.shape[1] // f, f, c), axis=(1, 3))


@pytest.mark.parametrize("max_side,f", [(1000, 1), (60, 3), (45, 4), (7, 22)])
def test_downsampled_is_the_box_mean(tmp_path, monkeypatch, max_side, f):
    array = pixels((151, 133, 3), np.uint16)
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, array, tile=(32, 32), photometric="rgb")
    monkeypatch.setattr(images_base, "BLOCK", 40)            # several blocks, each a multiple of f
    with open_image(path) as image:
        sizes = []
        read = image.read
        monkeypatch.setattr(image, "read", lambda box: sizes.append([b - a for a, b in box]) or read(box))
        got = image.downsampled(max_side)
    assert got.dtype == np.uint16 and max(got.shape[:2]) <= max_side
    np.testing.assert_array_equal(got, np.rint(box_mean(array.astype(np.float64), f)).astype(np.uint16))
    assert len(sizes) > 1 and max(max(s) for s in sizes) <= max(40, f)


def test_downsampled_uses_the_pyramid(tmp_path, monkeypatch):
    array = pixels((512, 400), np.float32)
    path = tmp_path / "pyramid.tif"
    written = write_pyramid(path, array, levels=3)
    opened = []
    from onnx_fc2conv.images.tiff import TiffImage
    monkeypatch.setattr(TiffImage, "open_level", lambda self, k: opened.append(k) or TiffImage(self.path, k))
    with open_image(path) as image:
        got = image.downsampled(128)                         # level 2 is 128x100: used as it is
        assert opened == [2]
        np.testing.assert_array_equal(got[..., 0], written[2])
        got = image.downsampled(200)                         # level 1 (256x200), halved
        np.testing.assert_allclose(got[..., 0], box_mean(written[1][..., None].astype(np.float64), 2)[..., 0],
                                   rtol=1e-6)


# --- without the extras ------------------------------------------------------------------------

@pytest.mark.parametrize("suffix,module,extra", [(".tif", "tifffile", "scan"), (".zarr", "zarr", "scan"),
                                                 (".png", "PIL.Image", "scan"), (".tif", "imagecodecs", "scan"),
                                                 (".svs", "openslide", "wsi")])
def test_without_the_extra_the_error_names_the_pip_install(tmp_path, monkeypatch, suffix, module, extra):
    path = tmp_path / f"image{suffix}"
    path.mkdir() if suffix == ".zarr" else path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, module, None)          # import fails as if not installed
    with pytest.raises(Fc2ConvError, match=rf"needs '{module}'.*run: pip install 'onnx-fc2conv\[{extra}\]'"):
        open_image(path)


def test_format_modules_import_only_base():
    import ast
    import pathlib

    folder = pathlib.Path(images_base.__file__).parent
    for name in set(FORMATS.values()):
        tree = ast.parse((folder / f"{name}.py").read_text())
        relative = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
        assert relative == {"base"}, (name, relative)
